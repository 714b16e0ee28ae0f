"""transformers' rotate-half rotary position embedding without its concatenation (AtP*'s QK fix).

The Llama-style ``apply_rotary_pos_emb(q, k, cos, sin)`` computes ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x2, x1)``: five full passes over every copy's queries and keys (a negation, a
concatenation, two products and a sum), about a quarter of the QK fix's time on a Llama shape.
:func:`apply_rotary` computes the same numbers bit for bit (``x1 c1 + (-x2) s1 = x1 c1 - x2 s1``) in one
product and two in-place half updates. :func:`fast_rotary` swaps it in, for the ``with`` block, in the
module of an attention whose ``apply_rotary_pos_emb`` and ``rotate_half`` have exactly the bytecode of
Llama's (the copies other families carry); anywhere else nothing changes.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (the same rounding)."""
    d = x.shape[-1]
    if d % 2 or cos.shape[-1] != d or sin.shape[-1] != d:
        h = d // 2
        return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin  # the reference formula
    h = d // 2
    out = x * cos
    out[..., :h] -= x[..., h:] * sin[..., :h]
    out[..., h:] += x[..., :h] * sin[..., h:]
    return out


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Llama ``apply_rotary_pos_emb``, the same numbers without the concatenation."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _plain(fn: Any) -> Any:
    """``fn``, or where it is the ``kernels`` package's module around a function (transformers >= 5.25 decorates
    Llama's ``apply_rotary_pos_emb`` with ``use_kernel_forward_from_hub``; the module's forward calls the function
    unless a kernel was swapped in) the function it wraps; None for a wrapper that was given a kernel (an
    instance ``forward``) or that holds no single function."""
    if not isinstance(fn, nn.Module):
        return fn
    if "forward" in vars(fn):
        return None
    cells = getattr(type(fn).forward, "__closure__", None) or ()
    funcs = [c.cell_contents for c in cells if isinstance(getattr(c, "cell_contents", None), types.FunctionType)]
    return funcs[0] if len(funcs) == 1 else None


def _code(fn: Any) -> Any:
    """What makes two functions compute the same: bytecode, names, constants (the docstring left out),
    defaults; None for anything but a plain function (or a ``kernels`` module around one, see :func:`_plain`)."""
    fn = _plain(fn)
    c = getattr(fn, "__code__", None)
    if c is None:
        return None
    consts = c.co_consts[1:] if c.co_consts and c.co_consts[0] == fn.__doc__ else c.co_consts
    return c.co_code, c.co_names, c.co_varnames, consts, fn.__defaults__


def _is_llama_rotary(module: Any) -> bool:
    try:
        from transformers.models.llama import modeling_llama as ref
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return all(_code(getattr(module, name, None)) == _code(getattr(ref, name)) is not None
               for name in ("apply_rotary_pos_emb", "rotate_half"))


@contextlib.contextmanager
def fast_rotary(attn: nn.Module) -> Iterator[bool]:
    """Within the block, ``attn``'s module computes its rotary embedding with :func:`apply_rotary` where its
    ``apply_rotary_pos_emb`` and ``rotate_half`` are Llama's (see module doc). Yields whether it was swapped;
    restored on exit, also on error."""
    module = sys.modules.get(type(attn).__module__)
    old = getattr(module, "apply_rotary_pos_emb", None)
    if module is None or old is None or old is apply_rotary or not _is_llama_rotary(module):
        yield False
        return
    module.apply_rotary_pos_emb = apply_rotary  # type: ignore[attr-defined]
    try:
        yield True
    finally:
        module.apply_rotary_pos_emb = old  # type: ignore[attr-defined]
