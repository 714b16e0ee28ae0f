"""Metrics read at each prompt's last position, one number per prompt.

A metric maps last-position logits (B, vocab) to values (B,). Linear metrics
(``logit_diff``, ``logit``) also give the unembedding direction ``u`` so that
direct effects are defined. A user callable ``fn(logits, answer_ids,
alternative_ids) -> (B,)`` works too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import MetricError, NumericalError


@dataclass(frozen=True)
class Metric:
    """A metric: ``name``, whether it is linear in the logits, and the function."""

    name: str
    linear: bool
    fn: Callable[..., torch.Tensor]
    needs_clean: bool = False
    description: str = ""
    #: for a linear metric other than ``logit_diff`` / ``logit``: ``fn(adapter, answer, alternative) -> (u, bias)``
    #: with ``u`` (B, d) and ``bias`` (B,) such that metric = N(x) . u + bias (e.g. a task's set-of-tokens proxy)
    readout: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def __call__(self, logits: torch.Tensor, answer: torch.Tensor, alternative: torch.Tensor,
                 clean_logits: torch.Tensor | None = None) -> torch.Tensor:
        out = self.fn(logits, answer, alternative, clean_logits) if self.needs_clean else self.fn(logits, answer, alternative)
        if not torch.is_tensor(out) or out.shape != (logits.shape[0],):
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise MetricError(
                f"metric {self.name!r} returned {shape}; it must return one number per prompt, a tensor of shape "
                f"({logits.shape[0]},), from logits of shape {tuple(logits.shape)}."
            )
        if not torch.isfinite(out).all():
            bad = torch.nonzero(~torch.isfinite(out)).flatten().tolist()
            raise NumericalError(
                f"metric {self.name!r} produced NaN or infinite values ({len(bad)} of {len(out)} prompts in a batch); "
                "check the metric function (e.g. a log of a non-positive number) and the model's weights and dtype."
            )
        return out


def _take(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, ids.view(-1, 1).to(logits.device)).squeeze(-1)


def _logit_diff(lg, a, b):
    return _take(lg, a) - _take(lg, b)


def _logit(lg, a, b):
    return _take(lg, a)


def _logprob(lg, a, b):
    return _take(torch.log_softmax(lg.float(), -1), a)


def _prob(lg, a, b):
    return _take(torch.softmax(lg.float(), -1), a)


def _ce(lg, a, b):
    return -_take(torch.log_softmax(lg.float(), -1), a)


def _kl(lg, a, b, clean):
    if clean is None:
        raise MetricError("the KL metric needs the clean run's logits.")
    p = torch.log_softmax(clean.float(), -1)
    q = torch.log_softmax(lg.float(), -1)
    return (p.exp() * (p - q)).sum(-1)


METRICS: dict[str, Metric] = {
    "logit_diff": Metric("logit_diff", True, _logit_diff, description="logit(answer) - logit(alternative)"),
    "logit": Metric("logit", True, _logit, description="logit of the answer"),
    "logprob": Metric("logprob", False, _logprob, description="log-probability of the answer"),
    "prob": Metric("prob", False, _prob, description="probability of the answer"),
    "cross_entropy": Metric("cross_entropy", False, _ce, description="cross-entropy of the answer (-logprob)"),
    "kl": Metric("kl", False, _kl, needs_clean=True, description="KL(clean || run) of the next-token distribution"),
}


def get_metric(metric: str | Metric | Callable | None) -> Metric:
    """Resolve a metric name, a :class:`Metric` or a callable ``fn(logits, answer, alternative)``."""
    if metric is None:
        return METRICS["logit_diff"]
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        try:
            return METRICS[metric]
        except KeyError:
            raise MetricError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)} or pass a callable.") from None
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), False, metric)
    raise MetricError(f"a metric is a name or a callable; got {type(metric).__name__}.")


def direction(adapter, metric: Metric, answer: torch.Tensor, alternative: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """For a linear metric: (u (B, d), bias (B,)) with metric = N(x) . u + bias."""
    if not metric.linear:
        raise MetricError(
            f"direct effects need a metric linear in the logits (logit_diff or logit); {metric.name!r} is not. "
            "Use metric='logit_diff'."
        )
    a, b = answer.to(adapter.device), alternative.to(adapter.device)
    if metric.readout is not None:
        u, bias = metric.readout(adapter, a, b)
        return u.detach(), bias.detach()
    bu = adapter.b_U(a)
    if metric.name == "logit_diff":
        u = adapter.W_U(a) - adapter.W_U(b)
        bias = torch.zeros(len(a), device=adapter.device) if bu is None else bu - adapter.b_U(b)
    else:
        u = adapter.W_U(a)
        bias = torch.zeros(len(a), device=adapter.device) if bu is None else bu
    return u.detach(), bias.detach()
