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
    #: reads only the answer's and the alternative's logits: the runner then unembeds those two columns alone
    #: (``Adapter.logits_at``) and calls ``fn`` on (B, 2) logits with answer 0 and alternative 1
    columns_only: bool = False

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
    "logit_diff": Metric("logit_diff", True, _logit_diff, description="logit(answer) - logit(alternative)",
                         columns_only=True),
    "logit": Metric("logit", True, _logit, description="logit of the answer", columns_only=True),
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


def readout(metric: Metric, answer: torch.Tensor, alternative: torch.Tensor, vocab: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear metric's readout: ``metric(logits)[b] = <w[b], logits[b]> + c[b]``, read off the metric itself.

    ``w`` is the gradient of the metric with respect to the logits (exact for a
    metric linear in them), ``c`` the metric at zero logits. Returns
    ``(ids, w, c)``: the token ids with non-zero weight (K,), their weights
    (B, K) and the constant (B,), float64. Raises :class:`MetricError` when the
    metric is not linear (checked at random logits) or mixes prompts.
    """
    a, b = answer.cpu(), alternative.cpu()
    B = len(a)
    f = torch.float64
    gen = torch.Generator().manual_seed(0)

    def run(lg: torch.Tensor) -> torch.Tensor:
        out = metric.fn(lg, a, b)
        if not torch.is_tensor(out) or out.shape != (B,):
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise MetricError(f"metric {metric.name!r} returned {shape}; it must return one number per prompt, a "
                              f"tensor of shape ({B},), from logits of shape ({B}, {vocab}).")
        return out.to(f)

    try:
        zero = torch.zeros(B, vocab, dtype=f, requires_grad=True)
        m0 = run(zero)
        if not m0.requires_grad:
            w = torch.zeros(B, vocab, dtype=f)
        else:
            (w,) = torch.autograd.grad(m0.sum(), zero, allow_unused=True)
            w = torch.zeros(B, vocab, dtype=f) if w is None else w.detach()
        c = m0.detach()
        worst = 0.0
        with torch.no_grad():
            for _ in range(2):
                x = torch.randn(B, vocab, generator=gen, dtype=f) * 10
                got = run(x)
                want = (w * x).sum(-1) + c
                worst = max(worst, float((got - want).abs().max() / (1 + want.abs().max())))
    except MetricError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's function failed on our probe logits
        raise MetricError(f"metric {metric.name!r} failed on probe logits of shape ({B}, {vocab}) "
                          f"({type(e).__name__}: {e}); a metric maps logits (B, vocab) to (B,).") from None
    if not worst < 1e-6:
        raise MetricError(
            f"metric {metric.name!r} is declared linear but is not linear in the logits (it differs from its "
            f"linear part by {worst:.3g} relative at random logits, or mixes prompts); direct effects need "
            "metric = w . logits + c per prompt. Use a linear metric or one of logit_diff, logit."
        )
    ids = torch.nonzero(w.abs().sum(0)).flatten()
    return ids, w[:, ids], c


def check_linear(metric: Metric, answer: torch.Tensor, alternative: torch.Tensor, vocab: int) -> None:
    """Refuse a metric that is not linear in the logits where direct effects are needed (before any work)."""
    if not metric.linear:
        raise MetricError(
            f"direct effects need a metric linear in the logits (logit_diff or logit); {metric.name!r} is not. "
            "Use metric='logit_diff', or wrap a linear function as Metric(name, True, fn)."
        )
    if metric.needs_clean:
        raise MetricError(f"metric {metric.name!r} reads the clean run's logits, so it is not a function of one "
                          "run's logits; direct effects need a metric linear in the logits.")
    if metric.name in ("logit_diff", "logit") and metric is METRICS[metric.name]:
        return
    readout(metric, answer, alternative, vocab)


def direction(adapter, metric: Metric, answer: torch.Tensor, alternative: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """For a linear metric: (u (B, d), bias (B,)) with metric = N(x) . u + bias.

    The built-in ``logit_diff`` and ``logit`` read their unembedding rows
    directly; any other linear metric gets ``u = w @ W_U`` and
    ``bias = c + w . b_U`` from :func:`readout`, so the decomposition closes
    for whatever linear function the metric computes.
    """
    if not metric.linear:
        raise MetricError(
            f"direct effects need a metric linear in the logits (logit_diff or logit); {metric.name!r} is not. "
            "Use metric='logit_diff', or wrap a linear function as Metric(name, True, fn)."
        )
    a, b = answer.to(adapter.device), alternative.to(adapter.device)
    if metric.name in ("logit_diff", "logit") and metric is METRICS[metric.name]:
        bu = adapter.b_U(a)
        if metric.name == "logit_diff":
            u = adapter.W_U(a) - adapter.W_U(b)
            bias = torch.zeros(len(a), device=adapter.device) if bu is None else bu - adapter.b_U(b)
        else:
            u = adapter.W_U(a)
            bias = torch.zeros(len(a), device=adapter.device) if bu is None else bu
        return u.detach(), bias.detach()
    ids, w, c = readout(metric, answer, alternative, adapter.vocab_size)
    dev = adapter.device
    ids = ids.to(dev)
    W = adapter.W_U(ids).detach().to(torch.float64)                 # (K, d)
    w = w.to(dev)
    u = w @ W                                                        # (B, d)
    bu = adapter.b_U(ids)
    bias = c.to(dev) + (0 if bu is None else w @ bu.detach().to(torch.float64))
    return u, bias
