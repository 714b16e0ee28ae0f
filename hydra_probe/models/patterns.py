"""A block's attention pattern instead of its output: the QK fix's pattern route.

AtP*'s QK fix reads, per downstream layer, ``sum over positions of (z' - z) . grad_z`` where ``z'`` is the
heads' output with changed queries and keys and the values held at the base run's. With ``z = A V`` that is
``sum over heads, query rows t and keys s of (A' - A)[t, s] * M[t, s]`` with ``M[t, s] = grad_z[t] . V[s]``:
only the softmax pattern of each copy is needed, never its values or output
(:meth:`Adapter.attention_patterns_given`, :meth:`Adapter.attention_patterns`).

:func:`pattern_function` replaces, within a block, the attention function of one module (transformers'
``eager`` or ``sdpa``, dispatched through ``ALL_ATTENTION_FUNCTIONS``): ``sdpa`` by :func:`softmax_pattern`
on the query and keys it receives, ``eager`` by the family's own function on values of width zero (it
returns the pattern, in its own precision); it stores the pattern and the last copy's values and stops the
block (:class:`StopAtPattern`). An ``sdpa`` call of a kind it does not know (positional extras, attention
sinks, a position bias, dropout in training, a mask of an unexpected shape) stops the block with nothing
stored, and the caller takes the output route; the caller also checks the last copy's ``A V`` against the
base run's ``z``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .last_query import wrapped_attention

#: keyword arguments of an attention call that :func:`softmax_pattern` applies (scale, soft cap) or that do not
#: change the pattern (the block's own arguments passed through; a sliding window is in the mask); any other
#: keyword leaves the call to the original function
PATTERN_KWARGS = frozenset({"scaling", "dropout", "sliding_window", "is_causal", "softcap", "position_ids",
                            "use_cache", "cache", "past_key_values", "cache_position", "output_attentions"})


class StopAtPattern(BaseException):
    """Raised by :func:`pattern_function`'s attention function once the pattern is stored: the rest of the
    block is not run. A BaseException, so that no ``except Exception`` inside a model swallows it."""


def softmax_pattern(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                    softcap: float | None = None) -> torch.Tensor:
    """The attention pattern ``softmax(cap(scaling * q k^T) + mask)`` (N, H, Tq, Tk), in the query's dtype
    (float32 for a half-precision query).

    ``query`` (N, H, Tq, dh); ``key`` (N, H_kv, Tk, dh) with H a multiple of H_kv (query head h reads key head
    h // (H / H_kv), as transformers' ``repeat_kv``; the keys are not repeated); ``mask`` broadcastable to
    (N, H, Tq, Tk): boolean (True: may attend) or additive; ``softcap``: Gemma-2's ``c * tanh(s / c)``."""
    N, H, Tq, dh = query.shape
    Hk, Tk = key.shape[1], key.shape[2]
    q = query.reshape(N, Hk, (H // Hk) * Tq, dh)  # the query heads of one key head, stacked along the rows
    s = torch.matmul(q, key.transpose(-1, -2)).view(N, H, Tq, Tk).mul_(scaling)
    if softcap is not None:
        s = torch.tanh(s.div_(softcap)).mul_(softcap)
    if mask is not None:
        s = s.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else s.add_(mask)
    return s.softmax(-1) if s.dtype in (torch.float32, torch.float64) else s.float().softmax(-1)


@contextlib.contextmanager
def pattern_function(attn: nn.Module, last: int, sink: dict[str, torch.Tensor], queries: int | None = None
                     ) -> Iterator[bool]:
    """Within the block, ``attn``'s attention function stores its softmax pattern in ``sink["pattern"]``
    (N, H, Tq, Tk) and the values of its last ``last`` rows in ``sink["values"]`` (last, H_kv, Tk, dh), then
    raises :class:`StopAtPattern`. ``queries``: the pattern of the last ``queries`` query rows only (Tq at most
    that; the rows before are never read, so the caller may leave them unformed; the QK fix where the gradient
    is zero there). A call of ``attn`` it does not know raises it with nothing stored (the values
    may be the last copy's only: the original function could not run on them); the caller takes the output
    route.
    Without a mask the call must be causal (its ``is_causal`` or the module's), and the pattern gets the
    causal mask of its query rows, the last rows of the sequence. Yields whether the wrapper is in place."""
    def make(impl: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        def pattern(module: nn.Module, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any,
                    **kwargs: Any) -> Any:
            full = (module, query, key, value, attention_mask, *args)
            if module is not attn or not all(torch.is_tensor(t) and t.dim() == 4 for t in (query, key, value)):
                return orig(*full, **kwargs)
            query, attention_mask = _last_queries(query, attention_mask, queries)
            if impl == "eager":  # the family's own function (its precision), on values of width zero
                N, H, Tq, _ = query.shape
                none = query.new_empty(N, key.shape[1], key.shape[2], 0)
                out = orig(module, query, key, none, attention_mask, *args, **kwargs)
                w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
                if not (torch.is_tensor(w) and tuple(w.shape) == (N, H, Tq, key.shape[2])
                        and value.shape[0] >= last and value.shape[1:3] == key.shape[1:3]):
                    raise StopAtPattern  # declined: nothing stored
                sink["pattern"] = w
            else:
                mask = _mask_of(impl, module, query, key, value, attention_mask, args, kwargs, last)
                if mask is False:
                    raise StopAtPattern  # declined: nothing stored
                scaling = kwargs.get("scaling")
                sink["pattern"] = softmax_pattern(query, key, mask, query.shape[-1] ** -0.5 if scaling is None
                                                  else float(scaling), kwargs.get("softcap"))
            sink["values"] = value[-last:]
            raise StopAtPattern
        return pattern

    with wrapped_attention(attn, make) as placed:
        yield placed


def _last_queries(query: torch.Tensor, mask: Any, keep: int | None) -> tuple[torch.Tensor, Any]:
    """The last ``keep`` query rows (N, H, keep, dh) and the mask's rows for them (a 4-d mask with a row per query;
    any other mask is returned as it is and judged by the caller); everything as it is where ``keep`` is None or
    not fewer rows. The query rows are the last of the sequence, so the causal mask of the kept rows is still
    ``tril(Tk - Tq)``."""
    Tq = query.shape[2]
    if keep is None or not 0 < keep < Tq:
        return query, mask
    if torch.is_tensor(mask) and mask.dim() == 4 and mask.shape[-2] == Tq:
        mask = mask[:, :, Tq - keep:]
    return query[:, :, Tq - keep:], mask


def _mask_of(impl: str, module: nn.Module, query: Any, key: Any, value: Any, mask: Any, args: tuple,
             kwargs: dict[str, Any], last: int) -> Any:
    """For :func:`pattern_function`: the call's mask (a tensor, or None: none needed), or False where the call is
    not one :func:`softmax_pattern` computes exactly. Without a mask only ``sdpa`` is causal (its own flag; it
    applies no sliding window either: transformers leaves the mask out where the window does not bind)."""
    if args or set(kwargs) - PATTERN_KWARGS:
        return False
    N, H, Tq, _ = query.shape
    Hk, Tk = key.shape[1], key.shape[2]
    if (Hk == 0 or H % Hk or Tq > Tk or value.shape[0] < last or value.shape[1:3] != key.shape[1:3]
            or (kwargs.get("dropout") and module.training)):
        return False
    if mask is None:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        if causal is not True or impl != "sdpa":
            return False
        if Tq == 1 and Tk == 1:
            return None
        return torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril(Tk - Tq)
    if not (torch.is_tensor(mask) and mask.dim() == 4 and tuple(mask.shape[-2:]) == (Tq, Tk)
            and mask.shape[0] in (1, N) and mask.shape[1] in (1, H)):
        return False
    return mask if mask.dtype == torch.bool or mask.is_floating_point() else False
