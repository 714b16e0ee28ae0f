"""Interventions as plain data: what to replace, where, and with which value.

An :class:`Intervention` names a site (kind, layer), the columns of the site
it covers (a head's slice of ``z``, or all), the positions (all by default)
and the source of the replacement value. The runner resolves values and
applies interventions; nothing here touches a model.

Value sources:
    ``zero``       zeros.
    ``mean``       per-position mean over a reference set (default: the
                   task's clean prompts).
    ``resample``   the same site of another prompt of the task (seeded).
    ``clean``      the clean run's activation (denoising / restoring).
    ``corrupted``  the corrupted run's activation (noising).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .components import Component
from .errors import OptionError
from .models.sites import Site

ABLATION_VALUES = ("zero", "mean", "resample")
VALUE_SOURCES = ABLATION_VALUES + ("clean", "corrupted")
DIRECTIONS = ("denoise", "noise")


@dataclass(frozen=True)
class Intervention:
    """Replace ``site[..., positions, cols]`` by the value from ``value``."""

    site: Site
    cols: tuple[int, int] | None
    positions: tuple[int, ...] | None
    value: str

    def __post_init__(self) -> None:
        if self.value not in VALUE_SOURCES:
            raise OptionError(f"unknown value {self.value!r}; choose one of {', '.join(VALUE_SOURCES)}.")


def check_value(value: Any) -> str:
    """Validate an ablation value name (a reference Task is handled by the caller)."""
    if not isinstance(value, str) or value not in ABLATION_VALUES:
        raise OptionError(f"unknown ablation value {value!r}; choose one of {', '.join(ABLATION_VALUES)}, or pass a reference Task for a mean.")
    return value


def check_direction(direction: Any) -> str:
    if direction not in DIRECTIONS:
        raise OptionError(f"unknown patch direction {direction!r}; choose 'denoise' (clean into corrupted) or 'noise' (corrupted into clean).")
    return direction


def site_of(component: Component, head_dim: int) -> tuple[Site, tuple[int, int] | None]:
    """The site and columns where ``component`` writes (or, for RESID, is read)."""
    if component.kind == "head":
        h = component.head or 0
        return Site(component.layer, "z"), (h * head_dim, (h + 1) * head_dim)
    if component.kind == "attn":
        return Site(component.layer, "z"), None
    if component.kind == "mlp":
        return Site(component.layer, "mlp_out"), None
    return Site(component.layer, "resid_pre"), None


def interventions_for(components: Sequence[Component], value: str, head_dim: int,
                      positions: tuple[int, ...] | None = None) -> tuple[Intervention, ...]:
    """One intervention per component, all with the same value source."""
    out = []
    for c in components:
        site, cols = site_of(c, head_dim)
        out.append(Intervention(site, cols, positions, value))
    return tuple(out)
