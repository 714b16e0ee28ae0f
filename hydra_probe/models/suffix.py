"""Blocks run on the rows from a given position on, the earlier rows' keys and values taken from the base run.

When every edit of a stacked forward leaves the rows before position ``r`` as they were in the base run
(clean and corrupted prompts share a prefix, and a patched activation equals the base run's there), every
activation of those rows is the base run's in a causal model: only the rows ``r..T-1`` need computing, with
the base run's keys and values of the rows ``< r`` in each attention (:meth:`Adapter.run_blocks` with
``first_row``). Three pieces:

* :func:`suffix_call`: a block's recorded call arguments cut to the rows ``r..`` (position ids, cache
  positions, rotary tables, the 4-d mask's query rows); None where an argument's layout is not known;
* :func:`capture_keys`: the attention function (transformers' ``eager``/``sdpa``, dispatched through
  ``ALL_ATTENTION_FUNCTIONS``) records the keys and values it receives (the base run's);
* :func:`prefix_keys_function`: within a block, the attention function gets those keys and values of the
  rows ``< r`` (tiled over the stacked copies) before its own, and a causal mask for its query rows where
  it had none (``sdpa``'s own causal flag aligns a shorter query block with the first keys, not the last);
  a plain grouped-query sdpa call then runs torch's grouped-query kernel itself (for a masked call
  transformers would repeat the keys and values per query head).

Where the route is not known to be exact the caller computes every row (see ``Adapter.suffix_ready``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .last_query import wrapped_attention

#: the shortest shared prefix worth the route, as a fraction of the prompt (at least 2 rows): a few common first
#: tokens (BOS or a template's opening under a mean ablation) save less than the earlier keys' concatenation
#: costs, and those sweeps keep the every-row numbers bit for bit
MIN_SHARED_FRACTION = 0.25


def min_shared_rows(T: int) -> int:
    """The fewest earlier rows (of ``T``) for which a run of the later rows is taken."""
    return max(2, math.ceil(T * MIN_SHARED_FRACTION))


#: keyword arguments of a block call whose last dimension runs along the positions
_POSITIONAL = frozenset({"position_ids", "cache_position"})


def suffix_call(args: tuple, kw: dict[str, Any], r: int, T: int) -> tuple[tuple, dict[str, Any]] | None:
    """A block's recorded call ``(args, kw)`` for the rows ``r..T-1`` of its input, or None where some argument
    is a tensor (or a structure of them) whose positions this function does not know how to cut."""
    if any(a is not None and not isinstance(a, (bool, int, float, str)) for a in args):
        return None
    out: dict[str, Any] = {}
    for k, v in kw.items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif k in _POSITIONAL and torch.is_tensor(v) and v.shape[-1] == T:
            out[k] = v[..., r:]
        elif k == "position_embeddings" and isinstance(v, tuple) and all(
                torch.is_tensor(t) and t.dim() == 3 and t.shape[1] == T for t in v):
            out[k] = tuple(t[:, r:] for t in v)
        elif k == "attention_mask" and torch.is_tensor(v) and v.dim() == 4 and tuple(v.shape[-2:]) == (T, T):
            out[k] = v[:, :, r:]
        else:
            return None
    return args, out


def capture_keys(attn: nn.Module, got: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager[bool]:
    """Within the block, ``attn``'s attention function stores the key and value it receives in ``got``
    (``"key"``, ``"value"``: (B, H_kv, T, dh)). Yields whether the wrapper is in place."""
    def make(impl: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        def record(module: nn.Module, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
            if module is attn:
                got["key"], got["value"] = key, value
            return orig(module, query, key, value, *args, **kwargs)
        return record

    return wrapped_attention(attn, make)


def _plain_gqa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether an sdpa call with a mask is plain grouped-query attention: more query heads than key/value heads,
    no dropout, soft cap or position bias, and nothing but the scale passed besides."""
    groups = query.shape[1] // key.shape[1] if key.shape[1] else 0
    extra = set(kwargs) - _SDPA_IGNORES
    return (not args and not extra and groups > 1 and query.shape[1] == groups * key.shape[1]
            and not kwargs.get("dropout") and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions") and not module.training)


#: keyword arguments transformers' sdpa attention takes and, for a plain call, does not act on (the block's
#: own arguments passed through, the scale, a zero dropout, an unused soft cap or position bias); any other
#: keyword leaves the call to transformers
_SDPA_IGNORES = {"scaling", "dropout", "sliding_window", "is_causal", "softcap", "position_bias", "position_ids",
                 "use_cache", "cache", "past_key_values", "cache_position", "output_attentions"}


def _sdpa_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
              scaling: float | None) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention for plain grouped-query attention with a mask, with torch's own grouped-query
    kernel (``enable_gqa``) instead of keys and values repeated per query head (transformers repeats them on
    the CPU whenever a mask is given): output (B, Tq, H, dh), as transformers returns it."""
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def prefix_keys_function(attn: nn.Module, key0: torch.Tensor, value0: torch.Tensor, state: dict[str, int],
                         last_values: int = 0) -> contextlib.AbstractContextManager[bool]:
    """Within the block, ``attn``'s attention function prepends the keys and values ``key0``, ``value0``
    (B, H_kv, r, dh: the base run's rows ``< r``) to its own (copies*B rows: ``key0`` is tiled), so that its
    queries, the last rows of the sequence, see every key. Without a mask (``sdpa`` causal) it gets the causal
    mask of those rows as an additive float mask. ``state["calls"]`` counts the calls; ``state["odd"]`` those
    of a layout the function does not know (the caller's result is then not used). ``last_values`` > 0 (the
    QK fix's pattern route, whose attention function reads the last copy's values only): the values are those
    of the last ``last_values`` rows, prefixed, and the call always goes to the wrapped function. Yields whether
    the wrapper is in place."""
    def make(impl: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        return functools.partial(_with_prefix, impl, orig, attn, key0, value0, state, last_values)

    return wrapped_attention(attn, make)


def _prepend(first: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """``first`` (B, H, r, dh), tiled over the copies of ``rest`` (copies*B, H, T - r, dh), then ``rest``, along
    the positions: (copies*B, H, T, dh), written once (no tiled intermediate)."""
    B, H, r, dh = first.shape
    n = rest.shape[0] // B
    out = rest.new_empty(rest.shape[0], H, r + rest.shape[2], dh)
    out.view(n, B, H, -1, dh)[:, :, :, :r] = first.to(rest.dtype)
    out[:, :, r:] = rest
    return out


def _with_prefix(impl: str, orig: Callable[..., Any], attn: nn.Module, key0: torch.Tensor, value0: torch.Tensor,
                 state: dict[str, int], last_values: int, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
    """The attention function of :func:`prefix_keys_function` (``orig``: the one it wraps, of ``impl``)."""
    if module is not attn:
        return orig(module, query, key, value, attention_mask, *args, **kwargs)
    state["calls"] = state.get("calls", 0) + 1
    ok = (torch.is_tensor(key) and key.dim() == 4 and key.shape[1:2] == key0.shape[1:2]
          and key.shape[0] % key0.shape[0] == 0 and kwargs.get("position_bias") is None)
    if not ok:
        state["odd"] = state.get("odd", 0) + 1
        return orig(module, query, key, value, attention_mask, *args, **kwargs)
    key, value = _prepend(key0, key), _prepend(value0, value[-last_values:] if last_values else value)
    Tq, Tk = query.shape[2], key.shape[2]
    if attention_mask is None:
        causal = kwargs.get("is_causal")
        if impl != "sdpa" or causal is False or (causal is None and not getattr(module, "is_causal", True)):
            state["odd"] = state.get("odd", 0) + 1  # not known to be causal
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril(Tk - Tq)
        attention_mask = torch.zeros(Tq, Tk, dtype=query.dtype, device=query.device).masked_fill(
            ~allowed, torch.finfo(query.dtype).min)[None, None]
        if "is_causal" in kwargs:
            kwargs = {**kwargs, "is_causal": False}
    elif not (torch.is_tensor(attention_mask) and attention_mask.dim() == 4
              and tuple(attention_mask.shape[-2:]) == (Tq, Tk)):
        state["odd"] = state.get("odd", 0) + 1
    if impl == "sdpa" and not last_values and _plain_gqa(module, query, key, args, kwargs):
        return _sdpa_gqa(query, key, value, attention_mask, kwargs.get("scaling"))
    return orig(module, query, key, value, attention_mask, *args, **kwargs)
