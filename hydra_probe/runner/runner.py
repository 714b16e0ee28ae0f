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
``remote=True`` one request per chunk). The unedited clean and corrupted
runs (:class:`RemotePrefix`) return only what :meth:`Runner.run` declares it
will read (the last position where that suffices, per-position sums over the
batch for means, every position only of the sites whose values are patched
in); anything else is fetched on first access. The model is left as it
was: hooks are removed on exit, also on error, and train/eval flags restored.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ..errors import InterventionError, NumericalError, OptionError, ResourceError, TaskError
from ..interventions import Delivery, GradientRead, Intervention, SenderChange
from ..metrics import Metric
from ..models.adapter import Prefix, check_fired
from ..models.sites import Site
from .readout import Readout

SOURCES = ("clean", "corrupted")

Copy = tuple[Intervention | Delivery, ...]
"""One copy: the interventions applied together in one run of every prompt."""

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


@contextlib.contextmanager
def progress_bar(total: int, label: str, enabled: bool | None = None) -> Iterator[Any]:
    """A tqdm bar with an estimate of the time left; ``enabled=None``: only on a terminal."""
    show = sys.stderr.isatty() if enabled is None else bool(enabled)
    bar = tqdm(total=max(total, 1), desc=label, disable=not show, leave=False, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def _compose(fns: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    if len(fns) == 1:
        return fns[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        for f in fns:
            x = f(x)
        return x
    return run


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


class Runner:
    """Runs interventions for one model, task and metric (see module doc).

    ``Runner.fast_attention`` (default True): a copy whose earliest edits are
    heads' outputs (``z``) restarts at that layer's attention output
    projection, the layer's attention taken from the cached prefix (it does
    not depend on the edit); False recomputes it (the plain path).
    ``Runner.fast_qk`` and ``Runner.shared_gradients`` (default True) switch
    AtP*'s engine (:meth:`qk_fix`, :meth:`gradients`) to its plain reference
    when False (same numbers, for tests and benchmarks).

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

    fast_attention: bool = True
    #: AtP*'s QK fix runs only each downstream layer's attention, all senders stacked (False: the plain
    #: reference, one full forward per sender with every block input pinned and a delivery to q and k)
    fast_qk: bool = True
    #: gradient reads share one forward per group (GradDrop reads as vector-Jacobian products of the
    #: blocks under the dropped layer); False: the plain reference, one stacked copy per read
    shared_gradients: bool = True

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
        self._changes: dict[Any, torch.Tensor] = {}
        #: nnsight: what the unedited forwards must return, per (group, source) {site: {"last", "all", "sum"}}
        #: (declared by :meth:`run`, fetched with the first request; see :class:`RemotePrefix`)
        self._want: dict[tuple[int, str], dict[Site, set[str]]] = {}
        #: the ablation value the caller's sweeps will use (set by ``make_runner``): with ``"mean"`` the first
        #: nnsight request already brings the clean sums the means need
        self.value_hint: Any = None
        self._mean_sums: dict[tuple[int, Site], torch.Tensor] = {}
        self._mean_want: set[Site] = set()

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
            _check_finite(p.last(Site(self.ad.n_layers, "resid_pre")) if isinstance(p, RemotePrefix) else p.resid[-1],
                          f"the {source} run")
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

    @property
    def readout(self) -> Readout:
        if self._readout is None:
            from ..metrics import direction

            u, bias = direction(self.ad, self.metric, self.task.answer_ids, self.task.alternative_ids)
            self._readout = Readout.build(self.model, u, bias)
        return self._readout

    def means(self) -> dict[Site, torch.Tensor]:
        """Per-position means (T_max, width) of z and mlp_out over the reference's clean prompts.

        nnsight: a mapping computing each site's mean on first use from per-group sums over the batch."""
        if self.model.backend == "nnsight":
            return self._means_nnsight()
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
                        caps = self.ad.prefix(ids, capture=self.capture_sites()).captures
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
            final = Site(self.ad.n_layers, "resid_pre")
            self._clean_logits = torch.cat([self._logits_of(_last_of(self.prefix(g, "clean"), final))
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
            # raises InterventionError when the site does not exist (or, on nnsight, cannot be read there)
            if self.model.backend == "nnsight" and s.kind in ("values", "attn_last"):
                from ..models.nnsight_backend import mechanism_read

                mechanism_read(self.model, s)  # read in the trace from the attention call's inputs
            else:
                (self.ad.path_of if self.model.backend == "nnsight" else self.ad.module_of)(s)
        return sites

    def run(self, source: str, copies: Sequence[Copy], readout: bool = False,
            label: str = "running", capture: Iterable[Site] = frozenset(),
            capture_positions: CapturePositions = "last") -> list[RunOutput]:
        """Run every copy on every prompt; see the module doc.

        Args:
            source: ``"clean"`` or ``"corrupted"``: the prompts every copy runs on.
            copies: one tuple of interventions per copy (:class:`~hydra_probe.interventions.Intervention`
                and :class:`~hydra_probe.interventions.Delivery` items).
            readout: also compute the finest components' projections (``RunOutput.proj``);
                not with deliveries.
            label: progress-bar label.
            capture: sites whose (edited) activations to return, from the same
                forward. ``Site(n_layers, "resid_pre")`` is the final residual.
            capture_positions: ``"last"`` or ``"all"`` (see :data:`CapturePositions`).

        Returns:
            one :class:`RunOutput` per copy, in the order of ``copies``. For a copy
            that delivers a change to the logits, ``metric`` includes it and
            ``resid`` does not.
        """
        if source not in SOURCES:
            raise OptionError(f"unknown source {source!r}; choose 'clean' or 'corrupted'.")
        cap = self.check_capture(capture, capture_positions)
        paths = any(isinstance(iv, Delivery) for c in copies for iv in c)
        if paths:
            if readout:
                raise OptionError("readout=True does not combine with deliveries; run the readout separately.")
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
        starts = [self._start(c, cap) for c in copies]
        if self.model.backend == "nnsight" and not paths:
            # full forwards, chunked by the budget alone (one request each); a copy that edits nothing and
            # captures only cached sites reads them
            L = self.ad.n_layers
            starts = [0 if c or s < L else L for c, s in zip(copies, starts)]
        elif self.model.backend == "nnsight":
            # deliveries: full forwards chunked by the budget alone; logits-only copies read the cached run
            L = self.ad.n_layers
            starts = [0 if s < L else L for s in starts]
        weights = [1 + bool(self._shadow_layers(c)) for c in copies]
        if self.model.backend == "nnsight":  # after every check: this may send a request
            self._declare_nnsight(source, copies, readout, cap, every)
        with progress_bar(K * len(self.groups), label, self.progress) as bar:
            for g, idx in enumerate(self.groups):
                it = torch.tensor(idx)
                B, T = len(idx), len(self.task.clean_ids[idx[0]])
                if every:
                    resid_all.append(torch.empty(K, B, T, d, dtype=self.ad.dtype))

                def forward(chunk: list[int], start: int, g: int = g) -> dict[str, Any]:
                    return self._forward(g, source, [copies[i] for i in chunk], start, readout, cap, every)

                for chunk, out in self._batched(g, starts, weights, forward):
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
                    bar.update(len(chunk))
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

    def check_local(self, what: str) -> None:
        """Refuse ``what`` (an analysis that runs on the local hook path) for a remote model, at once."""
        self.model.require_local(what)

    def _start(self, copy: Copy, capture: frozenset[Site] = frozenset()) -> int:
        """The earliest layer a forward of ``copy`` must run from (its interventions, and the captures
        that the prefix does not hold)."""
        L = self.ad.n_layers
        need = [s.layer for s in capture if s.kind not in ("z", "mlp_out", "resid_pre")]
        for iv in copy:
            if isinstance(iv, Intervention):
                need.append(iv.site.layer)
            elif iv.target != "logits":
                need.append(iv.layer)
        return min(need, default=L)

    def _shadow_layers(self, copy: Copy) -> set[int]:
        """Layers where a delivery to some heads' k or v must not reach the other heads of their key/value
        group (grouped-query attention): there the copy gets a shadow batch (see :meth:`_path_edits`)."""
        ad = self.ad
        out: set[int] = set()
        if ad.n_kv_heads >= ad.n_heads:
            return out
        size = ad.n_heads // ad.n_kv_heads
        heads: dict[int, set[int]] = {}
        for iv in copy:
            if isinstance(iv, Delivery) and iv.target == "heads" and ({"k", "v"} & set(iv.inputs)):
                heads.setdefault(iv.layer, set()).update(iv.heads)
        for layer, hs in heads.items():
            if any(set(range(q * size, (q + 1) * size)) - hs for q in {h // size for h in hs}):
                out.add(layer)
        return out

    def _batched(self, g: int, starts: Sequence[int], weights: Sequence[int],
                 forward: Callable[[list[int], int], Any]) -> Iterator[tuple[list[int], Any]]:
        """Run copies of group ``g`` in stacks of equal start layer within the token budget (a copy of
        weight w counts w batches); on out-of-memory halve the stack and retry, and keep the smaller
        budget. Yields (copy indices, ``forward(indices, start)``)."""
        idx = self.groups[g]
        B, T = len(idx), len(self.task.clean_ids[idx[0]])
        order = sorted(range(len(starts)), key=lambda i: starts[i])
        pos = 0
        while pos < len(order):
            per = max(1, self.token_budget // (B * T))
            start, chunk, weight = starts[order[pos]], [], 0
            j = pos
            while j < len(order) and starts[order[j]] == start:
                w = weights[order[j]]
                if chunk and weight + w > per:
                    break
                chunk.append(order[j])
                weight += w
                j += 1
            while True:
                try:
                    out = forward(chunk, start)
                    break
                except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
                    if isinstance(e, RuntimeError) and "out of memory" not in str(e).lower() \
                            and not isinstance(e, torch.OutOfMemoryError):
                        raise
                    if len(chunk) == 1:
                        raise ResourceError(_oom_advice(B, T)) from None
                    half = max(1, len(chunk) // 2)
                    self.token_budget = max(1, sum(weights[i] for i in chunk[:half])) * B * T
                    chunk = chunk[:half]
            yield chunk, out
            pos += len(chunk)

    def _forward(self, g: int, source: str, copies: Sequence[Copy], start: int,
                 readout: bool, capture: frozenset[Site] = frozenset(), every: bool = False
                 ) -> dict[str, Any]:
        paths = any(isinstance(iv, Delivery) for c in copies for iv in c)
        if self.model.backend == "nnsight" and not paths and start < self.ad.n_layers:
            return self._forward_nnsight_stacked(g, source, copies, readout, capture, every)
        if self.model.backend == "nnsight" and not paths:
            return self._forward_nnsight_cached(g, source, len(copies), readout, capture, every)
        if self.model.backend == "nnsight" and paths:  # deliveries as one trace (also remote)
            return self._forward_nnsight_paths(g, source, copies, start, capture, every)
        P = self.local_prefix(g, source) if paths else self.prefix(g, source)
        k, B = len(copies), P.batch
        L = self.ad.n_layers
        final = Site(L, "resid_pre")
        edits = self._edits(g, source, copies, B)
        norm_fns: dict[tuple[int, str], Callable] = {}
        shadow: dict[int, int] = {}
        deliveries: list[tuple[int, Delivery]] = []
        if paths:
            shadow, deliveries = self._path_edits(g, source, copies, B, edits, norm_fns)
        n_rows = k + len(shadow)
        acts: dict[Site, torch.Tensor] = {}
        want = {Site(l, kind) for l in range(start, L) for kind in ("z", "mlp_out")} if readout else set()
        want |= {s for s in capture if s.layer >= start and s != final}
        caps: dict[Site, Callable] = {s: (lambda x, s=s: acts.__setitem__(s, x.detach())) for s in want}
        edit_fns = {s: _compose(fs) for s, fs in edits.items()}
        norms = self.ad.norm_hooks(norm_fns) if norm_fns else contextlib.nullcontext({})
        with self.model.evaluating(), torch.no_grad(), self.ad.hooks(edit_fns, caps) as fired, norms as nfired:
            # only the last position is read: the final MLP may skip the others unless something edits it
            # or the final residual, or every position is captured, or a path is patched
            skip = not every and not paths and not any(s.layer >= L - 1 and s.kind != "z" for s in edits) \
                and not any(s.layer >= L - 1 and s.kind in ("mlp_in", "mlp_out") for s in capture)
            z0 = None
            if self.fast_attention and not paths and start < L and self.ad.can_start_at_z(P, start) \
                    and all(iv.site.kind == "z" for c in copies for iv in c if iv.site.layer == start) \
                    and not any(s.layer == start and s.kind not in ("z", "mlp_out", "mlp_in", "resid_pre")
                                for s in capture):
                # the ablated heads' layer restarts at its output projection's input: its attention is the prefix's
                z0 = P.captures[Site(start, "z")].repeat(n_rows, 1, 1)
            x = (self.ad.run_blocks(P, start, n_rows, last_position_mlp=skip, attn_z=z0) if start < L
                 else P.resid[L].repeat(n_rows, 1, 1).clone())
            if final in edit_fns:
                x = edit_fns[final](x)
                fired[final] += 1
        check_fired(fired, edit_fns)
        dead = [f"{w} norm of layer {layer}" for (layer, w), c in nfired.items() if c == 0]
        if dead:
            raise InterventionError(f"path-patching hooks at the {', '.join(dead)} never fired; the architecture "
                                    "table may point at a norm the forward does not call.")
        x = x[: k * B]
        acts = {s: v[: k * B] for s, v in acts.items()}
        acts[final] = x
        for s in capture:
            if s not in acts:  # below the restart layer: the prefix holds it unedited
                acts[s] = (P.resid[s.layer] if s.kind == "resid_pre" else P.captures[s]).repeat(k, 1, 1)
        last = {s: v[:, -1] for s, v in acts.items()}
        logits = self._path_logits(g, source, x[:, -1], deliveries, B) if paths else None
        out = self._finish(g, P, x[:, -1], last, start, k, readout, logits)
        if capture:
            out["captures"] = {s: (acts[s] if every else last[s]).reshape(k, B, *acts[s].shape[1 + (not every):])
                               for s in capture}
        if every:
            out["resid_all"] = x.detach().view(k, B, *x.shape[1:])
        return out

    def _finish(self, g: int, P: Prefix, x_last: torch.Tensor, last: dict[Site, torch.Tensor], start: int,
                k: int, readout: bool, logits: torch.Tensor | None = None) -> dict[str, Any]:
        """Metric and readout from last-position activations (shared by both backends)."""
        idx = self.groups[g]
        B = len(idx)
        _check_finite(x_last, "an intervened run")
        a = self.task.answer_ids[idx].repeat(k)
        b = self.task.alternative_ids[idx].repeat(k)
        if logits is None:
            logits = self._logits_of(x_last)
        clean = self.clean_logits()[idx].repeat(k, 1) if self.metric.needs_clean else None
        m = self.metric(logits, a, b, clean).detach().to(torch.float64)
        out = {"metric": m.view(k, B), "resid": x_last.detach().to(torch.float64).view(k, B, -1)}
        if readout:
            L = self.ad.n_layers
            z = [last[Site(l, "z")] if l >= start else _last_of(P, Site(l, "z")).repeat(k, 1) for l in range(L)]
            mlp = [last[Site(l, "mlp_out")] if l >= start else _last_of(P, Site(l, "mlp_out")).repeat(k, 1)
                   for l in range(L)]
            ro = self.readout
            u = ro.u[torch.tensor(idx)]
            ps = ro.post_sigma(z)
            out["proj"] = ro.projections(z, mlp, u, ps).view(k, B, -1)
            if ps is not None:
                out["post_sigma"] = ps.view(k, B, -1)
            out["proj_const"] = ro.const_projection(_last_of(P, Site(0, "resid_pre")).repeat(k, 1), u).view(k, B)
        return out

    def _edits(self, g: int, source: str, copies: Sequence[Copy], B: int) -> dict[Site, list[Callable]]:
        """Replacement edits of the copies' :class:`Intervention` items, per site (in a list, so that
        other edits of the same site can follow)."""
        per_site: dict[Site, list[tuple[int, Intervention, torch.Tensor | None]]] = {}
        for ci, c in enumerate(copies):
            for iv in c:
                if isinstance(iv, Intervention):
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

        return {s: [make(items)] for s, items in per_site.items()}

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
                    edits: dict[Site, list[Callable]], norm_fns: dict[tuple[int, str], Callable]
                    ) -> tuple[dict[int, int], list[tuple[int, Delivery]]]:
        """Add the hooks of the copies' deliveries to ``edits`` and ``norm_fns``.

        A receiver head's q/k/v is projected from ``norm(x + change)`` (x its
        block input in this forward); a receiver MLP reads ``norm(x_mid +
        change)``. Grouped-query attention: where a delivery to k/v must not
        reach the other heads of a key/value group, a *shadow* batch of the
        copy gets the copy's block input, the patched k/v, and the receiver
        heads' ``z`` is copied from the shadow into the copy. Returns (copy ->
        shadow batch index, the logits deliveries).
        """
        ad = self.ad
        k = len(copies)
        shadow: dict[int, int] = {}
        shadow_layers: dict[int, set[int]] = {}
        for ci, c in enumerate(copies):
            sl = self._shadow_layers(c)
            if sl:
                shadow[ci] = k + len(shadow)
                shadow_layers[ci] = sl

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
                    d = self.sender_change(g, source, ch)
                    out[rows(ci)] = ad.block_norm(layer, "mlp", inp[rows(ci)] + d).to(out.dtype)
                return out
            return fn

        def edit_qkv(site: Site, items: list[tuple[int, SenderChange, int, list[slice]]]):
            def fn(y: torch.Tensor) -> torch.Tensor:
                y = y.clone()
                for tgt, ch, layer, cols in items:
                    key = (layer, tgt, ch)
                    if key not in normed:
                        d = self.sender_change(g, source, ch)
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
        """Logits (k*B, vocab) of the final residual, with each copy's logits deliveries added."""
        ad = self.ad
        k = x_last.shape[0] // B
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
                    out.append(ad.logits_frozen(xl, d) if scale == "frozen" else ad.logits(xl + d))
                else:
                    out.append(ad.logits(xl))
        return torch.cat(out)

    # ---------------------------------------------------------------- gradients (attribution)
    def gradients(self, source: str, reads: Sequence[GradientRead], label: str = "gradients"
                  ) -> list[GradientOutput]:
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
        """
        if source not in SOURCES:
            raise OptionError(f"unknown source {source!r}; choose 'clean' or 'corrupted'.")
        if self.model.backend == "nnsight":
            return self._gradients_nnsight(source, reads, label)
        self.check_local("attribution patching (gradient reads)")
        L = self.ad.n_layers
        for r in reads:
            for s in r.sites:
                self.ad.module_of(s)
            if r.drop_layer is not None and not 0 <= r.drop_layer < L:
                raise OptionError(f"drop_layer {r.drop_layer} is outside layers 0..{L - 1}.")
        n, K = len(self.task), len(reads)
        metric = torch.empty(n, dtype=torch.float64)
        acts: dict[Site, list[torch.Tensor]] = {}
        grads: list[dict[Site, list[torch.Tensor]]] = [{} for _ in reads]
        starts = [min((s.layer for s in r.sites), default=L) for r in reads]
        with progress_bar(K * len(self.groups), label, self.progress) as bar:
            for g, idx in enumerate(self.groups):
                def forward(chunk: list[int], start: int, g: int = g) -> Any:
                    return self._gradient_forward(g, source, [reads[i] for i in chunk], start)

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

    def _gradient_forward(self, g: int, source: str, reads: Sequence[GradientRead], start: int
                          ) -> tuple[torch.Tensor, dict[Site, torch.Tensor], list[dict[Site, torch.Tensor]]]:
        """The forward and backward of ``reads`` on group ``g``: (metric (B,), activations {site: (B, T, w)},
        per read {site: gradient (B, T, w)}). Shared (one forward per ``freeze_patterns`` setting) unless
        ``Runner.shared_gradients`` is False."""
        if not self.shared_gradients:
            return self._gradient_forward_stacked(g, source, reads, start)
        m0: torch.Tensor | None = None
        acts: dict[Site, torch.Tensor] = {}
        per: list[dict[Site, torch.Tensor]] = [{} for _ in reads]
        for flag in (False, True):
            js = [j for j, r in enumerate(reads) if r.freeze_patterns == flag]
            if js:
                m0, a, got = self._gradient_forward_shared(g, source, [reads[j] for j in js], start, flag)
                acts.update(a)
                for j, p in zip(js, got):
                    per[j] = p
        assert m0 is not None
        return m0, acts, per

    def _gradient_forward_shared(self, g: int, source: str, reads: Sequence[GradientRead], start: int,
                                 freeze: bool
                                 ) -> tuple[torch.Tensor, dict[Site, torch.Tensor], list[dict[Site, torch.Tensor]]]:
        """One forward of group ``g`` for every read (all with ``freeze_patterns == freeze``) and one full
        backward; each GradDrop read then reuses it: dropping block l's write leaves the gradient at the
        sites above l as it is, makes it zero inside block l, and below l it is the vector-Jacobian product
        of the blocks under l with the residual gradient at block l's output placed at block l's input
        (``torch.autograd.grad`` on the kept graph). Equals one stacked copy per read
        (:meth:`_gradient_forward_stacked`) to float rounding."""
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
        if freeze:  # AtP*'s QK fix: queries and keys pass no gradient (attention patterns are constants)
            for site, sls in _qk_columns(ad, start).items():
                edits.setdefault(site, []).append(lambda y, sls=sls: torch.where(_column_mask(y, sls), y.detach(), y))
        block_in: dict[int, torch.Tensor] = {}
        for layer in drops:
            caps[Site(layer, "resid_pre")] = lambda x, layer=layer: block_in.__setitem__(layer, x)
        # zero tensors added to the activations (and to the dropped blocks' outputs) carry the gradient
        read_sites = set(sites)
        for s in sorted(read_sites | taps, key=lambda s: s.order):
            def read(x: torch.Tensor, s: Site = s) -> torch.Tensor:
                if s in read_sites:
                    acts[s] = x.detach()
                deltas[s] = torch.zeros_like(x, requires_grad=True)
                return x + deltas[s]
            edits.setdefault(s, []).append(read)
        for s, fn in list(caps.items()):
            if s in edits:  # capture after the site's edits, in one function
                edits[s].append(lambda x, fn=fn: (fn(x), x)[1])
                del caps[s]
        edit_fns = {s: _compose(fs) for s, fs in edits.items()}
        need = sorted(read_sites | taps, key=lambda s: s.order)
        with self.model.evaluating(), torch.enable_grad():
            hook_edits = {s: f for s, f in edit_fns.items() if s != final}
            with self.ad.hooks(hook_edits, caps) as fired:
                x = self.ad.run_blocks(P, start, 1) if start < L else P.resid[L].clone()
            check_fired(fired, hook_edits)
            if final in edit_fns:
                x = edit_fns[final](x)
            logits = ad.logits(x[:, -1])
            idx = self.groups[g]
            clean = self.clean_logits()[idx] if self.metric.needs_clean else None
            mvals = self.metric(logits, self.task.answer_ids[idx], self.task.alternative_ids[idx], clean)
            gr = torch.autograd.grad(mvals.sum(), [deltas[s] for s in need], allow_unused=True,
                                     retain_graph=bool(drops))
            full = {s: torch.zeros_like(deltas[s]) if v is None else v.detach() for s, v in zip(need, gr)}
            below: dict[int, dict[Site, torch.Tensor]] = {}
            for layer in drops:
                under = [s for s in sites if s.layer < layer or s == Site(layer, "resid_pre")]
                xin = block_in[layer]
                got: tuple[Any, ...] = (None,) * len(under)
                if under and xin.requires_grad:
                    got = torch.autograd.grad(xin, [deltas[s] for s in under], full[Site(layer + 1, "resid_pre")],
                                              retain_graph=True, allow_unused=True)
                below[layer] = {s: torch.zeros_like(deltas[s]) if v is None else v.detach() for s, v in zip(under, got)}
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
        for s in sites:
            def read(x: torch.Tensor, s: Site = s) -> torch.Tensor:
                acts[s] = x.detach()
                deltas[s] = torch.zeros_like(x, requires_grad=True)
                return x + deltas[s]
            edits.setdefault(s, []).append(read)
        for s, fn in list(caps.items()):
            if s in edits:  # capture after the site's edits, in one function
                edits[s].append(lambda x, fn=fn: (fn(x), x)[1])
                del caps[s]
        edit_fns = {s: _compose(fs) for s, fs in edits.items()}
        with self.model.evaluating(), torch.enable_grad():
            hook_edits = {s: f for s, f in edit_fns.items() if s != final}
            with self.ad.hooks(hook_edits, caps) as fired:
                x = self.ad.run_blocks(P, start, k) if start < L else P.resid[L].repeat(k, 1, 1)
            check_fired(fired, hook_edits)
            if final in edit_fns:
                x = edit_fns[final](x)
            logits = ad.logits(x[:, -1])
            idx = self.groups[g]
            a = self.task.answer_ids[idx].repeat(k)
            b = self.task.alternative_ids[idx].repeat(k)
            clean = self.clean_logits()[idx].repeat(k, 1) if self.metric.needs_clean else None
            mvals = self.metric(logits, a, b, clean)
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
        at once. ``Runner.fast_qk = False``: the plain reference, one full forward per change. With
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
        order = sorted(todo, key=lambda c: lay[c])
        with progress_bar(len(order) * len(self.groups), label, self.progress) as bar:
            for g, idx in enumerate(self.groups):
                it = torch.tensor(idx)
                P = self.local_prefix(g, source)
                B, T = P.batch, P.resid[0].shape[1]
                pos = 0
                while pos < len(order):
                    chunk = order[pos:pos + max(1, self.token_budget // (B * T) - 1)]
                    while True:
                        try:
                            part = self._qk_chunk(g, source, [changes[c] for c in chunk], [lay[c] for c in chunk],
                                                  reads)
                            break
                        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
                            if isinstance(e, RuntimeError) and "out of memory" not in str(e).lower() \
                                    and not isinstance(e, torch.OutOfMemoryError):
                                raise
                            if len(chunk) == 1:
                                raise ResourceError(_oom_advice(B, T)) from None
                            chunk = chunk[:max(1, len(chunk) // 2)]
                            self.token_budget = (len(chunk) + 1) * B * T
                    ci = torch.tensor(chunk)
                    out[:, ci[:, None], it[None, :]] = part.cpu()
                    pos += len(chunk)
                    bar.update(len(chunk))
        return out * use[..., None]

    def _qk_chunk(self, g: int, source: str, changes: Sequence[SenderChange], lays: Sequence[int],
                  reads: Sequence[GradientOutput]) -> torch.Tensor:
        """The QK-fix terms (R, k, B) of ``changes`` (senders' layers ``lays``) on group ``g``: per downstream
        layer one call of its block's attention on the stacked inputs ``x_l + change`` and one unchanged
        copy ``x_l``, whose values (v) every copy takes (only the last copy's are computed where the adapter
        can: :meth:`Adapter.attention_z`)."""
        ad = self.ad
        P = self.local_prefix(g, source)
        B, L, k = P.batch, ad.n_layers, len(changes)
        order = sorted(range(k), key=lambda j: lays[j])  # senders below a layer are then a leading block
        d = self._stacked_changes(g, source, [changes[j] for j in order])
        part = torch.zeros(len(reads), k, B, dtype=torch.float64, device=ad.device)
        cdt = torch.float64 if ad.dtype == torch.float64 else torch.float32

        for layer in range(lays[order[0]] + 1, L):
            kk = sum(lays[j] < layer for j in order)
            x = P.resid[layer]
            with torch.no_grad():
                hidden = x.new_empty((kk + 1) * B, *x.shape[1:])
                torch.add(d[:kk], x, out=hidden[:kk * B].unflatten(0, (kk, B)))
                hidden[kk * B:] = x
                with self.model.evaluating():
                    z = self.ad.attention_z(P, layer, kk + 1, hidden, shared_values=True)
                # reduced in float64 for a float64 model, else in float32 (a rounding-level difference)
                dz = (z[:kk * B].reshape(kk, B, -1) - z[kk * B:].reshape(1, B, -1)).to(cdt)
                # one product per distinct gradient tensor (reads that drop a layer below this one share the
                # full gradient here); none for reads whose drop is at or below every sender (unused) or is
                # this layer (the gradient inside a dropped block is zero)
                uniq: dict[int, list[int]] = {}
                for r, rd in enumerate(reads):
                    if Site(layer, "z") in rd.grads and (rd.drop_layer is None or lays[order[0]] < rd.drop_layer != layer):
                        uniq.setdefault(id(rd.grads[Site(layer, "z")][g]), []).append(r)
                if not uniq:
                    continue
                G = torch.stack([reads[rs[0]].grads[Site(layer, "z")][g].to(ad.device, cdt) for rs in uniq.values()])
                got = torch.einsum("kbx,rbx->rkb", dz, G.view(len(uniq), B, -1)).to(torch.float64)
                rows = torch.tensor(order[:kk], device=ad.device)
                for u, rs in enumerate(uniq.values()):
                    for r in rs:
                        part[r, rows] += got[u]
        return part

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
            _check_finite(p.last(final), f"the {s} run")
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
        runs = {source, change.value}
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
        get = (lambda s: _full_of(P, s)) if every else (lambda s: _last_of(P, s))
        x_last = _last_of(P, final).repeat(k, 1)
        last = {s: _last_of(P, s).repeat(k, 1) for s in capture}
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
        for r in reads:
            for s in r.sites:
                self.ad.path_of(s)
            if r.drop_layer is not None and not 0 <= r.drop_layer < L:
                raise OptionError(f"drop_layer {r.drop_layer} is outside layers 0..{L - 1}.")
        n, K = len(self.task), len(reads)
        metric = torch.empty(n, dtype=torch.float64)
        acts: dict[Site, list[torch.Tensor]] = {}
        grads: list[dict[Site, list[torch.Tensor]]] = [{} for _ in reads]
        with progress_bar(K * len(self.groups), label, self.progress) as bar:
            for g, idx in enumerate(self.groups):
                a, b = self.task.answer_ids[idx], self.task.alternative_ids[idx]
                clean = self.clean_logits()[idx] if self.metric.needs_clean else None
                x_last = _last_of(self.prefix(g, source), Site(L, "resid_pre"))
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
        shadow: dict[int, int] = {}
        shadow_layers: dict[int, set[int]] = {}
        for ci, c in enumerate(copies):
            sl = self._shadow_layers(c)
            if sl:
                shadow[ci] = k + len(shadow)
                shadow_layers[ci] = sl
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
                x = _compose(self._edits(g, source, plain, B)[final])(x)
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

    def share_clean_runs(self, other: Runner) -> None:
        """Reuse ``other``'s unedited clean forwards (prefixes) and per-position means.

        For two runners whose tasks have the same clean prompts in the same
        order (one task under two corruptions, or under two metrics) and whose
        means come from those clean prompts: afterwards only this runner's
        corrupted runs are new work. ``other``'s clean prefixes are computed
        now if they are not yet. Raises :class:`TaskError` when the clean
        prompts differ.
        """
        a, b = self.task, other.task
        if len(a) != len(b) or any(not torch.equal(x, y) for x, y in zip(a.clean_ids, b.clean_ids)):
            raise TaskError("share_clean_runs needs tasks with the same clean prompts in the same order.")
        for g in range(len(self.groups)):
            self._prefix.setdefault((g, "clean"), other.prefix(g, "clean"))
        if self.reference is self.task and other.reference is other.task:
            self._means, self._mean_len = other.means(), other._mean_len


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


# ---------------------------------------------------------------- nnsight: unedited forwards, fetched piecewise
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


def _last_of(p: Prefix, site: Site) -> torch.Tensor:
    """The last position (B, width) of an unedited forward's ``site`` (z, mlp_out or resid_pre)."""
    if isinstance(p, RemotePrefix):
        return p.last(site)
    return _full_of(p, site)[:, -1]


def _full_of(p: Prefix, site: Site) -> torch.Tensor:
    if isinstance(p, RemotePrefix):
        return p.get(site, "all")
    return p.resid[site.layer] if site.kind == "resid_pre" else p.captures[site]
