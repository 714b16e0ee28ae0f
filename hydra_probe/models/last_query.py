"""The final block's attention for the last query position only (used by :meth:`Adapter.run_blocks`).

Sweeps read the metric at the last position of the final residual, so in the final block only the last
query matters: its queries, attention scores and softmax, its heads' output ``z`` and the output
projection. Keys and values stay computed at every position (earlier edits reach them). Three pieces,
each exact for the last position on its own:

* the attention function (transformers' ``eager`` or ``sdpa`` implementation, dispatched through
  ``ALL_ATTENTION_FUNCTIONS``) is wrapped for the final block's attention module only: it gets the last
  query row (and the mask's last row) and its output (B, 1, H, dh) is broadcast (a stride-0 view) over
  the positions, so the module's reshapes see their usual shapes;
* the output projection's input is sliced to the last position (a forward pre-hook); its output (B, 1, d)
  broadcasts in the residual add, as the MLP's does with ``last_position_mlp``;
* a q projection of its own (``qkv_layout == "separate"``) runs on the last position and its output is
  broadcast over the positions (the other rows are never read: the attention uses the last query row);
  a fused projection (GPT-2's ``c_attn``, NeoX, Phi-3) computes its q columns at the last position only
  when it is a plain ``nn.Linear`` or GPT-2's ``Conv1D``.

Where the route is not known to be safe (accelerate hooks, a replaced forward, an attention implementation
other than eager/sdpa, a mask or output of an unexpected shape) the full computation runs instead.

:func:`query_rows_function` generalises the attention function's wrapper to the query rows from a given
position on (AtP*'s QK fix: the rows before the first position where a sender's change is nonzero do not
change in a causal attention); it also tells whether the attention is causal.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

#: attention implementations whose call contract (query (B, H, Tq, dh), 4-d mask or None, output
#: (B, Tq, H, dh)) the wrapper relies on
KNOWN_IMPLEMENTATIONS = ("eager", "sdpa")


def attention_function(attn: nn.Module) -> tuple[str, Callable[..., Any]] | None:
    """(implementation name, the function the module would call) for ``attn``, or None when the
    implementation is not one of :data:`KNOWN_IMPLEMENTATIONS` or cannot be found."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as fns
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
    if impl not in KNOWN_IMPLEMENTATIONS or not hasattr(fns, "_local_mapping"):
        return None
    if impl in fns:
        return impl, fns[impl]
    default = getattr(sys.modules.get(type(attn).__module__), "eager_attention_forward", None)
    return (impl, default) if impl == "eager" and callable(default) else None


@contextlib.contextmanager
def wrapped_attention(attn: nn.Module, make: Callable[[str, Callable[..., Any]], Callable[..., Any]]
                      ) -> Iterator[bool]:
    """Within the block, the attention function ``attn`` calls (:func:`attention_function`) is replaced by
    ``make(implementation name, the original function)`` in transformers' registry (this thread's local
    mapping, restored on exit, also on error). Yields whether it is in place (False: an implementation this
    package does not know; nothing changed). The wrapper sees every module's calls; it passes the others on."""
    found = attention_function(attn)
    if found is None:
        yield False
        return
    impl, orig = found
    with _registered(impl, make(impl, orig)):
        yield True


@contextlib.contextmanager
def last_query_function(attn: nn.Module) -> Iterator[bool]:
    """Within the block, ``attn``'s attention function computes the last query only (see module doc);
    other modules calling the same function are passed through unchanged. Yields whether the wrapper is
    in place (False: nothing changed). The registry entry is restored on exit, also on error."""

    def make(impl: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        def last_query(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
            full = (module, query, key, value, attention_mask, *args)
            if module is not attn or not torch.is_tensor(query) or query.dim() != 4 or query.shape[2] < 2:
                return orig(*full, **kwargs)
            B, H, T, dh = query.shape
            mask = attention_mask
            if mask is not None:
                if not torch.is_tensor(mask) or mask.dim() != 4 or mask.shape[-2] not in (1, T):
                    return orig(*full, **kwargs)
                mask = mask[:, :, -1:] if mask.shape[-2] == T else mask
            out, *rest = orig(module, query[:, :, -1:], key, value, mask, *args, **kwargs)
            if not torch.is_tensor(out) or tuple(out.shape) != (B, 1, H, dh):
                return orig(*full, **kwargs)  # an unexpected layout: the full computation, exact
            return (out.expand(B, T, H, dh), *rest)
        return last_query

    with wrapped_attention(attn, make) as placed:
        yield placed


@contextlib.contextmanager
def query_rows_function(attn: nn.Module, first: int, state: dict[str, int]) -> Iterator[bool]:
    """Within the block, ``attn``'s attention function is checked to be causal and, where its mask is a tensor,
    computes the query rows ``first..T-1`` only (AtP*'s QK fix, :meth:`Adapter.attention_z_given`): it gets
    those rows of the query and of the mask (keys and values at every position) and its output
    (B, T - first, H, dh) is written into zeros of the usual (B, T, H, dh) shape, so the module's reshapes
    see their usual shapes; rows ``< first`` of the output are then zero.

    Causal: the mask's rows ``< first`` mask every key ``>= first``, or, without a mask, the ``sdpa``
    implementation is causal (its own ``is_causal``); the caller relies on it when it reads the rows
    ``first..`` only. Without a mask the rows are not cut (a mask of the rows would take sdpa off its causal
    kernel and, with grouped-query attention, make transformers repeat the keys and values: slower than
    the rows it saves). ``state`` counts the calls for ``attn``: cut (``"rows"``), causal and not cut
    (``"causal"``), and not known to be causal (``"full"``: eager without a mask, a position bias, a mask
    or output of an unexpected shape), each run in full. Yields whether the wrapper is in place; the
    registry entry is restored on exit, also on error."""
    if first <= 0:
        yield False
        return

    def make(impl: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        def rows(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
            full = (module, query, key, value, attention_mask, *args)
            if module is not attn:
                return orig(*full, **kwargs)
            mask = _row_mask(impl, module, query, key, attention_mask, first, kwargs)
            if mask is None or mask is True:
                which = "full" if mask is None else "causal"
                state[which] = state.get(which, 0) + 1
                return orig(*full, **kwargs)
            B, H, T, dh = query.shape
            state["rows"] = state.get("rows", 0) + 1  # counted first: the function called may stop the block
            out, *rest = orig(module, query[:, :, first:], key, value, mask, *args, **kwargs)
            if not torch.is_tensor(out) or tuple(out.shape) != (B, T - first, H, dh):
                state["rows"] -= 1
                state["full"] = state.get("full", 0) + 1
                return orig(*full, **kwargs)  # an unexpected layout: the full computation, exact
            whole = out.new_zeros(B, T, H, dh)
            whole[:, first:] = out
            return (whole, *rest)
        return rows

    with wrapped_attention(attn, make) as placed:
        yield placed


def _row_mask(impl: str, module: nn.Module, query: Any, key: Any, mask: Any, first: int, kwargs: dict) -> Any:
    """For :func:`query_rows_function`: the mask's rows ``first..T-1`` where the rows are cut, True where the call
    is causal without a mask (not cut), None where it is not known to be causal."""
    if not (torch.is_tensor(query) and torch.is_tensor(key) and query.dim() == 4 and key.dim() == 4):
        return None
    T = query.shape[2]
    if key.shape[2] != T or not 0 < first < T or kwargs.get("position_bias") is not None:
        return None
    if mask is None:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        return True if impl == "sdpa" and causal is True else None
    if not torch.is_tensor(mask) or mask.dim() != 4 or tuple(mask.shape[-2:]) != (T, T):
        return None
    early = mask[..., :first, first:]  # rows < first must not see keys >= first
    if mask.dtype == torch.bool:
        causal = not bool(early.any())
    elif mask.is_floating_point():
        causal = bool(((early == torch.finfo(mask.dtype).min) | torch.isneginf(early)).all())
    else:
        causal = False
    return mask[:, :, first:] if causal else None


@contextlib.contextmanager
def _registered(impl: str, fn: Callable[..., Any]) -> Iterator[None]:
    """transformers' attention registry maps ``impl`` to ``fn`` within the block (this thread's local mapping);
    the previous entry is restored on exit, also on error."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as fns

    local = fns._local_mapping
    had, prev = impl in local, local.get(impl)
    local[impl] = fn
    try:
        yield
    finally:
        if had:
            local[impl] = prev
        else:
            local.pop(impl, None)


def slice_last(register: Callable[..., None], module: nn.Module) -> None:
    """A forward pre-hook (registered through ``register``) giving ``module`` the last position of its
    first input only: (B, T, ...) -> (B, 1, ...)."""
    register(module, lambda mod, args, kwargs: _first_last(args, kwargs), pre=True, with_kwargs=True)


def last_query_projection(register: Callable[..., None], q_proj: nn.Module) -> None:
    """A separate q projection runs on the last position; its output (B, 1, w) is broadcast to (B, T, w)
    (the pre-hook runs after any other pre-hook, the forward hook before any other forward hook)."""
    seen: list[int] = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = args[0] if args else next(iter(kwargs.values()))
        seen.append(x.shape[1])
        return _first_last(args, kwargs)

    def post(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        T = seen.pop()
        return out.expand(out.shape[0], T, *out.shape[2:])

    register(q_proj, pre, pre=True, with_kwargs=True)
    register(q_proj, post, prepend=True)


@contextlib.contextmanager
def fused_last_query(mod: nn.Module, q_cols: list[int]) -> Iterator[bool]:
    """Within the block, a fused q/k/v projection (``nn.Linear`` or GPT-2's ``Conv1D``) computes its q
    columns ``q_cols`` at the last position only (broadcast over the positions) and the other columns at
    every position. Yields whether the forward was replaced; restored on exit, also on error."""
    conv = type(mod).__name__ == "Conv1D"  # weight (in, out), computed as Conv1D does (addmm)
    if "forward" in mod.__dict__ or not (type(mod) is nn.Linear or conv):
        yield False
        return
    b = mod.bias
    width = mod.weight.shape[1] if conv else mod.weight.shape[0]
    q = _index(q_cols)
    kv = _index(sorted(set(range(width)) - set(q_cols)))
    parts = [(cols, mod.weight[:, cols] if conv else mod.weight[cols], None if b is None else b[cols])
             for cols in (kv, q)]

    def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not conv:
            return nn.functional.linear(x, w, bias)
        flat = x.reshape(-1, x.shape[-1])
        y = flat @ w if bias is None else torch.addmm(bias, flat, w)
        return y.view(*x.shape[:-1], w.shape[1])

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(*x.shape[:-1], width)
        (kv_cols, w_kv, b_kv), (q_cols_, w_q, b_q) = parts
        out[..., kv_cols] = linear(x, w_kv, b_kv)
        out[..., q_cols_] = linear(x[:, -1:], w_q, b_q)  # broadcast over the positions
        return out

    mod.forward = forward
    try:
        yield True
    finally:
        del mod.forward


def _first_last(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A pre-hook's (args, kwargs) with the first input (positional, else the first keyword) cut to its last
    position (dim 1)."""
    if args:
        return (args[0][:, -1:], *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: kwargs[key][:, -1:]}


def _index(cols: list[int]) -> slice | torch.Tensor:
    if cols and cols == list(range(cols[0], cols[-1] + 1)):
        return slice(cols[0], cols[-1] + 1)
    return torch.tensor(cols, dtype=torch.long)
