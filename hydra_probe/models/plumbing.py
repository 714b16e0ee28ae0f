"""The block-level plumbing the model adapter's parts share (:mod:`.adapter`, :mod:`.qk_attention`).

Module paths, the kept base run (:class:`Prefix`), tiling of call arguments over stacked copies, hook
registration that always cleans up, the stop at an attention's output projection, norm scales, parameters
loaded from accelerate's offload, and the check that every edit's hook fired.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ArchitectureError, InterventionError
from .sites import Site


def get_path(root: nn.Module, path: str) -> Any:
    """Follow a dotted attribute path (integers index module lists).

    ``"a|b"`` tries ``a`` then ``b`` (names that changed across transformers versions).
    """
    if "|" in path:
        alts = path.split("|")
        for alt in alts[:-1]:
            try:
                return get_path(root, alt)
            except AttributeError:
                continue
        return get_path(root, alts[-1])
    obj: Any = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


@dataclass
class Prefix:
    """A clean (or corrupted) base forward kept for restarting at any layer.

    ``resid[l]``: (B, T, d) input of block ``l`` (``resid[n_layers]`` is the
    final norm's input); ``calls[l]``: the block's other positional and
    keyword arguments, replayed by :meth:`Adapter.run_blocks`.
    """

    resid: list[torch.Tensor]
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
    captures: dict[Site, torch.Tensor]
    #: per layer: the attention module's output structure when it is exactly its output projection's
    #: output (``"tensor"`` or the tuple's length, the rest None), so a restart may begin at ``z``; else None
    attn_direct: list[Any] = field(default_factory=list)
    #: per layer: the keys and values (B, H_kv, T, dh) its attention function received in this run, as
    #: :meth:`Adapter.suffix_ready` records them for runs of the later rows (:mod:`.suffix`)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.resid[0].shape[0]


def tile(obj: Any, batch: int, copies: int) -> Any:
    """Repeat tensors whose first dim is ``batch`` ``copies`` times along dim 0."""
    if copies == 1:
        return obj
    if torch.is_tensor(obj):
        if obj.dim() > 0 and obj.shape[0] == batch and batch > 1:
            return obj.repeat(copies, *([1] * (obj.dim() - 1)))
        return obj
    if isinstance(obj, tuple):
        return tuple(tile(o, batch, copies) for o in obj)
    if isinstance(obj, list):
        return [tile(o, batch, copies) for o in obj]
    if isinstance(obj, dict):
        return {k: tile(v, batch, copies) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def temporary_hooks() -> Iterator[Callable[..., None]]:
    """The one register-then-remove pattern: yields ``register(module, fn, pre=False, **kw)``, which
    adds a forward hook (``pre=True``: a forward pre-hook; ``kw`` as torch takes them); every hook
    added is removed on exit, also on error."""
    handles: list[Any] = []

    def register(module: nn.Module, fn: Callable[..., Any], pre: bool = False, **kw: Any) -> None:
        add = module.register_forward_pre_hook if pre else module.register_forward_hook
        handles.append(add(fn, **kw))

    try:
        yield register
    finally:
        for h in handles:
            h.remove()


class SuffixRefused(ArchitectureError):
    """A run of the later rows (``Adapter.run_blocks(first_row=)``) met an attention call it cannot extend
    with the earlier rows' keys; the caller runs every row instead."""


def norm_scale(x: torch.Tensor, eps: float, centre: bool) -> torch.Tensor:
    """A norm's scale of vectors ``x`` (..., d) -> (...), float64: ``sqrt(var(x) + eps)`` when the norm centres
    (LayerNorm), ``sqrt(mean(x^2) + eps)`` otherwise (RMSNorm). The one formula the package uses for it."""
    x = x.to(torch.float64)
    if centre:
        return torch.sqrt(x.var(-1, unbiased=False) + eps)
    return torch.sqrt(x.pow(2).mean(-1) + eps)


def eps_of(n: nn.Module) -> float:
    eps = next((float(getattr(n, a)) for a in ("eps", "variance_epsilon", "epsilon") if hasattr(n, a)), None)
    if eps is None:
        raise ArchitectureError(f"cannot read eps of norm {type(n).__name__}")
    return eps


def param_of(module: nn.Module, name: str) -> torch.Tensor | None:
    """``getattr(module, name)``, loaded from accelerate's offload (disk or CPU) when it sits on the meta device."""
    p = getattr(module, name, None)
    if p is None or not isinstance(p, torch.Tensor) or p.device.type != "meta":
        return p
    if getattr(module, "_hf_hook", None) is None:
        raise ArchitectureError(f"{type(module).__name__}.{name} is on the meta device (no weights loaded) and no "
                                "accelerate hook can load it; load the model with its weights (or a device_map).")
    from accelerate.utils import align_module_device

    with torch.no_grad(), align_module_device(module):
        return getattr(module, name).detach().clone()


def as_index(cols: list[int]) -> slice | torch.Tensor:
    """Column indices as a slice when they are one contiguous run, else a tensor."""
    if cols and cols == list(range(cols[0], cols[-1] + 1)):
        return slice(cols[0], cols[-1] + 1)
    return torch.tensor(cols, dtype=torch.long)


def check_fired(fired: Mapping[Site, int], edits: Mapping[Site, Any]) -> None:
    """Refuse edits whose hooks never fired (a table path the forward does not call)."""
    dead = [str(s) for s in edits if fired.get(s, 0) == 0]
    if dead:
        raise InterventionError(
            f"interventions at {', '.join(dead)} never touched the model (their hooks did not fire); "
            "the architecture table may point at a module that the forward does not call."
        )
