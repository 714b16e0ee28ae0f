"""Gradient reads (attribution patching, AtP*'s GradDrop) and AtP*'s QK fix in the runner."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import OptionError
from ..interventions import Delivery, GradientRead, Intervention, SenderChange
from ..models.plumbing import SuffixRefused, check_fired
from ..models.sites import Site
from .base import SOURCES, compose, first_true, halving, is_oom, on_later_rows, progress_bar


@dataclass
class GradientOutput:
    """The result of one :class:`~hydra_probe.interventions.GradientRead` over all prompts.

    Attributes:
        metric: (n,) float64 metric of the unedited run, task order.
        acts: ``{site: [per length group g a (B_g, T_g, width) tensor]}``: the
            activations read (model dtype, CPU).
        grads: the same layout: the metric's gradient with respect to each activation.
        drop_layer: the read's GradDrop layer (None: nothing dropped); :meth:`Runner.qk_fix` skips the
            terms a read that drops a layer at or below a sender never uses.
    """

    metric: torch.Tensor
    acts: dict[Site, list[torch.Tensor]]
    grads: dict[Site, list[torch.Tensor]]
    drop_layer: int | None = None


class _SkipOnlyGradient(torch.autograd.Function):
    """``x_out`` unchanged in the forward; in the backward, for the rows where ``mask`` is true, the
    gradient of ``x_out`` goes to the block input ``x_in`` (the skip connection) instead of through
    the block (GradDrop)."""

    @staticmethod
    def forward(ctx: Any, x_out: torch.Tensor, x_in: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return x_out.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        zero = torch.zeros((), dtype=g.dtype, device=g.device)
        return torch.where(mask, zero, g), torch.where(mask, g, zero), None


#: bytes of composed q/k weights (``Runner._composed_z``) a runner keeps for its next QK fix on the CPU (on an
#: accelerator they are recomputed: its memory goes to the batches): the report's two AtP* directions share one
#: runner and the same weights
QK_WEIGHT_CACHE = 512 * 2 ** 20


class GradientsMixin:
    """The gradient reads and the QK fix of :class:`Runner`."""

    # ---------------------------------------------------------------- gradients (attribution)
    def gradients(self, source: str, reads: Sequence[GradientRead], label: str = "gradients",
                  changed_rows_only: bool = False) -> list[GradientOutput]:
        """Run every :class:`~hydra_probe.interventions.GradientRead` on the ``source`` prompts.

        Reads are taken in chunks within the token budget (halved on
        out-of-memory) and restart at their earliest site's layer; a chunk's
        reads share one forward and one backward, and each GradDrop read is a
        vector-Jacobian product of the blocks under its dropped layer on that
        forward's graph (``Runner.shared_gradients = False``: one stacked copy
        per read, the plain reference). The gradient is taken with respect
        to zero tensors added to the activations, so it works when the
        parameters do not require gradients and leaves no ``.grad`` on them.
        With ``backend="nnsight"`` (also remote) each chunk of reads, stacked
        one copy per read, is one nnsight trace instead (:meth:`_gradients_nnsight`).

        ``changed_rows_only`` (for estimates that multiply the gradient by a clean - corrupted difference):
        the gradients at the positions before the first one where a group's clean and corrupted prompts
        differ are zero instead of computed (the difference is zero there in a causal model); where
        ``Runner.suffix_rows`` allows, the shared forward then runs the later rows only
        (``Adapter.run_blocks(first_row=)``).

        Where the runner reuses results (``Runner.memo``, a report's shared runs), the outputs of an every-row
        call are handed to the next call with the same ``source`` and ``reads`` that asks for the changed rows
        only (AtP* of an ablation, then of noising, on the clean run), which then zeroes the earlier rows
        instead of running again (equal to float rounding).
        """
        if source not in SOURCES:
            raise OptionError(f"unknown source {source!r}; choose 'clean' or 'corrupted'.")
        self.check_reads(reads)
        if self.model.backend == "nnsight":
            return self._gradients_nnsight(source, reads, label)
        key = (source, tuple(reads))
        if changed_rows_only and key in self._handoff:
            return self._changed_rows_of(self._handoff.pop(key))
        outs = self._gradients_local(source, reads, label, changed_rows_only)
        if self.memo is not None and not changed_rows_only:
            self._handoff = {key: outs}  # one at a time: the next call takes it, or the next every-row call replaces it
        return outs

    def _changed_rows_of(self, outs: list[GradientOutput]) -> list[GradientOutput]:
        """Every-row gradient outputs with the gradients before each group's first clean/corrupted difference
        zeroed, as ``gradients(changed_rows_only=True)`` returns them (in place; the caller owns them)."""
        firsts = [self.first_difference(g) for g in range(len(self.groups))]
        done: set[int] = set()
        for o in outs:
            for per_group in o.grads.values():
                for g, v in enumerate(per_group):
                    if id(v) not in done:
                        done.add(id(v))
                        v[:, :min(firsts[g], v.shape[1])] = 0
        return outs

    def _gradients_local(self, source: str, reads: Sequence[GradientRead], label: str, changed_rows_only: bool
                         ) -> list[GradientOutput]:
        """:meth:`gradients` on the local backend."""
        self.check_local("attribution patching (gradient reads)")
        L = self.ad.n_layers
        n, K = len(self.task), len(reads)
        metric = torch.empty(n, dtype=torch.float64)
        acts: dict[Site, list[torch.Tensor]] = {}
        grads: list[dict[Site, list[torch.Tensor]]] = [{} for _ in reads]
        starts = [min((s.layer for s in r.sites), default=L) for r in reads]
        with progress_bar(K * len(self.groups), label, self.progress) as bar:
            for g, idx in enumerate(self.groups):
                rows = self.first_difference(g) if changed_rows_only else 0

                def forward(chunk: list[int], start: int, g: int = g, rows: int = rows) -> Any:
                    return self._gradient_forward(g, source, [reads[i] for i in chunk], start, rows)

                for chunk, (m, a, gr) in self._batched(g, starts, [1] * K, forward):
                    metric[torch.tensor(idx)] = m.cpu()
                    for s, v in a.items():
                        if len(acts.setdefault(s, [])) == g:
                            acts[s].append(v.cpu())
                    for j, i in enumerate(chunk):
                        for s, v in gr[j].items():
                            grads[i].setdefault(s, []).append(v.cpu())
                    bar.update(len(chunk))
        return [GradientOutput(metric, {s: acts[s] for s in r.sites}, grads[i], r.drop_layer)
                for i, r in enumerate(reads)]

    def check_reads(self, reads: Sequence[GradientRead]) -> None:
        """Refuse a read site the model does not have (or, on nnsight, cannot read) and a drop layer outside
        the model, before any forward pass."""
        L = self.ad.n_layers
        for r in reads:
            for s in r.sites:
                (self.ad.path_of if self.model.backend == "nnsight" else self.ad.module_of)(s)
            if r.drop_layer is not None and not 0 <= r.drop_layer < L:
                raise OptionError(f"drop_layer {r.drop_layer} is outside layers 0..{L - 1}.")

    def first_difference(self, g: int) -> int:
        """The first position where group ``g``'s clean and corrupted prompts differ (T: nowhere)."""
        idx = self.groups[g]
        return first_true(self.task.batch(idx, "clean") != self.task.batch(idx, "corrupted"))

    def _gradient_forward(self, g: int, source: str, reads: Sequence[GradientRead], start: int, rows: int = 0
                          ) -> tuple[torch.Tensor, dict[Site, torch.Tensor], list[dict[Site, torch.Tensor]]]:
        """The forward and backward of ``reads`` on group ``g``: (metric (B,), activations {site: (B, T, w)},
        per read {site: gradient (B, T, w)}). Shared (one forward per ``freeze_patterns`` setting) unless
        ``Runner.shared_gradients`` is False. ``rows`` > 0: the gradients at the positions before it are zero
        (see :meth:`gradients`' ``changed_rows_only``; the shared forward runs the later rows where it can)."""
        if not self.shared_gradients:
            return self._gradient_forward_stacked(g, source, reads, start)
        m0: torch.Tensor | None = None
        acts: dict[Site, torch.Tensor] = {}
        per: list[dict[Site, torch.Tensor]] = [{} for _ in reads]
        for flag in (False, True):
            js = [j for j, r in enumerate(reads) if r.freeze_patterns == flag]
            if js:
                m0, a, got = self._gradient_forward_shared(g, source, [reads[j] for j in js], start, flag, rows)
                acts.update(a)
                for j, p in zip(js, got):
                    per[j] = p
        assert m0 is not None
        return m0, acts, per

    def _gradient_forward_shared(self, g: int, source: str, reads: Sequence[GradientRead], start: int,
                                 freeze: bool, rows: int = 0
                                 ) -> tuple[torch.Tensor, dict[Site, torch.Tensor], list[dict[Site, torch.Tensor]]]:
        """One forward of group ``g`` for every read (all with ``freeze_patterns == freeze``) and one full
        backward; each GradDrop read then reuses it: dropping block l's write leaves the gradient at the
        sites above l as it is, makes it zero inside block l, and below l it is the vector-Jacobian product
        of the blocks under l with the residual gradient at block l's output placed at block l's input
        (``torch.autograd.grad`` on the kept graph). Equals one stacked copy per read
        (:meth:`_gradient_forward_stacked`) to float rounding. ``rows`` > 0: the gradients before that position
        are zero; where ``Runner.suffix_rows`` and the adapter allow, only the later rows run (the unedited
        run's, so the activations are the prefix's)."""
        ad = self.ad
        P = self.local_prefix(g, source)
        L = ad.n_layers
        T = P.resid[0].shape[1]
        held = all(s.kind == "resid_pre" or s in P.captures for rd in reads for s in rd.sites)

        def run(r: int) -> tuple[torch.Tensor, dict[Site, torch.Tensor], list[dict[Site, torch.Tensor]]]:
            m, acts, per = self._gradient_forward_shared_rows(g, source, reads, start, freeze, r)
            if r > 0:  # the later rows only: the activations are the prefix's, the earlier gradients zero
                acts = {s: P.resid[s.layer] if s.kind == "resid_pre" else P.captures[s]
                        for s in {s for rd in reads for s in rd.sites}}
                return m, acts, [{s: _pad_rows(v, r) for s, v in p.items()} for p in per]
            if rows > 0:
                for p in per:
                    for v in p.values():
                        v[:, :min(rows, T)] = 0
            return m, acts, per

        return on_later_rows(self.model, P, start, min(rows, T - 1) if self.suffix_rows and start < L and held else 0,
                             run)

    def _gradient_forward_shared_rows(self, g: int, source: str, reads: Sequence[GradientRead], start: int,
                                      freeze: bool, r: int
                                      ) -> tuple[torch.Tensor, dict[Site, torch.Tensor],
                                                 list[dict[Site, torch.Tensor]]]:
        """:meth:`_gradient_forward_shared` on the rows ``r..`` (every row where ``r`` is 0): activations and
        gradients (B, T - r, w)."""
        ad = self.ad
        P = self.local_prefix(g, source)
        L = ad.n_layers
        final = Site(L, "resid_pre")
        sites = sorted({s for r in reads for s in r.sites}, key=lambda s: s.order)
        drops = sorted({r.drop_layer for r in reads if r.drop_layer is not None and r.drop_layer >= start})
        taps = {Site(layer + 1, "resid_pre") for layer in drops}  # block l's output: its residual gradient
        deltas: dict[Site, torch.Tensor] = {}
        acts: dict[Site, torch.Tensor] = {}
        edits: dict[Site, list[Callable]] = {}
        caps: dict[Site, Callable] = {}
        block_in: dict[int, torch.Tensor] = {}
        # the block inputs the GradDrop products start (apart) or pass (together) at
        together = self.graddrop_together and bool(drops) and not self._graddrop_apart
        for layer in (range(start, drops[-1] + 1) if together else drops):
            caps[Site(layer, "resid_pre")] = lambda x, layer=layer: block_in.__setitem__(layer, x)
        # zero tensors added to the activations (and to the dropped blocks' outputs) carry the gradient
        read_sites = set(sites)
        _zero_reads(edits, sorted(read_sites | taps, key=lambda s: s.order), read_sites, acts, deltas)
        _fold_captures(edits, caps)
        edit_fns = {s: compose(fs) for s, fs in edits.items()}
        need = sorted(read_sites | taps, key=lambda s: s.order)
        with self.model.evaluating(), torch.enable_grad():
            hook_edits = {s: f for s, f in edit_fns.items() if s != final}
            # AtP*'s QK fix: queries and keys pass no gradient (attention patterns are constants)
            frozen = ad.frozen_qk(range(start, L)) if freeze else contextlib.nullcontext()
            with self.ad.hooks(hook_edits, caps) as fired, frozen:
                x = self.ad.run_blocks(P, start, 1, first_row=r) if start < L else P.resid[L].clone()
            check_fired(fired, hook_edits)
            if final in edit_fns:
                x = edit_fns[final](x)
            idx = self.groups[g]
            clean = self.clean_logits()[idx] if self.metric.needs_clean else None
            mvals = self.metric_of(x[:, -1], self.task.answer_ids[idx], self.task.alternative_ids[idx], clean)
            gr = torch.autograd.grad(mvals.sum(), [deltas[s] for s in need], allow_unused=True,
                                     retain_graph=bool(drops))
            full = {s: torch.zeros_like(deltas[s]) if v is None else v.detach() for s, v in zip(need, gr)}
            below = None
            if together:
                try:
                    below = _drops_together(drops, sites, block_in, deltas, full, start)
                except RuntimeError as e:  # an op in the blocks' backward that vmap cannot batch: one product each
                    if is_oom(e):
                        raise
                    self._graddrop_apart = True
            if below is None:
                below = _drops_apart(drops, sites, block_in, deltas, full)
        per: list[dict[Site, torch.Tensor]] = []
        for r in reads:
            d = r.drop_layer if r.drop_layer is not None and r.drop_layer >= start else None
            out: dict[Site, torch.Tensor] = {}
            for s in r.sites:
                if d is None or s.layer > d:
                    out[s] = full[s]
                elif s in below[d]:
                    out[s] = below[d][s]
                else:  # inside the dropped block: its write passes no gradient
                    out[s] = torch.zeros_like(full[s])
            per.append(out)
        return mvals.detach().to(torch.float64), acts, per

    def _gradient_forward_stacked(self, g: int, source: str, reads: Sequence[GradientRead], start: int
                                  ) -> tuple[torch.Tensor, dict[Site, torch.Tensor], list[dict[Site, torch.Tensor]]]:
        """The plain reference of :meth:`_gradient_forward`: one stacked copy (forward and backward) per read."""
        ad = self.ad
        P = self.local_prefix(g, source)
        k, B, L = len(reads), P.batch, ad.n_layers
        final = Site(L, "resid_pre")
        sites = sorted({s for r in reads for s in r.sites}, key=lambda s: s.order)
        deltas: dict[Site, torch.Tensor] = {}
        acts: dict[Site, torch.Tensor] = {}
        edits: dict[Site, list[Callable]] = {}
        caps: dict[Site, Callable] = {}

        def rowmask(keep: Callable[[GradientRead], bool], x: torch.Tensor) -> torch.Tensor:
            m = torch.tensor([keep(r) for r in reads], device=x.device).repeat_interleave(B)
            return m.view(-1, *([1] * (x.dim() - 1)))

        # AtP*'s QK fix: queries and keys pass no gradient (attention patterns are constants for it)
        if any(r.freeze_patterns for r in reads):
            for site, sls in _qk_columns(ad, start).items():
                edits.setdefault(site, []).append(
                    lambda y, sls=sls: torch.where(rowmask(lambda r: r.freeze_patterns, y) & _column_mask(y, sls),
                                                   y.detach(), y))
        # GradDrop: block l's write to the residual passes no gradient (its input's skip path does)
        block_in: dict[int, torch.Tensor] = {}
        for layer in sorted({r.drop_layer for r in reads if r.drop_layer is not None}):
            if layer < start:
                continue
            caps[Site(layer, "resid_pre")] = lambda x, layer=layer: block_in.__setitem__(layer, x)

            def drop(x_out: torch.Tensor, layer: int = layer) -> torch.Tensor:
                m = rowmask(lambda rd: rd.drop_layer == layer, x_out)
                return _SkipOnlyGradient.apply(x_out, block_in[layer], m)
            edits.setdefault(Site(layer + 1, "resid_pre"), []).append(drop)
        # the reads: zero tensors added to the activations carry the gradient
        _zero_reads(edits, sites, set(sites), acts, deltas)
        _fold_captures(edits, caps)
        edit_fns = {s: compose(fs) for s, fs in edits.items()}
        with self.model.evaluating(), torch.enable_grad():
            hook_edits = {s: f for s, f in edit_fns.items() if s != final}
            with self.ad.hooks(hook_edits, caps) as fired:
                x = self.ad.run_blocks(P, start, k) if start < L else P.resid[L].repeat(k, 1, 1)
            check_fired(fired, hook_edits)
            if final in edit_fns:
                x = edit_fns[final](x)
            idx = self.groups[g]
            a = self.task.answer_ids[idx].repeat(k)
            b = self.task.alternative_ids[idx].repeat(k)
            clean = self.clean_logits()[idx].repeat(k, 1) if self.metric.needs_clean else None
            mvals = self.metric_of(x[:, -1], a, b, clean)
            gr = torch.autograd.grad(mvals.sum(), [deltas[s] for s in sites], allow_unused=True)
        per = [{} for _ in reads]  # type: list[dict[Site, torch.Tensor]]
        for s, gv in zip(sites, gr):
            gv = torch.zeros_like(deltas[s]) if gv is None else gv.detach()
            for j, r in enumerate(reads):
                if s in r.sites:
                    per[j][s] = gv[j * B:(j + 1) * B]
        m0 = mvals.detach().to(torch.float64)[:B]
        return m0, {s: v[:B] for s, v in acts.items()}, per

    # ---------------------------------------------------------------- AtP*'s QK fix
    def qk_fix(self, source: str, changes: Sequence[SenderChange], reads: Sequence[GradientOutput],
               label: str = "QK fix") -> torch.Tensor:
        """AtP*'s QK fix: the pattern changes of every downstream layer, recomputed, read by each gradient.

        ``term[r, c, i] = sum over layers l > (sender layer of changes[c]) and positions of
        (z'_l - z_l) . reads[r].grads[Site(l, "z")]`` for prompt i (task order), where ``z'_l`` is layer
        l's heads' output when ``changes[c]`` reaches only layer l's queries and keys (q and k projected
        from ``norm(x_l + change)``, grouped-query keys included) and layer l's block input ``x_l`` and
        its values stay at the ``source`` run's; ``z_l`` the ``source`` run's. The sender layer is the
        largest layer of the change's senders. Layers a read has no ``z`` gradient for add nothing; terms
        a read never uses (it drops a layer at or below the sender, ``GradientOutput.drop_layer``) are 0.

        Each pair (change, layer) is independent, so per layer only that block's attention runs (up to
        its output projection's input), with the changes of every sender below it stacked along the
        batch (within the token budget, halved on out-of-memory), and is reduced against the gradients
        at once. A lone head's change (no post-attention norm) enters the q/k projections composed through
        its ``W_O`` rows (:meth:`_composed_z`: head_dim projected rows per head and layer instead of one per
        prompt position; ``Runner.compose_qk = False`` projects every copy's input instead). In a causal
        attention the query rows before the first position where a change of the chunk is nonzero (clean and
        corrupted prompts sharing a prefix; per length group, read from the changes themselves) have no term:
        they are skipped (their attention too where its mask is a tensor; ``Runner.qk_changed_rows_only =
        False`` computes every row).
        ``Runner.fast_qk = False``: the plain reference, one full forward per change. With
        ``backend="nnsight"`` (also remote) one nnsight trace per chunk of changes instead.

        Returns:
            (R, C, n) float64.
        """
        if source not in SOURCES:
            raise OptionError(f"unknown source {source!r}; choose 'clean' or 'corrupted'.")
        if self.model.backend == "nnsight":
            return self._qk_fix_nnsight(source, changes, reads, label)
        L, n = self.ad.n_layers, len(self.task)
        R, C = len(reads), len(changes)
        out = torch.zeros(R, C, n, dtype=torch.float64)
        lay = [max(m.layer for m in ch.senders) for ch in changes]
        todo = [c for c in range(C) if lay[c] + 1 < L]
        if not todo or not R:
            return out
        drop = [r.drop_layer for r in reads]
        use = torch.tensor([[d is None or d > lay[c] for c in range(C)] for d in drop], dtype=torch.bool)
        if not self.fast_qk:
            out = self._qk_fix_plain(source, changes, reads, lay, todo, label)
            return out * use[..., None]
        try:
            return self._qk_fix_local(source, changes, reads, label, lay, todo, use, out)
        finally:
            self._qk_bufs.clear()

    def _qk_fix_local(self, source: str, changes: Sequence[SenderChange], reads: Sequence[GradientOutput],
                      label: str, lay: list[int], todo: list[int], use: torch.Tensor, out: torch.Tensor
                      ) -> torch.Tensor:
        """:meth:`qk_fix`'s fast route on the local backend (``out`` (R, C, n) zeros, filled and returned)."""
        # lone heads (their change is z' - z through their own W_O rows) first: their q/k projections compose
        lone = [c for c in todo if self._composable(changes[c])]
        order = sorted(lone, key=lambda c: lay[c]) + sorted(set(todo) - set(lone), key=lambda c: lay[c])
        kept = self._qk_layers.pop(source, {})  # the previous call's, on the same base run
        self._qk_layers.clear()
        self._qk_cross_bytes = 0
        memos: dict[int, dict[int, dict[Any, Any]]] = {}
        with progress_bar(len(order) * len(self.groups), label, self.progress) as bar:
            for g, idx in enumerate(self.groups):
                it = torch.tensor(idx)
                P = self.local_prefix(g, source)
                B, T = P.batch, P.resid[0].shape[1]
                pos = 0
                # per layer: what the composed q/k of its chunks share
                memo: dict[int, dict[Any, Any]] = memos.setdefault(g, kept.get(g, {}))
                while pos < len(order):
                    chunk = order[pos:pos + max(1, self.token_budget // (B * T) - 1)]
                    if pos < len(lone) < pos + len(chunk):
                        chunk = chunk[:len(lone) - pos]
                    compose = pos < len(lone)
                    chunk, part, budget = halving(
                        chunk, lambda ch, g=g, compose=compose, memo=memo: self._qk_chunk(
                            g, source, [changes[c] for c in ch], [lay[c] for c in ch], reads, compose=compose,
                            memo=memo),
                        lambda ch: len(ch) + 1, B, T)  # the chunk's copies and the unchanged one
                    if budget is not None:
                        self.token_budget = budget
                    ci = torch.tensor(chunk)
                    out[:, ci[:, None], it[None, :]] = part.cpu()
                    pos += len(chunk)
                    bar.update(len(chunk))
        if self.ad.device.type == "cpu":  # for a next call on the same base run (one at a time; not in device memory)
            self._qk_layers = {source: _base_run_only(memos)}
        return out * use[..., None]

    def _composable(self, change: SenderChange) -> bool:
        """Whether ``change`` is one head whose residual write is ``(z' - z) W_O^h`` (no post-attention norm),
        so that :meth:`_qk_chunk` may compose its q/k projections (``Runner.compose_qk``)."""
        c = change.senders[0]
        return (self.compose_qk and len(change.senders) == 1 and c.kind == "head"
                and not self.ad.has_post_attn_norm)

    def _qk_chunk(self, g: int, source: str, changes: Sequence[SenderChange], lays: Sequence[int],
                  reads: Sequence[GradientOutput], compose: bool = False,
                  memo: dict[int, dict[Any, Any]] | None = None) -> torch.Tensor:
        """The QK-fix terms (R, k, B) of ``changes`` (senders' layers ``lays``) on group ``g``: per downstream
        layer one call of its block's attention on the stacked inputs ``x_l + change`` and one unchanged
        copy ``x_l``, whose values (v) every copy takes (only the last copy's are computed where the adapter
        can: :meth:`Adapter.attention_z`). ``compose`` (every change a lone head, :meth:`_composable`): the
        copies' q/k projections are composed (:meth:`_composed_z`) instead of computed from their inputs;
        ``memo`` (per layer) keeps what chunks of the same group share."""
        ad = self.ad
        P = self.local_prefix(g, source)
        B, L, k = P.batch, ad.n_layers, len(changes)
        order = sorted(range(k), key=lambda j: lays[j])  # senders below a layer are then a leading block
        part = torch.zeros(len(reads), k, B, dtype=torch.float64, device=ad.device)
        cdt = torch.float64 if ad.dtype == torch.float64 else torch.float32
        heads = self._head_changes(g, source, [changes[j] for j in order]) if compose else None
        per_chunk: dict[Any, Any] = {} if heads is None else {"W": heads[1]}
        d: torch.Tensor | None = None
        T = P.resid[0].shape[1]
        # the query rows before the first position where a change of the chunk is nonzero are skipped
        # (Runner.qk_changed_rows_only): composed route from the heads' dz, plain route from the changes
        first = {"composed": 0 if heads is None else self._first_changed_row(heads[0]), "plain": 0}
        if heads is not None and first["composed"] == T:
            return part  # no change anywhere: every term is zero
        # the composed route runs the rows from the first change on, with the prefix's earlier keys and values
        suffix = False
        if heads is not None and first["composed"] > 0 and self.suffix_rows:
            with torch.no_grad(), self.model.evaluating():
                suffix = ad.suffix_ready(P, lays[order[0]] + 1, first["composed"])

        # the pattern route for short prompts only (Runner.qk_patterns, Runner.qk_pattern_keys)
        short = T <= self.qk_pattern_keys * ad.head_dim
        with torch.no_grad(), self.model.evaluating():
            for layer in range(lays[order[0]] + 1, L):
                kk = sum(lays[j] < layer for j in order)
                # one product per distinct gradient tensor (reads that drop a layer below this one share the
                # full gradient here); none for reads whose drop is at or below every sender (unused) or is
                # this layer (the gradient inside a dropped block is zero)
                uniq: dict[int, list[int]] = {}
                for i, rd in enumerate(reads):
                    if Site(layer, "z") in rd.grads and (rd.drop_layer is None or lays[order[0]] < rd.drop_layer != layer):
                        uniq.setdefault(id(rd.grads[Site(layer, "z")][g]), []).append(i)
                if not uniq:
                    continue
                grads = [reads[rs[0]].grads[Site(layer, "z")][g] for rs in uniq.values()]
                patterns = self.qk_patterns and short and layer not in self._no_patterns
                lmemo: dict[Any, Any] = {} if memo is None else memo.setdefault(layer, {})
                # the pattern route forms the query rows from the first one any gradient reads (Runner.qk_read_rows)
                read = _first_read_row(lmemo, grads) if self.qk_read_rows else 0
                if read == T:
                    continue  # no gradient anywhere: every term is zero
                queries = T - read if patterns and read > 0 else None
                x = P.resid[layer]
                z = None
                kept0 = None  # the unchanged copy's pattern, where this chunk's ran without it
                if heads is not None and layer not in self._no_compose:
                    who = tuple((changes[j].senders[0].layer, changes[j].senders[0].head) for j in order[:kk])
                    composed = functools.partial(self._composed_z, P, layer, x, heads[0][:kk], heads[1][:kk],
                                                 lmemo, who, first["composed"], chunk=per_chunk)
                    # the unchanged copy's pattern is the same for every chunk of the layer: formed with the first
                    # (whose last copy the pattern route's checks read), then kept (Runner.qk_unchanged_once)
                    a0key = ("A0", first["composed"], suffix, queries)
                    kept0 = lmemo.get(a0key) if patterns and self.qk_unchanged_once else None
                    try:
                        z = composed(suffix, patterns=patterns, queries=queries, unchanged=kept0 is None)
                        if not isinstance(z, tuple):
                            kept0 = None  # not the pattern route: the chunk's own unchanged copy, as below
                        elif kept0 is None and self.qk_unchanged_once:
                            lmemo[a0key] = z[0][kk * B:].clone()
                        if z is True:  # no pattern route in this layer: its output
                            self._no_patterns.add(layer)
                            z = composed(suffix)
                    except SuffixRefused:  # an attention call of an unexpected layout: every row, from now on
                        ad.refuse_suffix()
                        suffix = False
                        kept0 = None
                        z = composed(False)
                    if z is None:  # the attention does not read its norm's output as composed: plain route
                        self._no_compose.add(layer)
                if z is None:
                    if d is None:
                        d = self._stacked_changes(g, source, [changes[j] for j in order])
                        first["plain"] = self._first_changed_row(d)
                        if first["plain"] == T:
                            return part
                    hidden = x.new_empty((kk + 1) * B, *x.shape[1:])
                    torch.add(d[:kk], x, out=hidden[:kk * B].unflatten(0, (kk, B)))
                    hidden[kk * B:] = x
                    if patterns:
                        z = self.ad.attention_patterns(P, layer, kk + 1, hidden, first["plain"], lmemo, queries)
                        if z is True:  # no pattern route in this layer: its output
                            self._no_patterns.add(layer)
                            z = None
                    if z is None:
                        z = self.ad.attention_z(P, layer, kk + 1, hidden, shared_values=True, first_row=first["plain"])
                patterns = isinstance(z, tuple)
                # the rows before r were skipped (their terms are zero)
                r = T - (z[0].shape[2] if patterns else z.shape[1])
                # each copy's change of its output, or on the pattern route of its pattern (the term is then the
                # sum of (A' - A) * (grad_z . V) over heads, query rows and keys): (kk, B, (T - r) * H * dh) or
                # (kk, B, H * (T - r) * Tk), reduced in float64 for a float64 model, else in float32
                if kept0 is not None:  # the changed copies alone, against the pattern kept from the first chunk
                    dz = (z[0].unflatten(0, (kk, B)) - kept0).to(cdt).flatten(2)
                else:
                    zz = (z[0] if patterns else z).unflatten(0, (kk + 1, B))
                    dz = (zz[:kk] - zz[kk:]).to(cdt).flatten(2)
                G = grads
                if patterns:
                    G = [_pattern_weights(lmemo, grad, z[1], r, cdt) for grad in G]
                else:
                    G = [grad[:, r:].to(ad.device, cdt) for grad in G]
                got = torch.einsum("kbx,rbx->rkb", dz, torch.stack(G).flatten(2)).to(torch.float64)
                rows = torch.tensor(order[:kk], device=ad.device)
                for u, rs in enumerate(uniq.values()):
                    for i in rs:
                        part[i, rows] += got[u]
        return part

    def _first_changed_row(self, change: torch.Tensor) -> int:
        """The first position where any of the stacked changes ``change`` (k, B, T, ...) is nonzero (T: none),
        or 0 where ``Runner.qk_changed_rows_only`` is False. Before it every copy's block input equals the
        unchanged one, so in a causal attention those query rows (and their keys) are the unchanged copy's
        and their QK-fix terms are zero."""
        return first_true(change.ne(0).flatten(0, 1)) if self.qk_changed_rows_only else 0

    def _head_changes(self, g: int, source: str, changes: Sequence[SenderChange]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """For lone-head changes: ``(dz (k, B, T, head_dim), W (k, head_dim, d))``, each head's output change
        (zero outside the change's positions) and its own ``W_O`` rows, so that its write is ``dz @ W``."""
        ad = self.ad
        Pb = self.local_prefix(g, source)
        B, T = Pb.resid[0].shape[:2]
        dz = torch.zeros(len(changes), B, T, ad.head_dim, dtype=ad.dtype, device=ad.device)
        W = torch.empty(len(changes), ad.head_dim, ad.d_model, dtype=ad.dtype, device=ad.device)
        W_O: dict[int, torch.Tensor] = {}
        for j, ch in enumerate(changes):
            c = ch.senders[0]
            s = Site(c.layer, "z")
            if c.layer not in W_O:
                W_O[c.layer] = ad.W_O(c.layer)
            W[j] = W_O[c.layer][c.head]
            h = c.head
            assert h is not None
            diff = (self.local_prefix(g, ch.value).captures[s].reshape(B, T, ad.n_heads, ad.head_dim)[:, :, h]
                    - Pb.captures[s].reshape(B, T, ad.n_heads, ad.head_dim)[:, :, h])  # the head's columns alone
            if ch.positions is None:
                dz[j] = diff
            else:
                p = list(ch.positions)
                dz[j, :, p] = diff[:, p]
        return dz, W

    def _composed_z(self, P: Any, layer: int, x: torch.Tensor, dz: torch.Tensor, W: torch.Tensor,
                    memo: dict[Any, Any], who: tuple[tuple[int, int], ...] = (), first: int = 0,
                    suffix: bool = False, patterns: bool = False, queries: int | None = None,
                    chunk: dict[Any, Any] | None = None, unchanged: bool = True) -> Any:
        """Layer ``layer``'s heads' output z ((k+1)*B, T, H*dh) for the block inputs ``x + dz_j @ W_j`` (each
        lone head j of ``dz`` (k, B, T, head_dim) with its ``W_O`` rows ``W`` (k, head_dim, d)), then ``x``,
        every copy's values the last copy's, with the q/k projections composed instead of projected:

        ``proj(norm(x + D)) = (lin(gamma * P(x)) + dz @ lin(gamma * P(W))) / sigma(x + D) + proj(beta)``

        with the norm ``gamma * P(.) / sigma(.) + beta`` of :meth:`Adapter.attn_input_affine`, ``lin`` the
        projection without its bias and ``P`` the norm's centring (or the identity); ``sigma(x + D)^2`` from
        ``sigma(x)^2``, ``dz . (P(x) W^T)`` and ``dz W W^T dz`` (no (k, B, T, d) tensor is formed). The
        projection then costs head_dim rows per head instead of B*T, and only the attention runs on every
        copy (:meth:`Adapter.attention_z_given`). None where the adapter cannot take given projections or
        the last copy's composed q/k differ from the module's own. ``memo``: kept by the caller for calls
        with the same layer and ``x`` (what depends on them alone is computed once). ``who``: the heads of
        ``W`` as (layer, head); their composed weights ``lin(gamma * P(W))`` depend on the weights alone and are
        kept on the runner (within :data:`QK_WEIGHT_CACHE` bytes) for its next QK fix (the other direction).
        ``unchanged`` False (pattern route only, once the layer's memo has checked the unchanged copy): the
        copies are the k changed ones alone ((k*B, H, Tq, Tk) patterns). ``chunk``: kept by the caller for the
        layers of one chunk of changes, ``{"W": its every head's W_O rows}``
        (``W`` their first k): the centred rows and their Gram matrices are formed once per chunk.

        ``first``: ``dz`` is zero at the positions before it, so there the changed copies' q/k are the last
        copy's (copied, or composed from a zero change where the layout makes every row in place faster);
        the result is the rows ``first..`` only where the attention is causal, (copies*B, T - first, H*dh)
        (:meth:`Adapter.attention_z_given`). ``suffix`` (after ``Adapter.suffix_ready``): the q/k of the rows
        ``first..`` only are formed and the attention runs on those rows, taking the prefix's keys and values
        of the earlier rows (which every copy shares); the result is then always (copies*B, T - first, H*dh)."""
        ad = self.ad
        if not ad.can_compose_qk(layer):
            return None
        k, B, T, dh = dz.shape
        d = ad.d_model
        r = first
        cdt = torch.float64 if ad.dtype == torch.float64 else torch.float32
        if "xs" not in memo:  # what depends on the layer and x alone
            aff = ad.attn_input_affine(layer)
            gamma, beta, eps, centre = ((torch.ones(d, dtype=cdt, device=x.device), None, 0.0, False)
                                        if aff is None else aff)
            xs = x.to(cdt)
            if centre:
                xs = xs - xs.mean(-1, keepdim=True)
            memo.update(xs=xs.flatten(0, 1), gamma=gamma.to(cdt), eps=eps, centre=centre, norm=aff is not None,
                        var0=xs.pow(2).mean(-1).flatten(), normed=ad.block_norm(layer, "attn", x))
            inv0 = (torch.rsqrt(memo["var0"] + eps) if memo["norm"]
                    else torch.ones(B * T, dtype=cdt, device=x.device)).unsqueeze(-1)  # (B*T, 1)
            zero = torch.zeros(1, d, dtype=ad.dtype, device=x.device)
            for site, qk in ad.qk_sites(layer):
                bias = ad.project_columns(site, zero, qk).to(cdt)  # (1, n): n query and key columns
                const = bias if beta is None else ad.project_columns(site, beta.to(ad.dtype)[None], qk).to(cdt)
                base = ad.project_columns(site, (xs * memo["gamma"]).to(ad.dtype), qk).to(cdt).flatten(0, 1) - bias
                # base (B*T, n); the unchanged copy's q/k (B*T, n): const + base / sigma(x)
                memo[("proj", site)] = bias, const, base, torch.addcmul(const, inv0, base)
            memo["inv0"] = inv0
        if ("rows", r) not in memo:  # the rows from r on of what depends on the layer and x alone
            def cut(t: torch.Tensor) -> torch.Tensor:
                return t if r == 0 else t.unflatten(0, (B, T))[:, r:].flatten(0, 1)
            memo[("rows", r)] = cut(memo["xs"]), cut(memo["var0"]), {
                site: cut(memo[("proj", site)][2]) for site, _ in ad.qk_sites(layer)}
        xs, var0, bases = memo[("rows", r)]
        gamma = memo["gamma"]
        dzc = dz[:, :, r:].to(cdt).flatten(1, 2)  # (k, B*(T-r), dh)
        n_rows = dzc.shape[1]
        chunk = {"W": W} if chunk is None else chunk
        key = ("centred", memo["centre"], cdt)
        if key not in chunk:  # W's rows centred (LayerNorm) and their Gram matrices W W^T
            Wa = chunk["W"].to(cdt)
            Wa = Wa - Wa.mean(-1, keepdim=True) if memo["centre"] else Wa
            chunk[key] = Wa, torch.matmul(Wa, Wa.transpose(1, 2))
        Wc, gram = (t[:k] for t in chunk[key])
        if memo["norm"]:
            cross = (dzc * self._x_dot_w(memo, who, r, xs, Wc, B, T)).sum(-1)  # (k, B*(T-r))
            quad = (torch.matmul(dzc, gram) * dzc).sum(-1)
            inv = torch.rsqrt(var0 + (2 * cross + quad) / d + memo["eps"]).unsqueeze(-1)  # (k, B*(T-r), 1)
        else:
            inv = torch.ones(k, n_rows, 1, dtype=cdt, device=x.device)
        scaled = inv * dzc  # (k, B*(T-r), dh): 1 / sigma folded into dz
        every: list[torch.Tensor] = []

        def every_row() -> list[torch.Tensor]:
            """``inv`` and ``scaled`` over every row (before r: the unchanged copy's scale and no change)."""
            if not every:
                if r == 0:
                    every.extend((inv, scaled))
                else:
                    ia = torch.empty(k, B, T, 1, dtype=cdt, device=x.device)
                    ia[:, :, :r] = memo["inv0"].view(B, T, 1)[:, :r]
                    ia[:, :, r:] = inv.view(k, B, T - r, 1)
                    sa = scaled.new_zeros(k, B, T, dh)
                    sa[:, :, r:] = scaled.view(k, B, T - r, dh)
                    every.extend((ia.view(k, B * T, 1), sa.view(k, B * T, dh)))
            return every

        given: dict[Site, torch.Tensor] = {}
        for slot, (site, qk) in enumerate(ad.qk_sites(layer)):
            bias, const, base, y0 = memo[("proj", site)]
            wkey = (layer, site, who)
            M = self._qk_weights.get(wkey) if who else None
            if M is None:
                M = ad.project_columns(site, (Wc * gamma).to(ad.dtype).reshape(-1, d), qk, bias=False).to(cdt)  # (k*dh, n)
                size = M.numel() * M.element_size()
                if who and x.device.type == "cpu" and self._qk_weight_bytes + size <= QK_WEIGHT_CACHE:
                    self._qk_weights[wkey] = M
                    self._qk_weight_bytes += size
            width = ad.module_width(site)
            rows = T - r if suffix else T  # the given tensor's rows
            full = self._qk_workspace(slot, (k + 1 if unchanged else k, B, rows, width), cdt, x.device)
            Mk = M.reshape(k, dh, -1)
            y0v = y0.view(B, T, -1)
            # the pattern route reads the queries of the last ``queries`` rows only: where those are at most half
            # of the changed rows, the changed copies' query columns are formed there alone (the rest stay as the
            # workspace holds them, finite and never read)
            split = None
            if queries is not None and 2 * queries <= T - r:
                if ("split", site) not in memo:
                    memo[("split", site)] = _query_split(ad, layer, site, qk)
                split = memo[("split", site)]
            if split is None:
                self._fill_qk(full, qk, Mk, const, base, bases[site], y0v, inv, scaled, every_row, r, suffix)
            else:
                qpos, kpos = split
                if kpos is not None:  # the key columns at every row, as above
                    self._fill_qk(full, _sub(qk, kpos), Mk[..., kpos], const[:, kpos], base[:, kpos],
                                  bases[site][:, kpos], y0v[..., kpos], inv, scaled, every_row, r, suffix)
                qcols, Mq, cq = _sub(qk, qpos), Mk[..., qpos], const[:, qpos]
                inv4, sc4 = inv.view(k, B, T - r, 1), scaled.view(k, B, T - r, dh)
                bq = bases[site].view(B, T - r, -1)[..., qpos]
                for t in range(T - queries, T):  # one query row of every copy and prompt at a time
                    y = torch.addcmul(cq, inv4[:, :, t - r], bq[None, :, t - r])
                    y.baddbmm_(sc4[:, :, t - r], Mq)
                    full[:k, :, t - (T - rows), qcols] = y
            if unchanged:
                full[k, ..., qk] = y0v[:, T - rows:]  # the unchanged copy
            given[site] = (full.view(-1, rows, width) if cdt == ad.dtype else full.view(-1, rows, width).to(ad.dtype))
        normed = memo["normed"]
        if patterns:  # (pattern, values), True (no pattern route here) or None (as below)
            got = ad.attention_patterns_given(P, layer, full.shape[0], normed, given, memo.setdefault("given", {}),
                                              first_row=r, suffix=suffix, queries=queries)
            return None if got is False else got
        assert unchanged, "the output route always runs the unchanged copy"
        return ad.attention_z_given(P, layer, k + 1, normed, given, memo.setdefault("given", {}), first_row=r,
                                    suffix=suffix)

    @staticmethod
    def _fill_qk(full: torch.Tensor, qk: slice | torch.Tensor, Mk: torch.Tensor, const: torch.Tensor,
                 base: torch.Tensor, base_r: torch.Tensor, y0v: torch.Tensor, inv: torch.Tensor, scaled: torch.Tensor,
                 every_row: Callable[[], list[torch.Tensor]], r: int, suffix: bool) -> None:
        """:meth:`_composed_z`'s changed copies' columns ``qk`` of the given q/k ``full`` (k+1, B, rows, width):
        ``const + base / sigma + dz W / sigma`` (``Mk`` (k, dh, n), ``const`` (1, n), ``base`` (B*T, n) and
        ``base_r`` its rows from r, ``y0v`` (B, T, n) the unchanged copy's, ``inv`` (k, B*(T-r), 1) and ``scaled``
        (k, B*(T-r), dh) from row r on; ``every_row()`` both over every row)."""
        k = Mk.shape[0]
        B, T = y0v.shape[:2]
        width = full.shape[-1]
        # three ways to the same numbers (the fastest measured on the CPU for each layout)
        if suffix:  # the rows from r on only, in place (or placed, for columns of an index)
            if isinstance(qk, slice):
                y = full.view(full.shape[0], B * (T - r), width)[:k, :, qk]
                torch.addcmul(const, inv, base_r[None], out=y)
                y.baddbmm_(scaled, Mk)
            else:
                y = torch.addcmul(const, inv, base_r[None])
                y.baddbmm_(scaled, Mk)
                full[:k, ..., qk] = y.view(k, B, T - r, -1)
        elif isinstance(qk, slice) and (r == 0 or Mk.shape[-1] != width):  # every row, in place (fused q/k/v)
            ia, sa = every_row()
            y = full.view(full.shape[0], B * T, width)[:k, :, qk]
            torch.addcmul(const, ia, base[None], out=y)  # const + base / sigma
            y.baddbmm_(sa, Mk)  # + dz W / sigma, the changed copies
        elif isinstance(qk, slice):  # a projection of queries or keys only: the rows from r on, in place
            y = full[:k, :, r:]
            torch.addcmul(const, inv.view(k, B, T - r, 1), base_r.view(B, T - r, -1), out=y)
            y += torch.bmm(scaled, Mk).view(k, B, T - r, -1)
            full[:k, :, :r] = y0v[:, :r]  # the changed copies before r: the unchanged copy's (dz is zero)
        else:  # columns of an index (NeoX's interleaved heads): the rows from r on, then placed
            y = torch.addcmul(const, inv, base_r[None])
            y.baddbmm_(scaled, Mk)
            full[:k, :, r:, qk] = y.view(k, B, T - r, -1)
            full[:k, :, :r, qk] = y0v[:, :r]

    def _x_dot_w(self, memo: dict[Any, Any], who: tuple[tuple[int, int], ...], r: int, xs: torch.Tensor,
                 Wc: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """``xs @ Wc^T`` (k, B*(T-r), dh) for :meth:`_composed_z`'s norm scale: the layer's centred block input
        (its rows from r) against the heads ``who``'s centred ``W_O`` rows. Depends on the base run and the
        weights alone: formed over every row (r 0) it is kept in the layer's ``memo`` (within
        :data:`QK_WEIGHT_CACHE` bytes per call, on the CPU), which the next QK fix on the same base run inherits
        (:func:`_base_run_only`), and its rows from r are read from there."""
        if who and ("cross", who) in memo:
            full = memo[("cross", who)]
            return full if r == 0 else full.unflatten(1, (B, T))[:, :, r:].flatten(1, 2)
        got = torch.matmul(xs, Wc.transpose(1, 2))
        size = got.numel() * got.element_size()
        if who and r == 0 and xs.device.type == "cpu" and self._qk_cross_bytes + size <= QK_WEIGHT_CACHE:
            memo[("cross", who)] = got
            self._qk_cross_bytes += size
        return got

    def _qk_workspace(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
                      ) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` for the composed q/k of projection ``slot`` of a layer, in a buffer
        kept for the rest of the QK fix (:meth:`qk_fix` drops it at the end): every layer and chunk writes the
        same pages instead of a fresh allocation of tens of MB each (the kernel's page faults took a tenth of
        the QK fix's time). Nothing that outlives the layer's attention call may alias it (the attention's
        output and patterns are new tensors)."""
        n = math.prod(shape)
        key = (slot, dtype, device)
        buf = self._qk_bufs.get(key)
        if buf is None or buf.numel() < n:
            self._qk_bufs[key] = buf = torch.zeros(n, dtype=dtype, device=device)  # finite where left unwritten
        return buf[:n].view(shape)

    def _stacked_changes(self, g: int, source: str, changes: Sequence[SenderChange]) -> torch.Tensor:
        """:meth:`sender_change` of each change, stacked (k, B, T, d), not cached. A lone head of a layer without
        a post-attention norm is projected through its own ``W_O`` rows only (all such heads of a layer in
        one product); the rest go through :meth:`sender_change`."""
        ad = self.ad
        Pb = self.local_prefix(g, source)
        B, T = Pb.resid[0].shape[:2]
        out = torch.empty(len(changes), B, T, ad.d_model, dtype=ad.dtype, device=ad.device)
        lone: dict[tuple[int, str], list[tuple[int, int]]] = {}
        with torch.no_grad():
            for j, ch in enumerate(changes):
                c = ch.senders[0]
                if len(ch.senders) == 1 and c.kind == "head" and not ad.has_post_attn_norm:
                    lone.setdefault((c.layer, ch.value), []).append((j, c.head))  # type: ignore[arg-type]
                    continue
                key = (g, source, ch)
                had = key in self._changes
                out[j] = self.sender_change(g, source, ch)
                if not had:
                    del self._changes[key]
            for (layer, value), items in lone.items():
                s = Site(layer, "z")
                Po = self.local_prefix(g, value)
                hs = torch.tensor([h for _, h in items], device=ad.device)
                dz = (Po.captures[s] - Pb.captures[s]).reshape(B, T, ad.n_heads, ad.head_dim)[:, :, hs]
                out[torch.tensor([j for j, _ in items])] = torch.einsum("bthk,hkd->hbtd", dz, ad.W_O(layer)[hs])
            for j, ch in enumerate(changes):
                if ch.positions is not None:
                    mask = torch.ones(T, dtype=torch.bool, device=ad.device)
                    mask[list(ch.positions)] = False
                    out[j, :, mask] = 0
        return out

    def _qk_fix_plain(self, source: str, changes: Sequence[SenderChange], reads: Sequence[GradientOutput],
                      lay: list[int], todo: list[int], label: str, chunk: int = 16) -> torch.Tensor:
        """The plain reference of :meth:`qk_fix`: one forward per change from its sender's layer + 1 to the
        end, every block input pinned to the ``source`` run's and a delivery of the change to every
        downstream head's q and k; ``chunk`` changes per call, reduced at once."""
        L, H, n = self.ad.n_layers, self.ad.n_heads, len(self.task)
        out = torch.zeros(len(reads), len(changes), n, dtype=torch.float64)
        zs = tuple(Site(layer, "z") for layer in range(min(lay[c] for c in todo) + 1, L))
        copies = []
        for c in todo:
            copy: list[Any] = []
            for layer in range(lay[c] + 1, L):
                copy.append(Intervention(Site(layer, "resid_pre"), None, None, source))
                copy.append(Delivery(changes[c], "heads", layer, tuple(range(H)), ("q", "k")))
            copies.append(tuple(copy))
        base, = self.run(source, [()], capture=zs, capture_positions="all")
        for j in range(0, len(copies), chunk):
            outs = self.run(source, copies[j:j + chunk], label=label, capture=zs, capture_positions="all")
            for c, o in zip(todo[j:j + chunk], outs):
                for g, idx in enumerate(self.groups):
                    it = torch.tensor(idx)
                    for s in zs:
                        if s.layer <= lay[c]:
                            continue
                        dz = (o.captures[s][g] - base.captures[s][g]).to(torch.float64)
                        for r, read in enumerate(reads):
                            if s in read.grads:
                                out[r, c, it] += (dz * read.grads[s][g].to(torch.float64)).sum((-1, -2))
        return out


def _pattern_weights(memo: dict[Any, Any], grad: torch.Tensor, values: torch.Tensor, r: int,
                     cdt: torch.dtype) -> torch.Tensor:
    """The QK fix's pattern route: ``M[b, h, t, s] = grad_z[b, t, h] . V[b, h // g, s]`` for the query rows
    ``t = r..T-1`` of ``grad`` (B, T, H*dh) and the values ``values`` (B, H_kv, Tk, dh), flattened to
    (B, H * (T - r) * Tk) in the order of :meth:`Adapter.attention_patterns_given`'s pattern; kept in ``memo``
    (one layer and group) for the chunks that share it."""
    key = ("M", r, id(grad))
    if key not in memo:
        B, Hk, Tk, dh = values.shape
        G = grad[:, r:].to(values.device, cdt)
        G = G.reshape(B, G.shape[1], Hk, G.shape[-1] // (Hk * dh), dh)
        memo[key] = torch.einsum("btkjd,bksd->bkjts", G, values.to(cdt)).reshape(B, -1)
    return memo[key]


def _query_split(ad: Any, layer: int, site: Site, qk: slice | torch.Tensor) -> tuple[slice, slice | None] | None:
    """Where the query columns of ``site`` are a leading block of its q/k columns ``qk``: (their positions in
    ``qk``, the key columns' positions or None where there are none); None otherwise (a key projection, or
    NeoX's interleaved heads)."""
    qsite, qcols = ad.head_columns(layer, "q")
    if qsite != site:
        return None
    cols = list(range(*qk.indices(ad.module_width(site)))) if isinstance(qk, slice) else qk.tolist()
    q = set(qcols)
    n = sum(c in q for c in cols)
    if n == 0 or any(c not in q for c in cols[:n]):
        return None
    return slice(0, n), (slice(n, len(cols)) if n < len(cols) else None)


def _sub(qk: slice | torch.Tensor, pos: slice) -> slice | torch.Tensor:
    """The columns at positions ``pos`` of the columns ``qk`` (a slice of a slice stays a slice)."""
    if isinstance(qk, slice) and (qk.step or 1) == 1:
        a = qk.start or 0
        return slice(a + pos.start, a + pos.stop)
    if isinstance(qk, slice):
        raise ValueError("a stepped slice of q/k columns")
    return qk[pos]


#: what :meth:`Runner.qk_fix` keeps per layer that depends on its base run (and the weights) alone, handed to
#: the next call on the same base run (AtP* of an ablation, then of noising, on the clean run): the composed
#: route's block input, norm scale and unchanged projections, the attention's values and checks
#: (``"given"``), the checked pattern route, and ``xs @ W^T`` per chunk; never what depends on a read's
#: gradients (keyed by tensor ids)
BASE_RUN_KEYS = frozenset({"xs", "gamma", "eps", "centre", "norm", "var0", "normed", "inv0", "given", "patterns",
                           "proj", "rows", "split", "cross"})


def _base_run_only(memos: dict[int, dict[int, dict[Any, Any]]]) -> dict[int, dict[int, dict[Any, Any]]]:
    """Per group and layer, the entries of a QK fix's ``memo`` in :data:`BASE_RUN_KEYS` (by name, or a tuple's
    first element), or nothing where they would hold more than :data:`QK_WEIGHT_CACHE` bytes of tensors."""
    out = {g: {layer: {k: v for k, v in m.items() if (k[0] if isinstance(k, tuple) else k) in BASE_RUN_KEYS}
               for layer, m in per.items()} for g, per in memos.items()}
    seen: set[int] = set()

    def size(x: Any) -> int:
        if torch.is_tensor(x):
            if id(x) in seen:
                return 0
            seen.add(id(x))
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(size(v) for v in x.values())
        if isinstance(x, (tuple, list)):
            return sum(size(v) for v in x)
        return 0

    return out if size(out) <= QK_WEIGHT_CACHE else {}


def _first_read_row(memo: dict[Any, Any], grads: Sequence[torch.Tensor]) -> int:
    """The first position where any of ``grads`` (each (B, T, w)) is nonzero (T: none), kept in ``memo`` (one
    layer and group) for the chunks that share them. The QK fix's terms of the query rows before it are zero."""
    rows = []
    for x in grads:
        key = ("read from", id(x))
        if key not in memo:
            # reduced over prompts and columns by a max of magnitudes first (faster than a boolean any here)
            memo[key] = first_true(x.abs().amax((0, 2)).ne(0)[None])
        rows.append(memo[key])
    return min(rows)


def _drops_apart(drops: Sequence[int], sites: Sequence[Site], block_in: dict[int, torch.Tensor],
                 deltas: dict[Site, torch.Tensor], full: dict[Site, torch.Tensor]
                 ) -> dict[int, dict[Site, torch.Tensor]]:
    """GradDrop's gradients under each dropped layer l (the read sites of layers < l, and l's block input): one
    vector-Jacobian product of the blocks under l on the kept graph, with the full residual gradient at block
    l's output placed at its input (the skip connection alone). ``block_in``: each dropped layer's block input
    (after the read there, if any); ``full``: the full backward's gradient at every read site and block output."""
    below: dict[int, dict[Site, torch.Tensor]] = {}
    for layer in drops:
        under = [s for s in sites if s.layer < layer or s == Site(layer, "resid_pre")]
        xin = block_in[layer]
        got: tuple[Any, ...] = (None,) * len(under)
        if under and xin.requires_grad:
            got = torch.autograd.grad(xin, [deltas[s] for s in under], full[Site(layer + 1, "resid_pre")],
                                      retain_graph=True, allow_unused=True)
        below[layer] = {s: torch.zeros_like(deltas[s]) if v is None else v.detach() for s, v in zip(under, got)}
    return below


def _drops_together(drops: Sequence[int], sites: Sequence[Site], block_in: dict[int, torch.Tensor],
                    deltas: dict[Site, torch.Tensor], full: dict[Site, torch.Tensor], start: int
                    ) -> dict[int, dict[Site, torch.Tensor]]:
    """:func:`_drops_apart`'s gradients, block by block (``Runner.graddrop_together``): going down from the highest
    dropped layer, the residual gradients of every drop above a block (a batch, one row per drop) pass through
    it in one vector-Jacobian product (``is_grads_batched``), which also gives the block's read sites; at a
    dropped layer l the batch gains l's own row, the full residual gradient at block l's output (the skip
    connection alone), and l's reads inside its block get none. Each block is crossed once, by a batch
    instead of once per drop above it: the same products, in GEMMs of more rows. ``block_in``: the block
    inputs of layers ``start..max(drops)`` (after the read there, if any)."""
    below: dict[int, dict[Site, torch.Tensor]] = {layer: {} for layer in drops}
    order: list[int] = []  # the drop of each row of the batch
    batch: torch.Tensor | None = None  # (len(order), B, T, d): their residual gradients at block_in[layer + 1]
    for layer in range(drops[-1], start - 1, -1):
        xin = block_in[layer]
        inside = [s for s in sites if s.layer == layer and s.kind != "resid_pre"]
        if batch is not None:
            wrt = ([xin] if xin.requires_grad else []) + [deltas[s] for s in inside]
            got = torch.autograd.grad(block_in[layer + 1], wrt, batch, retain_graph=True, allow_unused=True,
                                      is_grads_batched=True) if wrt else ()
            if xin.requires_grad:  # (else nothing is read below: the first block's input from the prefix)
                batch, got = (torch.zeros_like(batch) if got[0] is None else got[0].detach()), got[1:]
            for s, v in zip(inside, got):
                for j, d in enumerate(order):
                    below[d][s] = torch.zeros_like(deltas[s]) if v is None else v[j].detach()
        if layer in below:
            g = full[Site(layer + 1, "resid_pre")].to(xin.device)[None]
            batch = g if batch is None else torch.cat([batch.to(xin.device), g])
            order.append(layer)
        if batch is not None and Site(layer, "resid_pre") in deltas:
            for j, d in enumerate(order):
                below[d][Site(layer, "resid_pre")] = batch[j]
    return below


def _pad_rows(x: torch.Tensor, r: int) -> torch.Tensor:
    """``x`` (B, T - r, ...) after ``r`` zero rows: (B, T, ...)."""
    out = x.new_zeros(x.shape[0], x.shape[1] + r, *x.shape[2:])
    out[:, r:] = x
    return out


def _zero_reads(edits: dict[Site, list[Callable]], sites: Sequence[Site], keep: set[Site],
                acts: dict[Site, torch.Tensor], deltas: dict[Site, torch.Tensor]) -> None:
    """Append to ``edits`` at each of ``sites`` a zero tensor added to the activation (``deltas[site]``, whose
    gradient is the metric's gradient there), keeping the activation in ``acts`` for the ``keep`` sites."""
    for s in sites:
        def read(x: torch.Tensor, s: Site = s) -> torch.Tensor:
            if s in keep:
                acts[s] = x.detach()
            deltas[s] = torch.zeros_like(x, requires_grad=True)
            return x + deltas[s]
        edits.setdefault(s, []).append(read)


def _fold_captures(edits: dict[Site, list[Callable]], caps: dict[Site, Callable]) -> None:
    """Move each capture at an edited site into that site's edits (after them, in one function)."""
    for s, fn in list(caps.items()):
        if s in edits:
            edits[s].append(lambda x, fn=fn: (fn(x), x)[1])
            del caps[s]


def _qk_columns(ad: Any, start: int) -> dict[Site, list[slice]]:
    """Per q/k (or fused qkv) site of layers ``start..L-1``: every head's query and key columns (AtP*'s QK fix
    freezes them)."""
    cols: dict[Site, list[slice]] = {}
    for layer in range(start, ad.n_layers):
        for h in range(ad.n_heads):
            for w in ("q", "k"):
                site, sl = ad.head_input_slice(layer, h, w)
                cols.setdefault(site, []).append(sl)
    return cols


def _column_mask(y: torch.Tensor, sls: Sequence[slice]) -> torch.Tensor:
    """A (width,) bool mask of ``y``'s last dimension, true on the columns ``sls``."""
    cm = torch.zeros(y.shape[-1], dtype=torch.bool, device=y.device)
    for sl in sls:
        cm[sl] = True
    return cm
