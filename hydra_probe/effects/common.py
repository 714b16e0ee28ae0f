"""Shared argument handling for the effect functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InputError, OptionError, TaskError
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
        raise TaskError(f"expected a hydra_probe Task (tasks.ioi / tasks.from_pairs); got {type(task).__name__}.")
    if len(task) == 0:
        raise TaskError("the task is empty.")
    top = int(max(task.answer_ids.max(), task.alternative_ids.max(), max(int(t.max()) for t in task.clean_ids)))
    if top >= model.adapter.vocab_size:
        raise TaskError(f"the task has token id {top}, beyond this model's vocabulary ({model.adapter.vocab_size}); "
                        "was it built for another model?")


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
                progress: bool | None = None) -> tuple[Runner, Metric]:
    """Validate the common arguments and build a :class:`Runner`."""
    check_task(model, task)
    m = get_metric(metric)
    reference = None
    if value is not None and not isinstance(value, str):
        if not hasattr(value, "clean_ids"):
            raise OptionError(f"value must be 'zero', 'mean', 'resample' or a reference Task; got {type(value).__name__}.")
        reference = value
    return Runner(model, task, m, reference=reference, seed=seed, progress=progress), m


def value_name(value: Any) -> str:
    from ..interventions import check_value

    return "mean" if not isinstance(value, str) and hasattr(value, "clean_ids") else check_value(value)


def prompts(task: Any) -> torch.Tensor:
    return torch.arange(len(task))


def ensure(cond: bool, msg: str) -> None:
    if not cond:
        raise InputError(msg)
