"""Path patching in the runner: the senders' change and its delivery to the receivers (local hooks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..interventions import Delivery, SenderChange
from ..models.sites import Site
from .base import Copy


class PathsMixin:
    """The deliveries of :class:`Runner` (see :meth:`Runner.run`)."""

    # ---------------------------------------------------------------- path patching (deliveries)
    def sender_change(self, g: int, source: str, change: SenderChange) -> torch.Tensor:
        """The senders' change of their residual writes (B, T, d) on group ``g`` (see
        :class:`~hydra_probe.interventions.SenderChange`), from the cached local prefixes.

        MLPs: ``mlp_out' - mlp_out``. Heads of one layer go together: without a
        post-attention norm ``sum_h (z_h' - z_h) W_O^h``; with one (Gemma-2/3,
        OLMo-2) the layer's write ``N_post(sum_h W_O^h z_h)`` is recomputed with
        the senders' heads at the other run's z, so the rescaling of the layer's
        other heads is part of the change.
        """
        key = (g, source, change)
        if key in self._changes:
            return self._changes[key]
        if self.model.backend == "nnsight":
            self._prefetch_change(source, change)
        ad = self.ad
        Pb, Po = self.prefix(g, source), self.prefix(g, change.value)  # captures only (nnsight: the traced runs)
        T = len(self.task.clean_ids[self.groups[g][0]])
        mask = torch.zeros(T, dtype=ad.dtype, device=ad.device)
        if change.positions is None:
            mask[:] = 1
        else:
            mask[list(change.positions)] = 1
        out = None
        with torch.no_grad():
            heads: dict[int, list[int] | None] = {}
            for m in change.senders:
                if m.kind == "mlp":
                    s = Site(m.layer, "mlp_out")
                    d = Po.captures[s] - Pb.captures[s]
                    out = d if out is None else out + d
                elif m.kind == "attn" or heads.get(m.layer, []) is None:
                    heads[m.layer] = None
                else:
                    heads.setdefault(m.layer, []).append(m.head)  # type: ignore[union-attr,arg-type]
            for layer, hs in heads.items():
                s = Site(layer, "z")
                zb, zo = Pb.captures[s], Po.captures[s]
                if hs is None:
                    zm = zo
                else:
                    zm = zb.clone()
                    for h in hs:
                        zm[..., ad.head_slice(h)] = zo[..., ad.head_slice(h)]
                if ad.has_post_attn_norm:
                    d = ad.head_writes(layer, zm).sum(-2) - ad.head_writes(layer, zb).sum(-2)
                else:
                    B = zb.shape[0]
                    dz = (zm - zb).view(B, T, ad.n_heads, ad.head_dim)
                    d = torch.einsum("bthk,hkd->btd", dz, ad.W_O(layer))
                out = d if out is None else out + d
        out = out * mask[None, :, None]
        self._changes[key] = out
        return out

    def _path_edits(self, g: int, source: str, copies: Sequence[Copy], B: int,
                    edits: dict[Site, list[Callable]], norm_fns: dict[tuple[int, str], Callable], r: int = 0
                    ) -> tuple[dict[int, int], list[tuple[int, Delivery]]]:
        """Add the hooks of the copies' deliveries to ``edits`` and ``norm_fns``.

        A receiver head's q/k/v is projected from ``norm(x + change)`` (x its
        block input in this forward); a receiver MLP reads ``norm(x_mid +
        change)``. Grouped-query attention: where a delivery to k/v must not
        reach the other heads of a key/value group, a *shadow* batch of the
        copy gets the copy's block input, the patched k/v, and the receiver
        heads' ``z`` is copied from the shadow into the copy. Returns (copy ->
        shadow batch index, the logits deliveries). ``r`` > 0: the forward runs the rows ``r..`` only (the
        changes are zero before them), so the changes delivered are their rows ``r..``.
        """
        ad = self.ad
        shadow, shadow_layers = self._shadow_plan(copies)

        def rows(j: int) -> slice:
            return slice(j * B, (j + 1) * B)

        attn_in: dict[int, torch.Tensor] = {}
        normed: dict[tuple[int, int, SenderChange], torch.Tensor] = {}
        qkv_items: dict[Site, list[tuple[int, SenderChange, int, list[slice]]]] = {}
        copy_in: dict[int, list[tuple[int, int]]] = {}
        copy_z: dict[int, list[tuple[int, int, list[slice]]]] = {}
        mlp_items: dict[int, list[tuple[int, SenderChange]]] = {}
        logits: list[tuple[int, Delivery]] = []
        for ci, c in enumerate(copies):
            for dv in c:
                if not isinstance(dv, Delivery):
                    continue
                self.sender_change(g, source, dv.change)  # now, not inside a hook (it may run a forward)
                if dv.target == "logits":
                    logits.append((ci, dv))
                elif dv.target == "mlp":
                    mlp_items.setdefault(dv.layer, []).append((ci, dv.change))
                else:
                    layer = dv.layer
                    sh = layer in shadow_layers.get(ci, ())
                    tgt = shadow[ci] if sh else ci
                    per_site: dict[Site, list[slice]] = {}
                    for h in dv.heads:
                        for w in dv.inputs:
                            site, cols = ad.head_input_slice(layer, h, w)
                            if cols not in per_site.setdefault(site, []):
                                per_site[site].append(cols)
                    for site, cols in per_site.items():
                        qkv_items.setdefault(site, []).append((tgt, dv.change, layer, cols))
                    if sh:
                        if (ci, tgt) not in copy_in.get(layer, []):
                            copy_in.setdefault(layer, []).append((ci, tgt))
                        copy_z.setdefault(layer, []).append((ci, tgt, [ad.head_slice(h) for h in dv.heads]))

        def capture_attn(layer: int):
            def fn(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                attn_in[layer] = inp
                return out
            return fn

        def edit_mlp(layer: int, items: list[tuple[int, SenderChange]]):
            def fn(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                out = out.clone()
                for ci, ch in items:
                    d = self.sender_change(g, source, ch)[:, r:]
                    out[rows(ci)] = ad.block_norm(layer, "mlp", inp[rows(ci)] + d).to(out.dtype)
                return out
            return fn

        def edit_qkv(site: Site, items: list[tuple[int, SenderChange, int, list[slice]]]):
            def fn(y: torch.Tensor) -> torch.Tensor:
                y = y.clone()
                for tgt, ch, layer, cols in items:
                    key = (layer, tgt, ch)
                    if key not in normed:
                        d = self.sender_change(g, source, ch)[:, r:]
                        normed[key] = ad.block_norm(layer, "attn", attn_in[layer][rows(tgt)] + d)
                    proj = ad.project(site, normed[key])
                    for c in cols:
                        y[rows(tgt), :, c] = proj[:, :, c].to(y.dtype)
                return y
            return fn

        def edit_copy_in(pairs: list[tuple[int, int]]):
            def fn(x: torch.Tensor) -> torch.Tensor:
                x = x.clone()
                for ci, tgt in pairs:
                    x[rows(tgt)] = x[rows(ci)]
                return x
            return fn

        def edit_copy_z(items: list[tuple[int, int, list[slice]]]):
            def fn(z: torch.Tensor) -> torch.Tensor:
                z = z.clone()
                for ci, tgt, slices in items:
                    for s in slices:
                        z[rows(ci), :, s] = z[rows(tgt), :, s]
                return z
            return fn

        for layer in {site.layer for site in qkv_items}:
            norm_fns[(layer, "attn")] = capture_attn(layer)
        for layer, items in mlp_items.items():
            norm_fns[(layer, "mlp")] = edit_mlp(layer, items)
        for s, items in qkv_items.items():
            edits.setdefault(s, []).append(edit_qkv(s, items))
        for layer, pairs in copy_in.items():
            edits.setdefault(Site(layer, "resid_pre"), []).append(edit_copy_in(pairs))
        for layer, items in copy_z.items():
            edits.setdefault(Site(layer, "z"), []).append(edit_copy_z(items))
        return shadow, logits

    def _path_logits(self, g: int, source: str, x_last: torch.Tensor, deliveries: list[tuple[int, Delivery]],
                     B: int) -> torch.Tensor:
        """Logits (k*B, vocab) of the final residual, with each copy's logits deliveries added; for a metric of
        the answer's and the alternative's logits alone (:meth:`metric_columns`), those two columns (k*B, 2)."""
        ad = self.ad
        k = x_last.shape[0] // B
        ids = None
        if self.metric_columns():
            idx = self.groups[g]
            ids = torch.stack([self.task.answer_ids[idx], self.task.alternative_ids[idx]], -1).to(x_last.device)
        add: dict[int, tuple[torch.Tensor, str]] = {}
        for ci, dv in deliveries:
            d = self.sender_change(g, source, dv.change)[:, -1]
            prev = add.get(ci)
            add[ci] = (d if prev is None else prev[0] + d, dv.scale)
        out = []
        with torch.no_grad():
            for ci in range(k):
                xl = x_last[ci * B:(ci + 1) * B]
                if ci in add:
                    d, scale = add[ci]
                    out.append(ad.logits_frozen(xl, d, ids) if scale == "frozen" else ad.logits(xl + d, ids))
                else:
                    out.append(ad.logits(xl, ids))
        return torch.cat(out)
