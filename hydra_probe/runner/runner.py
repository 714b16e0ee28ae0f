"""The runner: executes interventions on a task, fast and without side effects.

A *copy* is one run of every prompt of the task under a tuple of
interventions. :meth:`Runner.run` takes many copies and, per group of
equal-length prompts,

* restarts the forward at the earliest layer any intervention of a copy
  touches (the clean or corrupted prefix below it is reused, not recomputed);
* stacks several copies along the batch, within a token budget (halving it
  and retrying when memory runs out);
* reads the unembedding at the last position only;
* optionally reads every head's and MLP's last-position output in the same
  forward (for direct effects of downstream components);
* optionally captures any sites (``capture=``) at the last position or at
  every position, from the same stacked forward (no extra forward).

With ``model.backend == "nnsight"`` each chunk of copies is one full nnsight
trace instead, its interventions plain data (equal numbers; with
``remote=True`` one request per chunk). The model is left as it
was: hooks are removed on exit, also on error, and train/eval flags restored.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import NumericalError, OptionError, ResourceError, TaskError
from ..interventions import Intervention
from ..metrics import Metric
from ..models.adapter import Prefix, check_fired
from ..models.sites import Site
from .readout import Readout

SOURCES = ("clean", "corrupted")

CapturePositions = Literal["last", "all"]
"""Which positions :meth:`Runner.run` keeps of captured sites.

``"last"``: the last position only, one (n, width) tensor per site in task
order. ``"all"``: every position, one (B, T, width) tensor per length group
(``Runner.groups[g]`` lists the group's prompts), plus the final residual at
every position.
"""


@dataclass
class RunOutput:
    """The results of one copy (one tuple of interventions) over all prompts.

    Rows are in task order unless said otherwise.

    Attributes:
        metric: (n,) float64 metric of each prompt.
        resid: (n, d) float64 final residual (final norm's input) at the last position.
        proj: (n, C) float64 unscaled projections of the finest components
            (``readout=True``), else None.
        proj_const: (n,) float64 projection of the constant terms
            (``readout=True``), else None.
        captures: the ``capture=`` sites (edited values, as the forward saw
            them; model dtype, CPU): with ``capture_positions="last"``
            ``{site: (n, width)}``; with ``"all"`` ``{site: [per group g a
            (B_g, T_g, width) tensor]}``. Empty when nothing was captured.
        resid_all: with ``capture_positions="all"``, the final residual at
            every position, per group g (B_g, T_g, d) (model dtype, CPU); else None.
        post_sigma: (n, L) float64 each layer's post-attention norm scale
            (families with post norms, ``readout=True``), else None.
    """

    metric: torch.Tensor
    resid: torch.Tensor
    proj: torch.Tensor | None = None
    proj_const: torch.Tensor | None = None
    captures: dict[Site, Any] = field(default_factory=dict)
    resid_all: list[torch.Tensor] | None = None
    post_sigma: torch.Tensor | None = None


class Progress:
    """A minimal progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, label: str, enabled: bool | None = None) -> None:
        self.total, self.done, self.label = max(total, 1), 0, label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            w = 30
            f = int(w * self.done / self.total)
            sys.stderr.write(f"\r{self.label} [{'#' * f}{'.' * (w - f)}] {self.done}/{self.total}")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


class Runner:
    """Runs interventions for one model, task and metric (see module doc).

    Args:
        model: a :class:`~hydra_probe.models.HookedModel`.
        task: a :class:`~hydra_probe.tasks.Task`.
        metric: a :class:`~hydra_probe.metrics.Metric`.
        reference: the task whose clean prompts define ``mean`` values
            (default: ``task``).
        seed: seeds ``resample`` donors.
        token_budget: at most this many tokens (copies x prompts x positions)
            per stacked forward; None (default) sizes it to the device's free
            memory (8192 on the CPU; see ``HookedModel.token_budget``).
        progress: show a progress bar (default: only on a terminal).
    """

    def __init__(self, model: Any, task: Any, metric: Metric, reference: Any = None, seed: int = 0,
                 token_budget: int | None = None, progress: bool | None = None) -> None:
        if len(task) == 0:
            raise TaskError("the task is empty; build it with at least one prompt pair "
                            "(tasks.ioi(model, n_prompts=8) or tasks.from_pairs(model, rows)).")
        self.model, self.task, self.metric = model, task, metric
        self.ad = model.adapter
        self.reference = reference if reference is not None else task
        self.seed = seed
        self.token_budget = token_budget if token_budget is not None else _default_budget(model)
        self.progress = progress
        self.groups = task.groups()
        self._prefix: dict[tuple[int, str], Prefix] = {}
        self._means: dict[Site, torch.Tensor] | None = None
        self._readout: Readout | None = None
        self._clean_logits: torch.Tensor | None = None

    # ---------------------------------------------------------------- caches
    def capture_sites(self) -> set[Site]:
        L = self.ad.n_layers
        return {Site(l, k) for l in range(L) for k in ("z", "mlp_out")}

    def prefix(self, g: int, source: str) -> Prefix:
        """The unedited forward of group ``g`` on the ``source`` prompts."""
        key = (g, source)
        if key not in self._prefix:
            ids = self.task.batch(self.groups[g], source)
            try:
                with self.model.evaluating():
                    if self.model.backend == "nnsight":
                        p = self._prefixes_nnsight(g)[source]
                    else:
                        p = self.ad.prefix(ids, capture=self.capture_sites())
            except (torch.OutOfMemoryError, MemoryError) as e:
                raise ResourceError(_oom_advice(*ids.shape)) from e
            _check_finite(p.resid[-1], f"the {source} run")
            self._prefix[key] = p
        return self._prefix[key]

    def local_prefix(self, g: int, source: str) -> Prefix:
        """Like :meth:`prefix`, but always from the local path (with block calls, for restarting)."""
        if self.model.backend != "nnsight":
            return self.prefix(g, source)
        key = (g, source + ":local")
        if key not in self._prefix:
            with self.model.evaluating():
                self._prefix[key] = self.ad.prefix(self.task.batch(self.groups[g], source), capture=self.capture_sites())
        return self._prefix[key]

    def _prefix_nnsight(self, ids: torch.Tensor) -> Prefix:
        """The unedited forward as one nnsight trace (no block calls: nothing restarts mid-model)."""
        from ..models.nnsight_backend import Job, run_jobs

        return self._as_prefix(run_jobs(self.model, [Job(ids, keep=self._prefix_keep())])[0])

    @property
    def readout(self) -> Readout:
        if self._readout is None:
            from ..metrics import direction

            u, bias = direction(self.ad, self.metric, self.task.answer_ids, self.task.alternative_ids)
            self._readout = Readout.build(self.model, u, bias)
        return self._readout

    def means(self) -> dict[Site, torch.Tensor]:
        """Per-position means (T_max, width) of z and mlp_out over the reference's clean prompts."""
        if self._means is None:
            ref = self.reference
            sums: dict[Site, torch.Tensor] = {}
            counts: torch.Tensor | None = None
            Tmax = max(ref.lengths)
            counts = torch.zeros(Tmax)
            for idx in ref.groups():
                ids = ref.batch(idx, "clean")
                if ref is self.task:
                    g = self.groups.index(idx)
                    caps = self.prefix(g, "clean").captures
                else:
                    with self.model.evaluating():
                        caps = (self._prefix_nnsight(ids) if self.model.backend == "nnsight"
                                else self.ad.prefix(ids, capture=self.capture_sites())).captures
                T = ids.shape[1]
                counts[:T] += len(idx)
                for s, x in caps.items():
                    acc = sums.setdefault(s, torch.zeros(Tmax, x.shape[-1], dtype=torch.float64, device=x.device))
                    acc[:T] += x.detach().to(torch.float64).sum(0)
            self._means = {s: (v / counts.clamp(min=1)[:, None].to(v.device)).to(self.ad.dtype) for s, v in sums.items()}
            self._mean_len = int((counts > 0).sum())
        return self._means

    def donors(self, g: int) -> torch.Tensor:
        """Seeded donor index (within group ``g``) for each prompt: a derangement."""
        idx = self.groups[g]
        B = len(idx)
        if B < 2:
            T = len(self.task.clean_ids[idx[0]])
            raise TaskError(
                f"resample ablation draws from other prompts of the same token length, but only one prompt has "
                f"{T} tokens; add prompts of that length or use value='mean'."
            )
        gen = torch.Generator().manual_seed(self.seed * 1000003 + g)
        shift = int(torch.randint(1, B, (1,), generator=gen))
        perm = torch.randperm(B, generator=gen)
        donor = torch.empty(B, dtype=torch.long)
        donor[perm] = perm.roll(-shift)  # perm[i] takes perm[i+shift]: never itself
        return donor

    def value(self, iv: Intervention, g: int, source: str) -> torch.Tensor | None:
        """The replacement (B, T, width) for ``iv`` on group ``g``; None means zeros."""
        if iv.value == "zero":
            return None
        T = len(self.task.clean_ids[self.groups[g][0]])
        if iv.site.kind == "resid_pre":
            if iv.value not in SOURCES:
                raise TaskError("the residual stream can only be patched (clean/corrupted), not ablated.")
            return self.prefix(g, iv.value).resid[iv.site.layer]
        if iv.value in SOURCES:
            return self.prefix(g, iv.value).captures[iv.site]
        if iv.value == "mean":
            m = self.means()[iv.site]
            if T > self._mean_len:
                raise TaskError(f"the reference prompts are at most {self._mean_len} tokens; they give no mean for "
                                f"positions of a {T}-token prompt. Use a reference task with prompts at least as long.")
            B = len(self.groups[g])
            return m[:T].unsqueeze(0).expand(B, T, m.shape[-1])
        caps = self.prefix(g, "clean").captures[iv.site]
        return caps[self.donors(g)]

    def clean_logits(self) -> torch.Tensor:
        if self._clean_logits is None:
            self._clean_logits = torch.cat([self._logits_of(self.prefix(g, "clean").resid[-1][:, -1])
                                            for g in range(len(self.groups))])[self._inverse()]
        return self._clean_logits

    def _logits_of(self, x_last: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.ad.logits(x_last)

    def _inverse(self) -> torch.Tensor:
        order = torch.tensor([i for idx in self.groups for i in idx])
        inv = torch.empty_like(order)
        inv[order] = torch.arange(len(order))
        return inv

    # ---------------------------------------------------------------- running
    def baseline(self, source: str, readout: bool = False) -> RunOutput:
        """The unedited ``source`` run (from the cached prefixes)."""
        return self.run(source, [()], readout=readout)[0]

    def check_capture(self, capture: Any, capture_positions: Any) -> frozenset[Site]:
        """Validate ``capture`` sites and ``capture_positions`` (before any forward pass)."""
        if capture_positions not in ("last", "all"):
            raise OptionError(f"unknown capture_positions {capture_positions!r}; choose 'last' or 'all'.")
        sites = frozenset(capture)
        for s in sites:
            if not isinstance(s, Site):
                raise OptionError(f"capture takes Site objects (hydra_probe.models.sites.Site); got {s!r}.")
            if s != Site(self.ad.n_layers, "resid_pre"):
                self.ad.module_of(s)  # raises InterventionError when the site does not exist
        return sites

    def run(self, source: str, copies: Sequence[tuple[Intervention, ...]], readout: bool = False,
            label: str = "running", capture: Iterable[Site] = frozenset(),
            capture_positions: CapturePositions = "last") -> list[RunOutput]:
        """Run every copy on every prompt; see the module doc.

        Args:
            source: ``"clean"`` or ``"corrupted"``: the prompts every copy runs on.
            copies: one tuple of interventions per copy.
            readout: also compute the finest components' projections (``RunOutput.proj``).
            label: progress-bar label.
            capture: sites whose (edited) activations to return, from the same
                forward. ``Site(n_layers, "resid_pre")`` is the final residual.
            capture_positions: ``"last"`` or ``"all"`` (see :data:`CapturePositions`).

        Returns:
            one :class:`RunOutput` per copy, in the order of ``copies``.
        """
        if source not in SOURCES:
            raise OptionError(f"unknown source {source!r}; choose 'clean' or 'corrupted'.")
        cap = self.check_capture(capture, capture_positions)
        every = capture_positions == "all"
        n, C = len(self.task), len(self.readout.components) if readout else 0
        d = self.ad.d_model
        K = len(copies)
        metric = torch.empty(K, n, dtype=torch.float64)
        resid = torch.empty(K, n, d, dtype=torch.float64)
        proj = torch.empty(K, n, C, dtype=torch.float64) if readout else None
        pconst = torch.empty(K, n, dtype=torch.float64) if readout else None
        caps_last: dict[Site, torch.Tensor] = {}
        caps_all: dict[Site, list[torch.Tensor]] = {s: [] for s in cap}
        resid_all: list[torch.Tensor] = []
        psig = (torch.empty(K, n, self.ad.n_layers, dtype=torch.float64)
                if readout and self.readout.has_post_norms else None)
        bar = Progress(K * len(self.groups), label, self.progress)
        for g, idx in enumerate(self.groups):
            it = torch.tensor(idx)
            B, T = len(idx), len(self.task.clean_ids[idx[0]])
            if every:
                resid_all.append(torch.empty(K, B, T, d, dtype=self.ad.dtype))
            for chunk, out in self._run_group(g, source, copies, readout, bar, cap, every):
                ci = torch.tensor(chunk)
                # results live on the CPU whatever the model's device
                metric[ci[:, None], it[None, :]] = out["metric"].cpu()
                resid[ci[:, None], it[None, :]] = out["resid"].cpu()
                if readout:
                    proj[ci[:, None], it[None, :]] = out["proj"].cpu()
                    pconst[ci[:, None], it[None, :]] = out["proj_const"].cpu()
                    if psig is not None:
                        psig[ci[:, None], it[None, :]] = out["post_sigma"].cpu()
                for s, v in out.get("captures", {}).items():
                    if every:
                        if len(caps_all[s]) == g:
                            caps_all[s].append(torch.empty(K, *v.shape[1:], dtype=v.dtype))
                        caps_all[s][g][ci] = v.cpu()
                    else:
                        if s not in caps_last:
                            caps_last[s] = torch.empty(K, n, v.shape[-1], dtype=v.dtype)
                        caps_last[s][ci[:, None], it[None, :]] = v.cpu()
                if every:
                    resid_all[g][ci] = out["resid_all"].cpu()
        outs = []
        for i in range(K):
            if every:
                c: dict[Site, Any] = {s: [v[i] for v in caps_all[s]] for s in cap}
            else:
                c = {s: v[i] for s, v in caps_last.items()}
            outs.append(RunOutput(metric[i], resid[i], None if proj is None else proj[i],
                                  None if pconst is None else pconst[i], c,
                                  [r[i] for r in resid_all] if every else None,
                                  None if psig is None else psig[i]))
        return outs

    def _start(self, copy: tuple[Intervention, ...], capture: frozenset[Site]) -> int:
        """The earliest layer a forward of ``copy`` must run from (its interventions, and the captures
        that the prefix does not hold)."""
        L = self.ad.n_layers
        need = [s.layer for s in capture if s.kind not in ("z", "mlp_out", "resid_pre")]
        return min([iv.site.layer for iv in copy] + need, default=L)

    def _run_group(self, g: int, source: str, copies: Sequence[tuple[Intervention, ...]], readout: bool,
                   bar: Progress, capture: frozenset[Site] = frozenset(), every: bool = False):
        idx = self.groups[g]
        B, T = len(idx), len(self.task.clean_ids[idx[0]])
        starts = [self._start(c, capture) for c in copies]
        if self.model.backend == "nnsight":  # full forwards, chunked by the budget alone (one request each);
            L = self.ad.n_layers             # a copy that edits nothing and captures only cached sites reads them
            starts = [0 if c or s < L else L for c, s in zip(copies, starts)]
        order = sorted(range(len(copies)), key=lambda i: starts[i])
        per = max(1, self.token_budget // (B * T))
        pos = 0
        while pos < len(order):
            start = starts[order[pos]]
            chunk = [i for i in order[pos: pos + per] if starts[i] == start]
            while True:
                try:
                    out = self._forward(g, source, [copies[i] for i in chunk], start, readout, capture, every)
                    break
                except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
                    if isinstance(e, RuntimeError) and "out of memory" not in str(e).lower() \
                            and not isinstance(e, torch.OutOfMemoryError):
                        raise
                    if len(chunk) == 1:
                        raise ResourceError(_oom_advice(B, T)) from None
                    per = max(1, len(chunk) // 2)
                    self.token_budget = per * B * T
                    chunk = chunk[:per]
            bar.update(len(chunk))
            yield chunk, out
            pos += len(chunk)

    def _forward(self, g: int, source: str, copies: Sequence[tuple[Intervention, ...]], start: int,
                 readout: bool, capture: frozenset[Site] = frozenset(), every: bool = False
                 ) -> dict[str, Any]:
        if self.model.backend == "nnsight" and start < self.ad.n_layers:
            return self._forward_nnsight_stacked(g, source, copies, readout, capture, every)
        P = self.prefix(g, source)
        k, B = len(copies), P.batch
        L = self.ad.n_layers
        final = Site(L, "resid_pre")
        edits = self._edits(g, source, copies, B)
        acts: dict[Site, torch.Tensor] = {}
        want = {Site(l, kind) for l in range(start, L) for kind in ("z", "mlp_out")} if readout else set()
        want |= {s for s in capture if s.layer >= start and s != final}
        caps: dict[Site, Callable] = {s: (lambda x, s=s: acts.__setitem__(s, x.detach())) for s in want}
        with self.model.evaluating(), torch.no_grad(), self.ad.hooks(edits, caps) as fired:
            # only the last position is read: the final MLP may skip the others unless something edits it
            # or the final residual, or every position is captured
            skip = not every and not any(s.layer >= L - 1 and s.kind != "z" for s in edits) \
                and not any(s.layer >= L - 1 and s.kind in ("mlp_in", "mlp_out") for s in capture)
            x = (self.ad.run_blocks(P, start, k, last_position_mlp=skip) if start < L
                 else P.resid[L].repeat(k, 1, 1).clone())
            if final in edits:
                x = edits[final](x)
                fired[final] += 1
        check_fired(fired, edits)
        acts[final] = x
        for s in capture:
            if s not in acts:  # below the restart layer: the prefix holds it unedited
                acts[s] = (P.resid[s.layer] if s.kind == "resid_pre" else P.captures[s]).repeat(k, 1, 1)
        last = {s: v[:, -1] for s, v in acts.items()}
        out = self._finish(g, P, x[:, -1], last, start, k, readout)
        if capture:
            out["captures"] = {s: (acts[s] if every else last[s]).reshape(k, B, *acts[s].shape[1 + (not every):])
                               for s in capture}
        if every:
            out["resid_all"] = x.detach().view(k, B, *x.shape[1:])
        return out

    def _finish(self, g: int, P: Prefix, x_last: torch.Tensor, last: dict[Site, torch.Tensor], start: int,
                k: int, readout: bool) -> dict[str, Any]:
        """Metric and readout from last-position activations (shared by both backends)."""
        idx = self.groups[g]
        B = len(idx)
        _check_finite(x_last, "an intervened run")
        a = self.task.answer_ids[idx].repeat(k)
        b = self.task.alternative_ids[idx].repeat(k)
        logits = self._logits_of(x_last)
        clean = self.clean_logits()[idx].repeat(k, 1) if self.metric.needs_clean else None
        m = self.metric(logits, a, b, clean).detach().to(torch.float64)
        out = {"metric": m.view(k, B), "resid": x_last.detach().to(torch.float64).view(k, B, -1)}
        if readout:
            L = self.ad.n_layers
            z = [last[Site(l, "z")] if l >= start else P.captures[Site(l, "z")][:, -1].repeat(k, 1) for l in range(L)]
            mlp = [last[Site(l, "mlp_out")] if l >= start else P.captures[Site(l, "mlp_out")][:, -1].repeat(k, 1)
                   for l in range(L)]
            ro = self.readout
            u = ro.u[torch.tensor(idx)]
            ps = ro.post_sigma(z)
            out["proj"] = ro.projections(z, mlp, u, ps).view(k, B, -1)
            if ps is not None:
                out["post_sigma"] = ps.view(k, B, -1)
            out["proj_const"] = ro.const_projection(P.resid[0][:, -1].repeat(k, 1), u).view(k, B)
        return out

    def _edits(self, g: int, source: str, copies: Sequence[tuple[Intervention, ...]], B: int
               ) -> dict[Site, Callable[[torch.Tensor], torch.Tensor]]:
        per_site: dict[Site, list[tuple[int, Intervention, torch.Tensor | None]]] = {}
        for ci, c in enumerate(copies):
            for iv in c:
                per_site.setdefault(iv.site, []).append((ci, iv, self.value(iv, g, source)))

        def make(items):
            def edit(x: torch.Tensor) -> torch.Tensor:
                x = x.clone()
                for ci, iv, val in items:
                    rows = slice(ci * B, (ci + 1) * B)
                    cols = slice(*iv.cols) if iv.cols else slice(None)
                    p = list(iv.positions) if iv.positions is not None else slice(None)
                    if val is None:
                        x[rows, p, cols] = 0
                    else:
                        x[rows, p, cols] = val[:, p, cols].to(x.device, x.dtype)
                return x
            return edit

        return {s: make(items) for s, items in per_site.items()}

    # ---------------------------------------------------------------- nnsight (also remote): plain-data traces
    def _prefixes_nnsight(self, g: int) -> dict[str, Prefix]:
        """Clean and corrupted unedited forwards of group ``g`` as two traces of one session (one request)."""
        from ..models.nnsight_backend import Job, run_jobs

        idx = self.groups[g]
        keep = self._prefix_keep()
        outs = run_jobs(self.model, [Job(self.task.batch(idx, s), keep=keep) for s in SOURCES])
        got = {s: self._as_prefix(o) for s, o in zip(SOURCES, outs)}
        for s, p in got.items():
            _check_finite(p.resid[-1], f"the {s} run")
            self._prefix.setdefault((g, s), p)
        return got

    def _prefix_keep(self) -> dict[Site, str]:
        L = self.ad.n_layers
        return {**{s: "all" for s in self.capture_sites()}, **{Site(l, "resid_pre"): "all" for l in range(L + 1)}}

    def _as_prefix(self, saved: dict[Site, torch.Tensor]) -> Prefix:
        L = self.ad.n_layers
        dev = self.ad.device
        return Prefix(resid=[saved[Site(l, "resid_pre")].to(dev) for l in range(L + 1)], calls=[],
                      captures={s: saved[s].to(dev) for s in self.capture_sites()})

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


def _default_budget(model: Any) -> int:
    budget = getattr(model, "token_budget", None)
    return int(budget()) if callable(budget) else 8192


def _oom_advice(B: int, T: int) -> str:
    return (f"one run of {B} prompts x {T} tokens does not fit in memory even unbatched; use fewer prompts "
            "(--n-prompts), shorter prompts, a smaller dtype, or a device with more memory.")


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise NumericalError(f"{what} produced NaN or infinite activations; check the model weights, dtype "
                             "(float16 overflows easily; try float32) and inputs.")
