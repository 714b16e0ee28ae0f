"""Shared argument handling for the effect functions."""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from ..checks import check_positions
from ..errors import ComponentError, InputError, OptionError, TaskError
from ..metrics import Metric, get_metric
from ..models.wrapper import HookedModel, load_model
from ..runner import Runner

SCALES = ("frozen", "recomputed")


def check_scale(scale: Any) -> str:
    if scale not in SCALES:
        raise OptionError(f"unknown scale policy {scale!r}; choose 'frozen' (clean final-norm scale) or "
                          "'recomputed' (each run's own scale).")
    return scale


def as_model(model: Any) -> HookedModel:
    return model if isinstance(model, HookedModel) else load_model(model)


def check_task(model: HookedModel, task: Any) -> None:
    if not hasattr(task, "pairs") or not hasattr(task, "clean_ids"):
        raise TaskError(f"expected a hydra_probe Task; got {type(task).__name__}. Build one with "
                        "tasks.ioi(model, n_prompts) or tasks.from_pairs(model, rows).")
    if len(task) == 0:
        raise TaskError("the task is empty; build it with at least one prompt pair "
                        "(tasks.ioi(model, n_prompts=8) or tasks.from_pairs(model, rows)).")
    top = int(max(task.answer_ids.max(), task.alternative_ids.max(), max(int(t.max()) for t in task.clean_ids)))
    if top >= model.adapter.vocab_size:
        raise TaskError(f"the task has token id {top}, beyond this model's vocabulary ({model.adapter.vocab_size}); "
                        "was it built for another model? Build the task with this model's tokenizer "
                        "(tasks.ioi(model, ...) or tasks.from_pairs(model, rows)).")


def check_writers(components: Any, what: str) -> None:
    """Refuse residual-stream components (``RESID{l}``) where only writers (heads, ATTN, MLP) make sense."""
    from ..components import Group

    flat = [c for g in components for c in (g.members if isinstance(g, Group) else (g,))]
    bad = [c.name for c in flat if c.kind == "resid"]
    if bad:
        raise ComponentError(
            f"{', '.join(bad)} is the residual stream, which can be patched (activation_patch) but has no {what}; "
            "name heads, ATTN or MLP components (e.g. 'heads', 'L0H1', 'MLP2')."
        )


def positions_of(positions: Any) -> tuple[int, ...] | None:
    """``None`` (all), an int, a list of ints, or ``"last"``."""
    if positions is None or positions == "all":
        return None
    if positions == "last":
        return (-1,)
    if isinstance(positions, int):
        return (positions,)
    if isinstance(positions, Sequence) and not isinstance(positions, str) and all(isinstance(p, int) for p in positions):
        return tuple(positions)
    raise OptionError(f"positions must be None (all), an int, a list of ints or 'last'; got {positions!r}.")


def make_runner(model: HookedModel, task: Any, metric: Any, value: Any = None, seed: int = 0,
                progress: bool | None = None, positions: tuple[int, ...] | None = None) -> tuple[Runner, Metric]:
    """Validate the common arguments (before any forward pass) and build a :class:`Runner`."""
    check_task(model, task)
    m = get_metric(metric)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise OptionError(f"seed must be an integer; got {seed!r}.")
    check_positions(positions, task)
    reference = None
    if value is not None and not isinstance(value, str):
        if not hasattr(value, "clean_ids"):
            raise OptionError(f"value must be 'zero', 'mean', 'resample' or a reference Task; got {type(value).__name__}.")
        check_task(model, value)
        if max(task.lengths) > max(value.lengths):
            raise TaskError(
                f"the reference task's prompts are at most {max(value.lengths)} tokens, so they give no mean for "
                f"positions of the task's {max(task.lengths)}-token prompts; use a reference task with prompts at "
                "least as long."
            )
        reference = value
    if value == "resample":
        lone = sorted({len(task.clean_ids[g[0]]) for g in task.groups() if len(g) < 2})
        if lone:
            raise TaskError(
                f"resample ablation draws from other prompts of the same token length, but the task has a single "
                f"prompt of {' and of '.join(map(str, lone))} tokens; add prompts of that length or use value='mean'."
            )
    cache = _SHARED.get()
    if cache is None:
        runner = Runner(model, task, m, reference=reference, seed=seed, progress=progress)
    else:
        runner = _shared_runner(cache, model, task, metric, m, reference, int(seed), progress)
    runner.value_hint = value  # what the nnsight path's first request should already bring (means' sums)
    return runner, m


#: False: :func:`shared_runs` shares nothing, each analysis builds its own runner (the plain reference, for tests
#: and benchmarks; same numbers)
SHARE_RUNS: bool = True
#: False: the runners of a :func:`shared_runs` block share their unedited runs only, no intervened copy's results
#: (``Runner.memo``); then the numbers are bit for bit those without sharing
REUSE_RESULTS: bool = True
#: the runners of the active :func:`shared_runs` block (None outside one)
_SHARED: ContextVar[dict[tuple, Runner] | None] = ContextVar("hydra_probe_shared_runs", default=None)


@contextmanager
def shared_runs() -> Iterator[None]:
    """While active, the analyses of one model and task share their unedited runs (used by ``triangulate``).

    Inside the block, :func:`make_runner` hands every call with the same model, task, metric, reference
    task, seed and attention implementation the same :class:`Runner` (with this call's ``progress``), so
    the clean and corrupted forwards with their captures, the mean-ablation values, the readout and the
    clean logits are computed once for all of them; a runner that differs only in metric, reference or
    seed shares the unedited forwards too (local backend; they depend on none of these). The numbers are
    the same as without sharing (the same computations, run once). The runners of one model, task, metric,
    reference and seed also share their intervened copies' results (``Runner.memo``, :data:`REUSE_RESULTS`):
    the paired-ablation confirmations and the iterated ablation reuse the single ablations of the self-repair
    sweep, which may have run with eager attention (equal to float rounding). The unedited runs stay in
    memory until the block ends. Nested blocks share the outermost one's runners; outside any block each analysis
    builds its own runner, as before.
    """
    token = _SHARED.set({}) if SHARE_RUNS and _SHARED.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _SHARED.reset(token)


def _shared_runner(cache: dict[tuple, Runner], model: HookedModel, task: Any, metric: Any, m: Metric,
                   reference: Any, seed: int, progress: bool | None) -> Runner:
    """The runner of ``cache`` for these arguments, built on first use (see :func:`shared_runs`).

    Keys hold ``id``s; the cached runner refers to the model, task, metric and reference, so they stay alive
    (and their ``id``s unique) while the cache does. A metric given by name or as a :class:`Metric` is that
    object; a plain callable is keyed by itself (``get_metric`` wraps it anew on every call)."""
    attn = getattr(getattr(model.adapter, "config", None), "_attn_implementation", None)
    runs = (id(model), id(task), str(attn))  # what the unedited forwards depend on
    conditions = (id(m) if metric is None or isinstance(metric, (str, Metric)) else id(metric), id(reference), seed)
    key = (*runs, *conditions)
    runner = cache.get(key)
    if runner is None:
        runner = Runner(model, task, m, reference=reference, seed=seed, progress=progress)
        sibling = cache.get(runs)
        if sibling is None:
            cache[runs] = runner
        elif model.backend != "nnsight":  # nnsight's unedited runs are fetched per runner (what it declared)
            runner._prefix = sibling._prefix
        if REUSE_RESULTS:  # one memo for every attention implementation (key without it)
            runner.memo = cache.setdefault(("memo", id(model), id(task), *conditions), {})  # type: ignore[assignment]
        cache[key] = runner
    runner.progress = progress
    return runner


def value_name(value: Any) -> str:
    from ..interventions import check_value

    return "mean" if not isinstance(value, str) and hasattr(value, "clean_ids") else check_value(value)


def prompts(task: Any) -> torch.Tensor:
    return torch.arange(len(task))


def ensure(cond: bool, msg: str) -> None:
    if not cond:
        raise InputError(msg)


#: Provenance keys an exact result must share with the estimates compared with it (estimate ``agreement``).
SAME_CONDITIONS = ("model", "task", "corruption", "task_seed", "n", "metric")


def check_same_conditions(estimates: dict[str, Any], exact: dict[str, Any], keys: Sequence[str], fix: str) -> None:
    """Raise :class:`InputError` naming each of ``keys`` whose provenance differs between ``exact`` and
    ``estimates`` (an agreement across conditions compares two claims); ``fix``: how to compare instead."""
    off = [f"{k} {exact.get(k)!r} (estimates: {estimates.get(k)!r})" for k in keys if exact.get(k) != estimates.get(k)]
    if off:
        raise InputError(f"the exact result was run under other conditions than the estimates: {'; '.join(off)}; "
                         f"{fix}")
