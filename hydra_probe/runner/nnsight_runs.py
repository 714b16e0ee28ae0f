"""The runner on the nnsight backend (also remote): plain-data traces and lazily fetched unedited runs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..interventions import Delivery, GradientRead, Intervention, SenderChange
from ..models.plumbing import Prefix
from ..models.sites import Site
from .base import SOURCES, Copy, check_finite, compose, progress_bar
from .gradients import GradientOutput

if TYPE_CHECKING:
    from .runner import Runner



class NnsightMixin:
    """The nnsight branches of :class:`Runner`."""

    # ---------------------------------------------------------------- nnsight (also remote): plain-data traces
    def _prefixes_nnsight(self, g: int) -> dict[str, Prefix]:
        """Clean and corrupted unedited forwards of group ``g`` as two traces of one session (one request).

        Only what is wanted comes back (:meth:`_needs`: the final residual's last position and whatever
        :meth:`run` declared); the rest is fetched on first access (:class:`RemotePrefix`).
        """
        got: dict[str, RemotePrefix] = {}
        for s in SOURCES:
            p = self._prefix.get((g, s))
            got[s] = p if isinstance(p, RemotePrefix) else RemotePrefix(self.model, self.task.batch(self.groups[g], s))
        fetch_prefixes(self.model, [(got[s], self._needs(g, s)) for s in SOURCES])
        final = Site(self.ad.n_layers, "resid_pre")
        for s, p in got.items():
            check_finite(p.last(final), f"the {s} run")
            self._prefix.setdefault((g, s), p)
        return got  # type: ignore[return-value]

    def _needs(self, g: int, source: str) -> dict[Site, set[str]]:
        """What the unedited ``source`` forward of group ``g`` must return now: {site: modes}."""
        L = self.ad.n_layers
        need: dict[Site, set[str]] = {Site(L, "resid_pre"): {"last"}}
        for s, modes in self._want.get((g, source), {}).items():
            need.setdefault(s, set()).update(modes)
        if source == "clean" and self.value_hint == "mean" and self.reference is self.task:
            for s in self.capture_sites():  # the sums the means need: (T, width) per site, not (B, T, width)
                need.setdefault(s, set()).add(self._sum_mode(g))
        return need

    def _sum_mode(self, g: int) -> str:
        """How group ``g``'s per-position sums come back: ``"sum"`` (float64, (T, width)) when that is smaller
        than the activations themselves (``"all"``, (B, T, width) in the model's dtype; summed here, equally)."""
        item = torch.empty((), dtype=self.ad.dtype).element_size()
        return "sum" if len(self.groups[g]) * item > 8 else "all"

    def _declare_nnsight(self, source: str, copies: Sequence[Copy], readout: bool, capture: frozenset[Site],
                         every: bool) -> None:
        """Record what ``run(source, copies, ...)`` will read of the unedited forwards, and fetch what existing
        prefixes lack now (one request per group) rather than site by site later."""
        L = self.ad.n_layers
        pos = "all" if every else "last"
        final = Site(L, "resid_pre")
        per: dict[str, dict[Site, set[str]]] = {s: {} for s in SOURCES}

        def want(src: str, site: Site, mode: str) -> None:
            per[src].setdefault(site, set()).add(mode)

        # an unedited copy capturing only what the unedited run holds reads it (else it runs as a trace)
        cached = any(not c for c in copies) and all(s.kind in ("z", "mlp_out", "resid_pre") for s in capture)
        want(source, final, pos if cached else "last")
        if self.metric.needs_clean:
            want("clean", final, "last")
        if readout:
            for l in range(L):
                want(source, Site(l, "z"), "last")
                want(source, Site(l, "mlp_out"), "last")
            want(source, Site(0, "resid_pre"), "last")
        if cached:
            for s in capture:
                want(source, s, pos)
        for c in copies:
            for iv in c:
                if isinstance(iv, Delivery):  # the senders' change: their writes in both runs, every position
                    for m in iv.change.senders:
                        site = Site(m.layer, "mlp_out" if m.kind == "mlp" else "z")
                        want(source, site, "all")
                        want(iv.change.value, site, "all")
                    if all(isinstance(x, Delivery) and x.target == "logits" for x in c):
                        # read from the unedited run, the change added here
                        for s in {final} | {s for s in capture if s.kind in ("z", "mlp_out", "resid_pre")}:
                            want(source, s, "all")
                    continue
                if not isinstance(iv, Intervention):
                    continue
                if iv.value in SOURCES:
                    want(iv.value, iv.site, "all")
                elif iv.value == "resample":
                    want("clean", iv.site, "all")
                elif iv.value == "mean":
                    self._mean_want.add(iv.site)
                    if self.reference is self.task and (self._means is None or iv.site not in self._means):
                        want("clean", iv.site, "sum")
        todo = []
        for g in range(len(self.groups)):
            for src, sites in per.items():
                d = self._want.setdefault((g, src), {})
                for s, modes in sites.items():
                    d.setdefault(s, set()).update({self._sum_mode(g) if m == "sum" else m for m in modes})
            for src in SOURCES:
                p = self._prefix.get((g, src))
                if isinstance(p, RemotePrefix):
                    todo.append((p, self._needs(g, src)))
        fetch_prefixes(self.model, todo)

    def _prefetch_change(self, source: str, change: SenderChange) -> None:
        """Before a sender change is computed from the unedited runs (nnsight): when some group lacks its
        senders' sites, fetch every z and MLP output at every position of both runs of every group in one
        request (a sweep over many changes then needs no more), unless :meth:`run` declared them already."""
        sites = {Site(m.layer, "mlp_out" if m.kind == "mlp" else "z") for m in change.senders}
        # an ablation value's replacement is formed from the clean run (resample donors, zeros' shape)
        runs = {source, change.value if change.value in SOURCES else "clean"}
        keys = [(g, src) for g in range(len(self.groups)) for src in runs]
        declared = all("all" in self._want.get(key, {}).get(x, ()) for key in keys for x in sites)
        lacking = any(isinstance(p := self._prefix.get(key), RemotePrefix) and not all(p.has(x, "all") for x in sites)
                      for key in keys)
        if declared and not lacking:
            return
        todo = []
        for g in range(len(self.groups)):
            for src in runs:
                d = self._want.setdefault((g, src), {})
                for x in self.capture_sites():
                    d.setdefault(x, set()).add("all")
                p = self._prefix.get((g, src))
                if isinstance(p, RemotePrefix):
                    todo.append((p, self._needs(g, src)))
        fetch_prefixes(self.model, todo)

    def _means_nnsight(self) -> Mapping[Site, torch.Tensor]:
        """:meth:`means` for nnsight: per site on first use, from per-group sums over the batch that the server
        computes (a (T, width) sum comes back, not the (B, T, width) activations)."""
        if self._means is None:
            ref = self.reference
            counts = torch.zeros(max(ref.lengths))
            for idx in ref.groups():
                counts[:len(ref.clean_ids[idx[0]])] += len(idx)
            self._mean_counts = counts
            self._mean_len = int((counts > 0).sum())
            self._means = _LazyMeans(self)  # type: ignore[assignment]
        return self._means  # type: ignore[return-value]

    def _mean_of(self, sites: set[Site]) -> dict[Site, torch.Tensor]:
        """Per-position means (T_max, width) of ``sites`` over the reference's clean prompts (nnsight)."""
        ref = self.reference
        counts = self._mean_counts
        Tmax = counts.shape[0]
        if ref is self.task:
            todo = [(self.prefix(g, "clean"), {s: {self._sum_mode(g)} for s in sites}) for g in range(len(self.groups))]
            fetch_prefixes(self.model, todo)
            sums = [(p.ids.shape[1], {s: p.get(s, "sum") for s in sites}) for p, _ in todo]
        else:
            from ..models.nnsight_backend import Job, run_jobs

            groups = ref.groups()
            miss = sorted({s for s in sites for gi in range(len(groups)) if (gi, s) not in self._mean_sums},
                          key=lambda s: s.order)
            if miss:
                with self.model.evaluating():
                    outs = run_jobs(self.model, [Job(ref.batch(idx, "clean"), keep={s: "sum" for s in miss})
                                                 for idx in groups])
                for gi, o in enumerate(outs):
                    for s in miss:
                        self._mean_sums[gi, s] = o[s][0]
            sums = [(len(ref.clean_ids[idx[0]]), {s: self._mean_sums[gi, s] for s in sites})
                    for gi, idx in enumerate(groups)]
        out = {}
        for s in sites:
            acc = None
            for T, d in sums:
                if acc is None:
                    acc = torch.zeros(Tmax, d[s].shape[-1], dtype=torch.float64)
                acc[:T] += d[s].cpu()
            out[s] = (acc / counts.clamp(min=1)[:, None]).to(self.ad.device, self.ad.dtype)
        return out

    def _forward_nnsight_cached(self, g: int, source: str, k: int, readout: bool,
                                capture: frozenset[Site] = frozenset(), every: bool = False) -> dict[str, Any]:
        """Unedited copies (nnsight): read from the unedited forward, the last position unless every position
        is asked for."""
        P = self.prefix(g, source)
        B, L = P.batch, self.ad.n_layers
        final = Site(L, "resid_pre")
        get = (lambda s: _full_of(P, s)) if every else (lambda s: last_of(P, s))
        x_last = last_of(P, final).repeat(k, 1)
        last = {s: last_of(P, s).repeat(k, 1) for s in capture}
        out = self._finish(g, P, x_last, last, L, k, readout)
        if capture:
            out["captures"] = {s: get(s).repeat(k, *([1] * (get(s).dim() - 1))).reshape(k, B, *get(s).shape[1:])
                               for s in capture}
        if every:
            xa = _full_of(P, final)
            out["resid_all"] = xa.repeat(k, 1, 1).view(k, B, *xa.shape[1:])
        return out

    # ---------------------------------------------------------------- nnsight (also remote): gradient reads, QK fix
    def _gradients_nnsight(self, source: str, reads: Sequence[GradientRead], label: str) -> list[GradientOutput]:
        """:meth:`gradients` as nnsight traces (one request per chunk of reads stacked along the batch).

        The metric is taken to the server as its gradient with respect to the unembedding's output at the
        last position (from the cached ``source`` run's final residual; see
        ``nnsight_backend.logit_weights``), so every metric works and no package code is sent."""
        from ..models.nnsight_backend import logit_weights

        L = self.ad.n_layers
        n, K = len(self.task), len(reads)
        metric = torch.empty(n, dtype=torch.float64)
        acts: dict[Site, list[torch.Tensor]] = {}
        grads: list[dict[Site, list[torch.Tensor]]] = [{} for _ in reads]
        with progress_bar(K * len(self.groups), label, self.progress) as bar:
            for g, idx in enumerate(self.groups):
                a, b = self.task.answer_ids[idx], self.task.alternative_ids[idx]
                clean = self.clean_logits()[idx] if self.metric.needs_clean else None
                x_last = last_of(self.prefix(g, source), Site(L, "resid_pre"))
                m0, tok, wts = logit_weights(self.model, x_last,
                                             lambda lg, a=a, b=b, c=clean: self.metric(lg, a, b, c))
                metric[torch.tensor(idx)] = m0

                def forward(chunk: list[int], start: int, g: int = g, tok: torch.Tensor = tok,
                            wts: torch.Tensor = wts) -> Any:
                    todo = [reads[i] for i in chunk]
                    need = any(len(acts.get(s, [])) <= g for r in todo for s in r.sites)  # the group's first
                    return self._gradient_job(g, source, todo, tok, wts, need)

                for chunk, (av, gr) in self._batched(g, [0] * K, [1] * K, forward):
                    for s, v in av.items():
                        if len(acts.setdefault(s, [])) == g:
                            acts[s].append(v)
                    for j, i in enumerate(chunk):
                        for s, v in gr[j].items():
                            grads[i].setdefault(s, []).append(v)
                    bar.update(len(chunk))
        return [GradientOutput(metric, {s: acts[s] for s in r.sites}, grads[i], r.drop_layer)
                for i, r in enumerate(reads)]

    def _gradient_job(self, g: int, source: str, reads: Sequence[GradientRead], tokens: torch.Tensor,
                      weights: torch.Tensor, need_acts: bool = True
                      ) -> tuple[dict[Site, torch.Tensor], list[dict[Site, torch.Tensor]]]:
        """One nnsight trace of ``reads`` stacked along the batch: (activations {site: (B, T, w)} when
        ``need_acts``, per read {site: gradient (B, T, w)}), with the same edits as :meth:`_gradient_forward`
        as plain data."""
        from ..models.nnsight_backend import GradJob, run_gradient_jobs

        ad = self.ad
        idx = self.groups[g]
        k, B, L = len(reads), len(idx), ad.n_layers
        sites = sorted({s for r in reads for s in r.sites}, key=lambda s: s.order)
        rows = {s: torch.cat([torch.arange(j * B, (j + 1) * B) for j, r in enumerate(reads) if s in r.sites])
                for s in sites}
        freeze: dict[Site, tuple[torch.Tensor, list[tuple[int, int]]]] = {}
        if any(r.freeze_patterns for r in reads):
            rowmask = torch.tensor([r.freeze_patterns for r in reads]).repeat_interleave(B)
            for layer in range(L):
                cols: dict[Site, list[slice]] = {}
                for h in range(ad.n_heads):
                    for w in ("q", "k"):
                        site, sl = ad.head_input_slice(layer, h, w)
                        cols.setdefault(site, []).append(sl)
                for site, sls in cols.items():
                    freeze[site] = (rowmask, [(sl.start, sl.stop) for sl in sls])
        drops = {layer: torch.tensor([r.drop_layer == layer for r in reads]).repeat_interleave(B)[:, None, None]
                 for layer in sorted({r.drop_layer for r in reads if r.drop_layer is not None})}
        job = GradJob(self.task.batch(idx, source), k, rows, tokens, weights, freeze, drops, need_acts)
        with self.model.evaluating():
            av, gv = run_gradient_jobs(self.model, [job])[0]
        per: list[dict[Site, torch.Tensor]] = [{} for _ in reads]
        for s in sites:
            held = [j for j, r in enumerate(reads) if s in r.sites]
            for pos, j in enumerate(held):
                per[j][s] = gv[s][pos * B:(pos + 1) * B]
        return av, per

    def _qk_fix_nnsight(self, source: str, changes: Sequence[SenderChange], reads: Sequence[GradientOutput],
                        label: str) -> torch.Tensor:
        """:meth:`qk_fix` as nnsight traces: per chunk of changes one trace of the ``source`` prompts stacked
        1 + k times (see ``nnsight_backend.QKJob``); the changes go out, the heads' outputs' changes come back
        and are reduced here with the gradients (not for a read that drops a layer at or below the sender:
        its term is 0)."""
        from ..models.nnsight_backend import QKJob, run_qk_jobs

        L, n = self.ad.n_layers, len(self.task)
        out = torch.zeros(len(reads), len(changes), n, dtype=torch.float64)
        first = [max(m.layer for m in ch.senders) + 1 for ch in changes]
        todo = [c for c in range(len(changes)) if first[c] < L]
        with progress_bar(len(todo) * len(self.groups), label, self.progress) as bar:
            for g, idx in enumerate(self.groups):
                it = torch.tensor(idx)

                def forward(chunk: list[int], start: int, g: int = g) -> dict[int, torch.Tensor]:
                    cs = [todo[j] for j in chunk]
                    d = []
                    for c in cs:  # not kept: each change is used by this chunk only
                        had = (g, source, changes[c]) in self._changes
                        d.append(self.sender_change(g, source, changes[c]))
                        if not had:
                            del self._changes[(g, source, changes[c])]
                    deltas = torch.stack(d)
                    job = QKJob(self.task.batch(self.groups[g], source), deltas, [first[c] for c in cs])
                    with self.model.evaluating():
                        return run_qk_jobs(self.model, [job])[0]

                # a chunk of k changes runs k + 1 copies (the unedited one too)
                for chunk, dz in self._batched(g, [0] * len(todo), [1] * len(todo), forward):
                    cs = [todo[j] for j in chunk]
                    for layer, v in dz.items():
                        rows = [c for c in cs if first[c] <= layer]
                        for r, read in enumerate(reads):
                            gz = read.grads.get(Site(layer, "z"))
                            used = [j for j, c in enumerate(rows) if read.drop_layer is None or read.drop_layer >= first[c]]
                            if gz is not None and used:
                                t = torch.einsum("mbtw,btw->mb", v[used].to(torch.float64), gz[g].to(torch.float64))
                                out[r, torch.tensor([rows[j] for j in used])[:, None], it[None, :]] += t
                    bar.update(len(chunk))
        return out

    def _plain_edits(self, g: int, source: str, copies: Sequence[tuple[Intervention, ...]], B: int) -> dict:
        """The copies' interventions as plain data for a stacked nnsight trace (see ``nnsight_backend.EditSpec``).

        Each distinct (site, value, columns) ships its value once, cut to its columns.
        """
        per_site: dict[Site, list] = {}
        vals: dict[tuple, torch.Tensor | None] = {}
        for ci, c in enumerate(copies):
            for iv in c:
                c0, c1 = iv.cols if iv.cols else (None, None)
                key = (iv.site, iv.value, iv.cols)
                if key not in vals:
                    v = self.value(iv, g, source)
                    if v is not None and v.dim() and v.stride(0) == 0:  # a mean: the same for every prompt
                        v = v[:1]                                      # ships once, broadcast on the server
                    vals[key] = None if v is None else v[..., c0:c1].detach().cpu().contiguous()
                pos = list(iv.positions) if iv.positions is not None else None
                per_site.setdefault(iv.site, []).append((ci * B, (ci + 1) * B, pos, c0, c1, vals[key]))
        return per_site

    def _forward_nnsight_stacked(self, g: int, source: str, copies: Sequence[tuple[Intervention, ...]],
                                 readout: bool, capture: frozenset[Site] = frozenset(), every: bool = False
                                 ) -> dict[str, Any]:
        """A chunk of copies stacked along the batch in one nnsight trace (one request when remote).

        Only what is read comes back: the last position of the final residual, of every z and MLP output with
        ``readout`` and of the ``capture`` sites (every position of those and of the final residual with ``every``).
        """
        from ..models.nnsight_backend import Job, run_jobs

        P = self.prefix(g, source)
        B, k, L = P.batch, len(copies), self.ad.n_layers
        final = Site(L, "resid_pre")
        keep = {Site(l, kind): "last" for l in range(L) for kind in ("z", "mlp_out")} if readout else {}
        keep.update({s: "all" if every else "last" for s in set(capture) | {final}})
        job = Job(self.task.batch(self.groups[g], source), self._plain_edits(g, source, copies, B), keep, k)
        with self.model.evaluating():
            saved = run_jobs(self.model, [job])[0]
        dev = self.ad.device
        acts = {s: v.to(dev) for s, v in saved.items()}
        last = {s: v[:, -1] if keep[s] == "all" else v for s, v in acts.items()}
        out = self._finish(g, P, last[final], last, 0, k, readout)
        if capture:
            out["captures"] = {s: (acts[s] if every else last[s]).reshape(k, B, *(acts[s] if every else last[s]).shape[1:])
                               for s in capture}
        if every:
            out["resid_all"] = acts[final].view(k, B, *acts[final].shape[1:])
        return out

    def _forward_nnsight_paths(self, g: int, source: str, copies: Sequence[Copy], start: int,
                               capture: frozenset[Site] = frozenset(), every: bool = False) -> dict[str, Any]:
        """A chunk of copies with deliveries (path patching) as ONE nnsight trace (one request when remote).

        The plain-data twin of :meth:`_path_edits`' hooks: per receiver head the server projects
        ``norm(x + change)`` (x the block's pre-attention norm input in this forward) with the head's own
        q/k/v projection, per receiver MLP it computes ``norm(x_mid + change)``, with the model's own
        modules; the changes (:meth:`sender_change`, computed here from the cached runs and the weights) ship
        once per chunk. Grouped-query attention's shadow batches are extra rows of the same trace. Only the
        final residual (last position; every position with ``every``) and the ``capture`` sites come back;
        logits deliveries are added here (:meth:`_path_logits`). A chunk that edits nothing inside the model
        (logits deliveries only) reads the cached run and sends nothing.
        """
        from ..models.nnsight_backend import PathJob, run_path_jobs

        ad = self.ad
        P = self.prefix(g, source)
        k, B, L = len(copies), P.batch, ad.n_layers
        final = Site(L, "resid_pre")
        shadow, shadow_layers = self._shadow_plan(copies)
        plain = [tuple(iv for iv in c if isinstance(iv, Intervention)) for c in copies]
        ops: dict[Any, list[tuple]] = {s: [("edit", *spec) for spec in specs]
                                       for s, specs in self._plain_edits(g, source, plain, B).items()}
        deltas: list[torch.Tensor] = []
        index: dict[SenderChange, int] = {}
        logits: list[tuple[int, Delivery]] = []

        def delta(ch: SenderChange) -> int:
            if ch not in index:
                index[ch] = len(deltas)
                deltas.append(self.sender_change(g, source, ch).detach())
            return index[ch]

        stashed: set[int] = set()
        for ci, c in enumerate(copies):
            for dv in c:
                if not isinstance(dv, Delivery):
                    continue
                if dv.target == "logits":
                    self.sender_change(g, source, dv.change)
                    logits.append((ci, dv))
                    continue
                di, layer = delta(dv.change), dv.layer
                if dv.target == "mlp":
                    ops.setdefault(("mlp_norm", layer), []).append(("mlp", ci * B, (ci + 1) * B, di))
                    continue
                sh = layer in shadow_layers.get(ci, ())
                tgt = shadow[ci] if sh else ci
                cols: dict[Site, list[tuple[int, int]]] = {}
                for h in dv.heads:
                    for w in dv.inputs:
                        site, sl = ad.head_input_slice(layer, h, w)
                        if (sl.start, sl.stop) not in cols.setdefault(site, []):
                            cols[site].append((sl.start, sl.stop))
                if sh:
                    copy_in = ("copy", ci * B, tgt * B, B, None)
                    if copy_in not in ops.setdefault(Site(layer, "resid_pre"), []):
                        ops[Site(layer, "resid_pre")].append(copy_in)
                    ops.setdefault(Site(layer, "z"), []).append(
                        ("copy", tgt * B, ci * B, B, [(ad.head_slice(h).start, ad.head_slice(h).stop)
                                                      for h in dv.heads]))
                if layer not in stashed:
                    stashed.add(layer)
                    ops.setdefault(("attn_norm", layer), []).append(("stash", layer))
                for site, cs in cols.items():
                    ops.setdefault(site, []).append(("qkv", tgt * B, (tgt + 1) * B, layer, layer, di, cs))
        n_rows = k + len(shadow)
        prefix_only = {"resid_pre", "z", "mlp_out"}
        if start >= L and all(s.kind in prefix_only for s in capture):
            # nothing inside the model is edited: the cached run, with any edit of the final residual here
            x = P.resid[L].repeat(k, 1, 1)
            if final in ops:
                x = compose(self._edits(g, source, plain, B)[final])(x)
            acts = {s: (x if s == final else (P.resid[s.layer] if s.kind == "resid_pre" else P.captures[s])
                        .repeat(k, 1, 1)) for s in set(capture) | {final}}
        else:
            keep = {s: "all" if every else "last" for s in set(capture) | {final}}
            job = PathJob(self.task.batch(self.groups[g], source), ops, keep, deltas, n_rows)
            with self.model.evaluating():
                saved = run_path_jobs(self.model, [job])[0]
            dev = ad.device
            acts = {s: v[: k * B].to(dev) for s, v in saved.items()}
        last = {s: v[:, -1] if v.dim() == 3 else v for s, v in acts.items()}
        x_last = last[final]
        out = self._finish(g, P, x_last, last, 0, k, False, self._path_logits(g, source, x_last, logits, B))
        if capture:
            out["captures"] = {s: (acts[s] if every else last[s]).reshape(k, B, *(acts[s] if every else last[s])
                                                                           .shape[1:]) for s in capture}
        if every:
            out["resid_all"] = acts[final].view(k, B, *acts[final].shape[1:])
        return out


class RemotePrefix(Prefix):
    """An unedited nnsight forward (one group's prompts ``ids``), fetched piecewise.

    Only the sites and positions an analysis reads come back from the server
    (``"last"``: the last position, ``"sum"``: the float64 sum over the batch,
    ``"all"``: every position); anything else is fetched on first access
    (``resid[l]``, ``captures[site]``), from the same deterministic forward, so
    the numbers are those of one full fetch. ``calls`` is empty: nothing restarts mid-model.
    """

    def __init__(self, model: Any, ids: torch.Tensor) -> None:
        self.model, self.ids = model, ids
        self.got: dict[tuple[Site, str], Any] = {}
        L = model.adapter.n_layers
        caps = {Site(l, k) for l in range(L) for k in ("z", "mlp_out")}
        super().__init__(resid=_LazyResid(self, L + 1), calls=[], captures=_LazyCaptures(self, caps))  # type: ignore[arg-type]

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    def has(self, site: Site, mode: str) -> bool:
        return (site, "all") in self.got or all((site, m) in self.got for m in mode.split("+"))

    def get(self, site: Site, mode: str) -> torch.Tensor:
        """``site`` as ``mode`` (``"last"`` (B, width), ``"sum"`` (T, width) float64 or ``"all"`` (B, T, width))."""
        if not self.has(site, mode):
            fetch_prefixes(self.model, [(self, {site: {mode}})])
        if (site, mode) in self.got:
            return self.got[site, mode]
        x = self.got[site, "all"]
        return x[:, -1] if mode == "last" else x.detach().to(torch.float64).sum(0)

    def last(self, site: Site) -> torch.Tensor:
        return self.get(site, "last")


class _LazyResid(Sequence):
    def __init__(self, p: RemotePrefix, n: int) -> None:
        self.p, self.n = p, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.p.get(Site(i % self.n, "resid_pre"), "all")


class _LazyCaptures(Mapping):
    """Every z and MLP output at every position; a miss fetches all the missing ones at once (one request)."""

    def __init__(self, p: RemotePrefix, sites: set[Site]) -> None:
        self.p, self.sites = p, sorted(sites, key=lambda s: s.order)

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __getitem__(self, site: Site) -> torch.Tensor:
        if site not in self.sites:
            raise KeyError(site)
        if not self.p.has(site, "all"):
            fetch_prefixes(self.p.model, [(self.p, {s: {"all"} for s in self.sites})])
        return self.p.get(site, "all")


class _LazyMeans(Mapping):
    """A runner's per-position means (nnsight), computed per site on first use (with every declared one)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.sites = sorted(runner.capture_sites(), key=lambda s: s.order)
        self.done: dict[Site, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __contains__(self, site: object) -> bool:
        return site in self.done

    def __getitem__(self, site: Site) -> torch.Tensor:
        if site not in self.sites:
            raise KeyError(site)
        if site not in self.done:
            todo = {site} | {s for s in self.runner._mean_want if s in self.sites and s not in self.done}
            self.done.update(self.runner._mean_of(todo))
        return self.done[site]


def fetch_prefixes(model: Any, items: Sequence[tuple[RemotePrefix, Mapping[Site, set[str]]]]) -> None:
    """Fetch what each prefix lacks of its wanted ``{site: modes}``, all in one nnsight session (one request);
    nothing is sent when nothing is missing."""
    from ..models.nnsight_backend import Job, run_jobs

    jobs, keeps = [], []
    for p, want in items:
        keep: dict[Site, str] = {}
        for s, modes in want.items():
            modes = {"all"} if "all" in modes else set(modes)
            miss = sorted(m for m in modes if not p.has(s, m))
            if miss:
                keep[s] = "+".join(miss)
        if keep:
            jobs.append(Job(p.ids, keep=keep))
            keeps.append((p, keep))
    if not jobs:
        return
    with model.evaluating():
        outs = run_jobs(model, jobs)
    dev = model.adapter.device
    for (p, keep), out in zip(keeps, outs):
        for s, v in out.items():
            mode = keep[s]
            vals = v if isinstance(v, tuple) else (v,)
            for m, x in zip(mode.split("+"), vals):
                p.got[s, m] = x if m == "sum" else x.to(dev)


def last_of(p: Prefix, site: Site) -> torch.Tensor:
    """The last position (B, width) of an unedited forward's ``site`` (z, mlp_out or resid_pre)."""
    if isinstance(p, RemotePrefix):
        return p.last(site)
    return _full_of(p, site)[:, -1]


def _full_of(p: Prefix, site: Site) -> torch.Tensor:
    if isinstance(p, RemotePrefix):
        return p.get(site, "all")
    return p.resid[site.layer] if site.kind == "resid_pre" else p.captures[site]
