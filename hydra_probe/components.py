"""Components of the residual stream: attention heads, attention layers, MLPs.

Canonical names (zero-based): ``L{layer}H{head}``, ``ATTN{layer}``,
``MLP{layer}``, and ``RESID{layer}`` for the residual stream entering block
``layer`` (``RESID{n_layers}`` is the final residual; used by activation
patching only). Selectors: ``"heads"``, ``"mlps"``, ``"layers"`` (whole
attention layers), ``"resid"``, ``"all"`` (every head and MLP: the finest
partition of the residual, whose direct effects plus the constant sum to the
metric), a name, or a list of names / components. A joint ablation of several
components is written as a nested list or with ``+``: ``"L1H0+MLP0"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ComponentError

_PATTERN = re.compile(r"^(?:L(\d+)H(\d+)|ATTN(\d+)|MLP(\d+)|RESID(\d+))$")
KINDS = ("head", "attn", "mlp", "resid")


@dataclass(frozen=True)
class Component:
    """One component. ``shape`` = (n_layers, n_heads) of the model it was made for."""

    kind: str
    layer: int
    head: int | None = None
    shape: tuple[int, int] | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        if self.kind == "head":
            return f"L{self.layer}H{self.head}"
        return {"attn": "ATTN", "mlp": "MLP", "resid": "RESID"}[self.kind] + str(self.layer)

    def __str__(self) -> str:
        return self.name

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Order: residual before block, then heads, the whole layer, the MLP."""
        rank = {"resid": 0, "head": 1, "attn": 2, "mlp": 3}[self.kind]
        return (self.layer, rank, self.head or 0)

    @property
    def stage(self) -> int:
        """Where the component writes, in execution order: attention of layer l (heads, ATTN) at 2l, MLP at 2l+1.

        (``RESID{l}``, which writes nothing, sits at 2l, before block l.)"""
        return 2 * self.layer + (1 if self.kind == "mlp" else 0)


def parse(name: str | Component, n_layers: int, n_heads: int) -> Component:
    """Parse a canonical name, checking it against the model's shape."""
    if isinstance(name, Component):
        c = name
        if c.shape is not None and c.shape != (n_layers, n_heads):
            raise ComponentError(
                f"component {c.name} was made for a model with {c.shape[0]} layers x {c.shape[1]} heads; "
                f"this model has {n_layers} layers x {n_heads} heads. Make components with model.components(...)."
            )
        name = c.name
    if not isinstance(name, str):
        raise ComponentError(f"a component is a name like 'L0H1', 'MLP2', 'ATTN0'; got {type(name).__name__} {name!r}.")
    m = _PATTERN.match(name.strip())
    if m is None:
        raise ComponentError(
            f"unknown component {name!r}; valid names are L{{layer}}H{{head}}, ATTN{{layer}}, MLP{{layer}} "
            f"with layer 0..{n_layers - 1} and head 0..{n_heads - 1} (e.g. 'L0H0', 'MLP{n_layers - 1}'), "
            "or a selector: 'all', 'heads', 'mlps', 'layers'."
        )
    lh, hh, la, lm, lr = m.groups()
    if lh is not None:
        layer, head, kind = int(lh), int(hh), "head"
    elif la is not None:
        layer, head, kind = int(la), None, "attn"
    elif lm is not None:
        layer, head, kind = int(lm), None, "mlp"
    else:
        layer, head, kind = int(lr), None, "resid"
    top = n_layers if kind == "resid" else n_layers - 1
    if layer > top:
        raise ComponentError(f"component {name!r}: layer {layer} is out of range; this model has layers 0..{top}.")
    if head is not None and head >= n_heads:
        raise ComponentError(f"component {name!r}: head {head} is out of range; this model has heads 0..{n_heads - 1}.")
    return Component(kind, layer, head, shape=(n_layers, n_heads))


def all_of(kind: str, n_layers: int, n_heads: int) -> list[Component]:
    """Every component of ``kind`` in model order."""
    s = (n_layers, n_heads)
    if kind == "head":
        return [Component("head", l, h, s) for l in range(n_layers) for h in range(n_heads)]
    if kind == "resid":
        return [Component("resid", l, None, s) for l in range(n_layers + 1)]
    return [Component(kind, l, None, s) for l in range(n_layers)]


_SELECTORS = {"heads": ("head",), "mlps": ("mlp",), "layers": ("attn",), "resid": ("resid",), "all": ("head", "mlp")}


def select(model: Any, selector: Any = "all") -> list[Component]:
    """Resolve ``selector`` to a sorted list of components of ``model``."""
    L, H = model.n_layers, model.n_heads
    if isinstance(selector, (str, Component)) and str(selector) in _SELECTORS:
        out = [c for k in _SELECTORS[str(selector)] for c in all_of(k, L, H)]
        return sorted(out, key=lambda c: c.sort_key)
    if isinstance(selector, (str, Component)):
        return [parse(selector, L, H)]
    if isinstance(selector, Iterable):
        out: list[Component] = []
        for s in selector:
            for c in select(model, s) if isinstance(s, str) and s in _SELECTORS else [parse(s, L, H)]:
                if c not in out:
                    out.append(c)
        if not out:
            raise ComponentError("the component list is empty; name at least one component or use 'all'.")
        return out
    raise ComponentError(f"cannot read components from {type(selector).__name__} {selector!r}; use a name such as "
                         "'L0H1' or 'MLP2', a list of names, or a selector: 'all', 'heads', 'mlps', 'layers'.")


@dataclass(frozen=True)
class Group:
    """Components ablated together; its name joins theirs with ``+``."""

    members: tuple[Component, ...]

    @property
    def name(self) -> str:
        return "+".join(c.name for c in self.members)

    def __str__(self) -> str:
        return self.name

    @property
    def layer(self) -> int:
        return min(c.layer for c in self.members)


def select_groups(model: Any, selector: Any) -> list[Group]:
    """Like :func:`select`, but nested lists or ``"A+B"`` names make joint groups."""
    if isinstance(selector, (str, Component)) and "+" not in str(selector):
        return [Group((c,)) for c in select(model, selector)]
    if not isinstance(selector, (str, Iterable, Group)):
        return [Group((c,)) for c in select(model, selector)]  # raises ComponentError naming the problem
    if isinstance(selector, Group):
        selector = [selector]
    items: Sequence[Any] = [selector] if isinstance(selector, str) else list(selector)
    out: list[Group] = []
    for s in items:
        if isinstance(s, str) and "+" in s:
            g = Group(tuple(select(model, [p for p in s.split("+")])))
        elif isinstance(s, (list, tuple, Group)):
            g = Group(tuple(select(model, list(s.members if isinstance(s, Group) else s))))
        else:
            out.extend(Group((c,)) for c in select(model, s))
            continue
        out.append(g)
    if not out:
        raise ComponentError("the component list is empty; name at least one component or use 'all'.")
    return out


def is_norm_row(name: str) -> bool:
    """Whether a self-repair contribution row is a scale term rather than a component: ``NORM`` (final norm),
    ``POSTNORM{l}`` (layer l's post-attention norm) or ``SOFTCAP`` (the logit cap)."""
    return name in ("NORM", "SOFTCAP") or (name.startswith("POSTNORM") and name[8:].isdigit())


def is_downstream(d: Component, c: Component, parallel: bool) -> bool:
    """True when ``d`` reads (directly or not) what ``c`` writes.

    Heads of one layer do not read each other. With a parallel residual
    (GPT-NeoX) the attention and MLP of one layer read the same input, so
    neither is downstream of the other.
    """
    if parallel:
        return d.layer > c.layer
    return d.stage > c.stage


def finest(model: Any) -> list[Component]:
    """Every head and MLP (the ``"all"`` partition)."""
    return select(model, "all")
