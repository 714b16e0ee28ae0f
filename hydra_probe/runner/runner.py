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

The class is assembled from its parts: path patching (deliveries) in ``paths.py``, gradient reads and
AtP*'s QK fix in ``gradients.py``, the nnsight branches and lazily fetched unedited runs in
``nnsight_runs.py``; what they share in ``base.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from ..errors import InterventionError, OptionError, ResourceError, TaskError
from ..interventions import ABLATION_VALUES, Delivery, Intervention
from ..metrics import Metric
from ..models.plumbing import Prefix, check_fired
from ..models.sites import READ_ONLY_KINDS, Site
from .base import (
    SOURCES,
    CapturePositions,
    Copy,
    RunOutput,
    check_finite,
    compose,
    default_budget,
    first_true,
    halving,
    on_later_rows,
    oom_advice,
    progress_bar,
)
from .gradients import GradientsMixin
from .nnsight_runs import NnsightMixin, RemotePrefix, last_of
from .paths import PathsMixin
from .readout import Readout


class Runner(PathsMixin, GradientsMixin, NnsightMixin):
    """Runs interventions for one model, task and metric (see module doc).

    ``Runner.fast_attention`` (default True): a copy whose earliest edits are
    heads' outputs (``z``) restarts at that layer's attention output
    projection, the layer's attention taken from the cached prefix (it does
    not depend on the edit); False recomputes it (the plain path).
    ``Runner.last_query_only`` (default True): where a sweep reads nothing
    but the last position of the final residual, the final block's attention
    computes its queries, scores and output for the last position only (keys
    and values at every position); False computes every position.
    ``Runner.fast_qk`` and ``Runner.shared_gradients`` (default True) switch
    AtP*'s engine (:meth:`qk_fix`, :meth:`gradients`) to its plain reference
    when False (same numbers, for tests and benchmarks).
    ``Runner.qk_changed_rows_only`` (default True): the fast QK fix computes
    each layer's attention for the query rows from the first position where a
    sender's change is nonzero on (in a causal attention the rows before it
    do not change); False computes every row (same numbers).

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
    #: the final block's attention works for the last query position only where nothing else is read
    #: (see ``Adapter.run_blocks(last_query=True)``); False: it computes every position (the plain path)
    last_query_only: bool = True
    #: AtP*'s QK fix runs only each downstream layer's attention, all senders stacked (False: the plain
    #: reference, one full forward per sender with every block input pinned and a delivery to q and k)
    fast_qk: bool = True
    #: gradient reads share one forward per group (GradDrop reads as vector-Jacobian products of the
    #: blocks under the dropped layer); False: the plain reference, one stacked copy per read
    shared_gradients: bool = True
    #: GradDrop's reads go down the blocks together: one vector-Jacobian product per block for every dropped
    #: layer above it (``torch.autograd.grad(is_grads_batched=True)``); False: one product per dropped layer
    #: through all the blocks under it (the plain reference; same numbers to float rounding)
    graddrop_together: bool = True
    #: the QK fix composes a lone head's change with the q/k projections (head_dim rows per head instead of
    #: one projection per prompt position); False: every copy's q/k projected from its block input
    compose_qk: bool = True
    #: the fast QK fix skips the query rows before the first position where a change of the chunk is nonzero
    #: (their q, k and z are the unchanged run's in a causal attention; per length group, from the data);
    #: False: every query row (the plain reference of the restriction)
    qk_changed_rows_only: bool = True
    #: on the QK fix's pattern route, a layer's query rows before the first position where a read's gradient at
    #: its heads' output is nonzero (the final layer: all but the read position) add nothing: their patterns are
    #: not formed, nor, on the composed route, the changed copies' queries there; False: every query row (the
    #: plain reference of the restriction)
    qk_read_rows: bool = True
    #: on the QK fix's composed pattern route the unchanged copy's pattern is formed with a layer's first chunk of
    #: changes and kept for its others (which then run their changed copies alone); False: every chunk runs it
    qk_unchanged_once: bool = True
    #: the QK fix reads each copy's attention pattern against ``grad_z . V`` (the values are the base run's)
    #: instead of forming its heads' output ``z`` (``Adapter.attention_patterns_given``); False: the output route
    qk_patterns: bool = True
    #: ... where a prompt's keys are at most this many head dimensions: measured on GPT-2-small's shape (head_dim
    #: 64), the pattern route is faster at 16 keys, even at 32-64, and 1.6x slower at 128, where a copy's
    #: patterns (H, T, T) outgrow its output (T, H * head_dim) and the output route's sdpa kernel forms none
    qk_pattern_keys: float = 0.5
    #: a stacked forward whose interventions leave the rows before some position as the unedited run has them
    #: (patching between prompts that share a prefix) runs the later rows only, with the unedited run's keys
    #: and values of the earlier rows (``Adapter.run_blocks(first_row=)``); False: every row (the plain path)
    suffix_rows: bool = True

    def __init__(self, model: Any, task: Any, metric: Metric, reference: Any = None, seed: int = 0,
                 token_budget: int | None = None, progress: bool | None = None) -> None:
        if len(task) == 0:
            raise TaskError("the task is empty; build it with at least one prompt pair "
                            "(tasks.ioi(model, n_prompts=8) or tasks.from_pairs(model, rows)).")
        self.model, self.task, self.metric = model, task, metric
        self.ad = model.adapter
        self.reference = reference if reference is not None else task
        self.seed = seed
        self.token_budget = token_budget if token_budget is not None else default_budget(model)
        self.progress = progress
        self.groups = task.groups()
        self._prefix: dict[tuple[int, str], Prefix] = {}
        self._ablated: dict[tuple[int, str], Prefix] = {}
        self._handoff: dict[Any, Any] = {}  # every-row gradient outputs for the next changed-rows call (gradients)
        self._means: dict[Site, torch.Tensor] | None = None
        self._readout: Readout | None = None
        self._clean_logits: torch.Tensor | None = None
        self._changes: dict[Any, torch.Tensor] = {}
        self._no_compose: set[int] = set()  # layers whose attention input is not the norm the QK fix composes
        self._no_patterns: set[int] = set()  # layers whose attention the QK fix's pattern route does not take
        self._qk_weights: dict[Any, torch.Tensor] = {}  # composed q/k weights of the QK fix (see QK_WEIGHT_CACHE)
        self._qk_weight_bytes = 0
        self._qk_bufs: dict[Any, torch.Tensor] = {}  # the QK fix's workspace while it runs (_qk_workspace)
        self._qk_layers: dict[str, Any] = {}  # the last QK fix's per-layer memo of its base run (_base_run_only)
        self._graddrop_apart = False  # a GradDrop batch failed (an op vmap cannot batch): one product per drop
        self._qk_cross_bytes = 0
        self._rows: dict[tuple[int, str, Any], int] = {}  # see _unedited_rows
        #: nnsight: what the unedited forwards must return, per (group, source) {site: {"last", "all", "sum"}}
        #: (declared by :meth:`run`, fetched with the first request; see :class:`RemotePrefix`)
        self._want: dict[tuple[int, str], dict[Site, set[str]]] = {}
        #: the ablation value the caller's sweeps will use (set by ``make_runner``): with ``"mean"`` the first
        #: nnsight request already brings the clean sums the means need
        self.value_hint: Any = None
        self._mean_sums: dict[tuple[int, Site], torch.Tensor] = {}
        self._mean_want: set[Site] = set()
        #: earlier copies' results (metric, final residual, readout), shared by the runners of one report
        #: (``effects.common.shared_runs``); None: nothing is reused (see :meth:`run`)
        self.memo: dict[tuple, RunOutput] | None = None

    # ---------------------------------------------------------------- caches
    def capture_sites(self) -> set[Site]:
        L = self.ad.n_layers
        return {Site(l, k) for l in range(L) for k in ("z", "mlp_out")}

    def prefix(self, g: int, source: str) -> Prefix:
        """The unedited forward of group ``g`` on the ``source`` prompts. ``source`` an ablation value
        (``"zero"``, ``"mean"``, ``"resample"``): :meth:`ablated_prefix` (captures only)."""
        if source in ABLATION_VALUES:
            return self.ablated_prefix(g, source)
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
                raise ResourceError(oom_advice(*ids.shape)) from e
            check_finite(p.last(Site(self.ad.n_layers, "resid_pre")) if isinstance(p, RemotePrefix) else p.resid[-1],
                          f"the {source} run")
            self._prefix[key] = p
        return self._prefix[key]

    def local_prefix(self, g: int, source: str) -> Prefix:
        """Like :meth:`prefix`, but always from the local path (with block calls, for restarting)."""
        if self.model.backend != "nnsight" or source in ABLATION_VALUES:
            return self.prefix(g, source)
        key = (g, source + ":local")
        if key not in self._prefix:
            with self.model.evaluating():
                self._prefix[key] = self.ad.prefix(self.task.batch(self.groups[g], source), capture=self.capture_sites())
        return self._prefix[key]

    def ablated_prefix(self, g: int, value: str) -> Prefix:
        """Group ``g``'s ablation replacements as a prefix holding captures only: ``captures[site]`` (B, T, width)
        is what :meth:`value` puts at ``site`` (every ``z`` and ``mlp_out``) when ablating with ``value`` on the
        clean run (zeros for ``"zero"``), formed on first access. No residuals or block calls: it serves sender
        changes (:class:`~hydra_probe.interventions.SenderChange` with an ablation value), not restarts.
        On nnsight the clean run's captures it reads must have been fetched at every position."""
        key = (g, value)  # per runner (its reference and seed), not in the _prefix its siblings share
        if key not in self._ablated:
            self._ablated[key] = Prefix([], [], _Replacements(self, g, value))
        return self._ablated[key]

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
            self._clean_logits = torch.cat([self._logits_of(last_of(self.prefix(g, "clean"), final))
                                            for g in range(len(self.groups))])[self._inverse()]
        return self._clean_logits

    def _logits_of(self, x_last: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.ad.logits(x_last)

    def metric_of(self, x_last: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  clean: torch.Tensor | None = None, metric: Metric | None = None) -> torch.Tensor:
        """The metric (the runner's, or ``metric``) of final residuals ``x_last`` (N, d) with answers ``a`` and
        alternatives ``b`` (N,) (and the clean logits where the metric needs them): (N,), differentiable. A
        metric that reads only those two logits (``Metric.columns_only``) gets them alone (``Adapter.logits_at``)."""
        m = self.metric if metric is None else metric
        if self.metric_columns(m):
            return self._metric_of_columns(self.ad.logits_at(x_last, torch.stack([a, b], -1)), m)
        return m(self.ad.logits(x_last), a, b, clean)

    def metric_columns(self, metric: Metric | None = None) -> bool:
        """Whether the metric (the runner's, or ``metric``) reads only the answer's and the alternative's logits
        (``Metric.columns_only``, without the clean logits): those two columns are unembedded alone."""
        m = self.metric if metric is None else metric
        return m.columns_only and not m.needs_clean

    def _metric_of_columns(self, two: torch.Tensor, metric: Metric | None = None) -> torch.Tensor:
        """The metric (the runner's, or ``metric``) of (N, 2) logits: the answer's, then the alternative's."""
        first = torch.zeros(len(two), dtype=torch.long, device=two.device)
        return (self.metric if metric is None else metric)(two, first, first + 1)

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

        With a ``memo`` (the runners of one report share one; see ``effects.common.shared_runs``), a copy of
        interventions (no deliveries) that an earlier call already ran on ``source`` is not run again when
        nothing is captured: its metric, final residual and readout are the earlier run's (copies as clones).
        The earlier run may have used another attention implementation (the mechanisms' eager sweep), so a
        reused number equals a fresh one to float rounding. Copies run here are added to the memo.

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
        memo = self.memo if self.model.backend != "nnsight" else None
        keys = [_memo_key(source, c) for c in copies] if memo is not None else [None] * len(copies)
        served = {i: memo[k] for i, k in enumerate(keys)
                  if k is not None and not cap and k in memo and (memo[k].proj is not None or not readout)}
        todo = [i for i in range(len(copies)) if i not in served]
        outs = self._run(source, [copies[i] for i in todo], readout, label, cap, capture_positions) if todo else []
        result: list[RunOutput | None] = [None] * len(copies)
        for i, o in zip(todo, outs):
            result[i] = o
            if keys[i] is not None and (keys[i] not in memo or o.proj is not None):
                memo[keys[i]] = _results_only(o)
        for i, o in served.items():
            result[i] = _results_only(o, clone=True)
        return result  # type: ignore[return-value]

    def _run(self, source: str, copies: Sequence[Copy], readout: bool, label: str, cap: frozenset[Site],
             capture_positions: CapturePositions) -> list[RunOutput]:
        """:meth:`run` without the memo (``cap``: the checked capture sites)."""
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

    def _shadow_plan(self, copies: Sequence[Copy]) -> tuple[dict[int, int], dict[int, set[int]]]:
        """For the copies that need a shadow copy (:meth:`_shadow_layers`): (copy -> the shadow's batch index,
        after the ``len(copies)`` copies; copy -> its shadow layers)."""
        shadow: dict[int, int] = {}
        shadow_layers: dict[int, set[int]] = {}
        for ci, c in enumerate(copies):
            sl = self._shadow_layers(c)
            if sl:
                shadow[ci] = len(copies) + len(shadow)
                shadow_layers[ci] = sl
        return shadow, shadow_layers

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
            chunk, out, budget = halving(chunk, lambda c, s=start: forward(c, s),
                                         lambda c: sum(weights[i] for i in c), B, T)
            if budget is not None:  # keep the smaller budget
                self.token_budget = budget
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
        r = 0
        if self.suffix_rows and not every and start < self.ad.n_layers \
                and not any(s.kind in READ_ONLY_KINDS for s in capture):  # views over the keys: every row
            r = min(self._unedited_rows(g, source, copies, P), P.resid[0].shape[1] - 1)
        return on_later_rows(self.model, P, start, r,
                             lambda r: self._forward_local(g, source, copies, start, readout, capture, every, P, r))

    def _forward_local(self, g: int, source: str, copies: Sequence[Copy], start: int, readout: bool,
                       capture: frozenset[Site], every: bool, P: Prefix, r: int) -> dict[str, Any]:
        """:meth:`_forward` on the local path; ``r`` > 0: only the rows ``r..`` run (every copy leaves the
        earlier rows as ``P`` has them, :meth:`_unedited_rows`; see ``Adapter.run_blocks(first_row=)``)."""
        paths = any(isinstance(iv, Delivery) for c in copies for iv in c)
        k, B = len(copies), P.batch
        L = self.ad.n_layers
        final = Site(L, "resid_pre")
        edits = self._edits(g, source, copies, B, r)
        norm_fns: dict[tuple[int, str], Callable] = {}
        shadow: dict[int, int] = {}
        deliveries: list[tuple[int, Delivery]] = []
        if paths:
            shadow, deliveries = self._path_edits(g, source, copies, B, edits, norm_fns, r)
        n_rows = k + len(shadow)
        acts: dict[Site, torch.Tensor] = {}
        want = {Site(l, kind) for l in range(start, L) for kind in ("z", "mlp_out")} if readout else set()
        want |= {s for s in capture if s.layer >= start and s != final}
        caps: dict[Site, Callable] = {s: (lambda x, s=s: acts.__setitem__(s, x.detach())) for s in want}
        edit_fns = {s: compose(fs) for s, fs in edits.items()}
        norms = self.ad.norm_hooks(norm_fns) if norm_fns else contextlib.nullcontext({})
        with self.model.evaluating(), torch.no_grad(), self.ad.hooks(edit_fns, caps) as fired, norms as nfired:
            # only the last position is read: the final MLP may skip the others unless something edits it
            # or the final residual, or every position is captured, or a path is patched
            skip = not every and not paths and not any(s.layer >= L - 1 and s.kind != "z" for s in edits) \
                and not any(s.layer >= L - 1 and s.kind in ("mlp_in", "mlp_out") for s in capture)
            # likewise its attention may work for the last query only, unless a final-block site other than
            # the heads' outputs z (read before the cut) or its input is captured
            last_q = skip and self.last_query_only \
                and not any(s.layer == L - 1 and s.kind not in ("z", "resid_pre") for s in capture)
            z0 = None
            if self.fast_attention and not paths and start < L and self.ad.can_start_at_z(P, start) \
                    and all(iv.site.kind == "z" for c in copies for iv in c if iv.site.layer == start) \
                    and not any(s.layer == start and s.kind not in ("z", "mlp_out", "mlp_in", "resid_pre")
                                for s in capture):
                # the ablated heads' layer restarts at its output projection's input: its attention is the prefix's
                z0 = P.captures[Site(start, "z")][:, r:].repeat(n_rows, 1, 1)
            x = (self.ad.run_blocks(P, start, n_rows, last_position_mlp=skip, attn_z=z0, last_query=last_q,
                                    first_row=r)
                 if start < L
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
        check_finite(x_last, "an intervened run")
        a = self.task.answer_ids[idx].repeat(k)
        b = self.task.alternative_ids[idx].repeat(k)
        clean = self.clean_logits()[idx].repeat(k, 1) if self.metric.needs_clean else None
        if logits is None:
            with torch.no_grad():
                m = self.metric_of(x_last, a, b, clean).detach().to(torch.float64)
        elif self.metric_columns():  # path patching's two columns (_path_logits)
            m = self._metric_of_columns(logits).detach().to(torch.float64)
        else:
            m = self.metric(logits, a, b, clean).detach().to(torch.float64)
        out = {"metric": m.view(k, B), "resid": x_last.detach().to(torch.float64).view(k, B, -1)}
        if readout:
            L = self.ad.n_layers
            z = [last[Site(l, "z")] if l >= start else last_of(P, Site(l, "z")).repeat(k, 1) for l in range(L)]
            mlp = [last[Site(l, "mlp_out")] if l >= start else last_of(P, Site(l, "mlp_out")).repeat(k, 1)
                   for l in range(L)]
            ro = self.readout
            u = ro.u[torch.tensor(idx)]
            ps = ro.post_sigma(z)
            out["proj"] = ro.projections(z, mlp, u, ps).view(k, B, -1)
            if ps is not None:
                out["post_sigma"] = ps.view(k, B, -1)
            out["proj_const"] = ro.const_projection(last_of(P, Site(0, "resid_pre")).repeat(k, 1), u).view(k, B)
        return out

    def _edits(self, g: int, source: str, copies: Sequence[Copy], B: int, r: int = 0
               ) -> dict[Site, list[Callable]]:
        """Replacement edits of the copies' :class:`Intervention` items, per site (in a list, so that
        other edits of the same site can follow); ``r`` > 0: the edited tensors hold the rows ``r..`` only."""
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
                    p: Any = slice(None)
                    src: Any = slice(r, None)
                    if iv.positions is not None:
                        T = x.shape[1] + r
                        src = [q % T for q in iv.positions if q % T >= r]
                        p = [q - r for q in src]
                        if not p:
                            continue
                    if val is None:
                        x[rows, p, cols] = 0
                    else:
                        x[rows, p, cols] = val[:, src, cols].to(x.device, x.dtype)
                return x
            return edit

        return {s: [make(items)] for s, items in per_site.items()}

    def _unedited_rows(self, g: int, source: str, copies: Sequence[Copy], P: Prefix) -> int:
        """The first position where some intervention of ``copies`` changes its site's activation on group
        ``g`` of the ``source`` run ``P`` (T: none does; 0 where a site's activation is not at hand), or a
        delivery's sender change is nonzero. Before it every activation of every copy is ``P``'s in a causal
        model (patching between prompts that share a prefix; a mean or zero ablation changes the first row)."""
        T = P.resid[0].shape[1]
        r = T
        for c in copies:
            for iv in c:
                if isinstance(iv, Delivery) and iv.target == "logits":
                    continue  # added to the last position's logits
                key = (g, source, iv)
                if key not in self._rows:
                    self._rows[key] = (self._first_edited_row(g, source, iv, P) if isinstance(iv, Intervention)
                                       else first_true(self.sender_change(g, source, iv.change).ne(0)))
                r = min(r, self._rows[key])
                if r == 0:
                    return 0
        return r

    def _first_edited_row(self, g: int, source: str, iv: Intervention, P: Prefix) -> int:
        """The first position where ``iv`` changes its site's activation in ``P`` (T: nowhere)."""
        T = P.resid[0].shape[1]
        s = iv.site
        act = P.resid[s.layer] if s.kind == "resid_pre" else P.captures.get(s)
        if act is None:
            return 0
        cols = slice(*iv.cols) if iv.cols else slice(None)
        val = self.value(iv, g, source)
        a = act[..., cols]
        new = torch.zeros_like(a) if val is None else val[..., cols].to(a.device, a.dtype)
        changed = new != a
        if iv.positions is not None:
            keep = torch.zeros(T, 1, dtype=torch.bool, device=changed.device)
            keep[[q % T for q in iv.positions]] = True
            changed &= keep
        return first_true(changed)

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


def _results_only(o: RunOutput, clone: bool = False) -> RunOutput:
    """``o``'s metric, final residual and readout, without its captures (what the memo keeps); ``clone``:
    copies of the tensors."""
    def c(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.clone() if clone and t is not None else t
    return RunOutput(c(o.metric), c(o.resid), c(o.proj), c(o.proj_const), {}, None,  # type: ignore[arg-type]
                     c(o.post_sigma))


def _memo_key(source: str, copy: Copy) -> tuple | None:
    """The memo's key of ``copy`` run on ``source`` (None: not kept: a copy with deliveries). Interventions
    that all set the same value commute (overlaps get that value whatever the order), so their order is not
    part of the key."""
    if any(not isinstance(iv, Intervention) for iv in copy):
        return None
    same = len({iv.value for iv in copy}) <= 1
    return (source, frozenset(copy) if same else tuple(copy))


class _Replacements(dict):
    """:meth:`Runner.ablated_prefix`'s captures: each site's ablation replacement on group ``g``'s clean run,
    formed on first access (zeros where the value has none)."""

    def __init__(self, runner: Runner, g: int, value: str) -> None:
        super().__init__()
        self.runner, self.g, self.value = runner, g, value

    def __missing__(self, site: Site) -> torch.Tensor:
        base = self.runner.prefix(self.g, "clean").captures[site]
        v = self.runner.value(Intervention(site, None, None, self.value), self.g, "clean")
        self[site] = torch.zeros_like(base) if v is None else v.to(base.dtype)
        return self[site]
