"""Interventions as plain data: what to change, where, and with which value.

Nothing here touches a model; :mod:`hydra_probe.runner` executes these.
A *copy* (one run of every prompt) is a tuple of interventions of these kinds:

* :class:`Intervention`: replace ``site[..., positions, cols]`` by a value
  (ablation and activation patching).
* :class:`Delivery`: a sender's change reaches chosen receivers only (path
  patching): heads' q/k/v inputs, an MLP's input, or the logits.

A :class:`GradientRead` is a run of its own: a frozen read of activations
(the forward is not edited) and the metric's gradient with respect to them
(attribution patching), optionally with gradient paths cut (AtP*).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .components import Component
from .errors import OptionError
from .models.sites import Site

AblationValue = Literal["zero", "mean", "resample"]
"""What an ablated activation is replaced by.

* ``"zero"``: zeros.
* ``"mean"``: the per-position mean over a reference set (default: the
  task's clean prompts).
* ``"resample"``: the same site of another prompt of the task (seeded).
"""

RunName = Literal["clean", "corrupted"]
"""A run of the task: ``"clean"`` (clean prompts) or ``"corrupted"`` (corrupted prompts)."""

ValueSource = Literal["zero", "mean", "resample", "clean", "corrupted"]
"""Where a replacement comes from: an :data:`AblationValue`, or a run (:data:`RunName`):

* ``"clean"``: the clean run's activation (denoising / restoring).
* ``"corrupted"``: the corrupted run's activation (noising).
"""

Direction = Literal["denoise", "noise"]
"""Patch direction.

* ``"denoise"``: clean activations into the corrupted run (restoration).
* ``"noise"``: corrupted activations into the clean run (damage).
"""

ReceiverInput = Literal["q", "k", "v"]
"""Which input of a receiver head a :class:`Delivery` changes: its query, key or value."""

ScalePolicy = Literal["frozen", "recomputed"]
"""Final-norm scale where a change is read at the logits.

* ``"frozen"``: the scale the residual has without the change (the norm is then linear in it).
* ``"recomputed"``: the norm of the changed residual.
"""

ABLATION_VALUES: tuple[str, ...] = get_args(AblationValue)
VALUE_SOURCES: tuple[str, ...] = get_args(ValueSource)
DIRECTIONS: tuple[str, ...] = get_args(Direction)
RUNS: tuple[str, ...] = get_args(RunName)


@dataclass(frozen=True)
class Intervention:
    """Replace ``site[..., positions, cols]`` by the value from ``value`` (a :data:`ValueSource`)."""

    site: Site
    cols: tuple[int, int] | None
    positions: tuple[int, ...] | None
    value: str

    def __post_init__(self) -> None:
        if self.value not in VALUE_SOURCES:
            raise OptionError(f"unknown value {self.value!r}; choose one of {', '.join(VALUE_SOURCES)}.")


@dataclass(frozen=True)
class SenderChange:
    """The change of the senders' residual writes: their write in run ``value`` minus their write in
    the run being executed, at ``positions`` (all when None), summed over ``senders`` (heads
    ``W_O``-projected, whole attention layers, MLP outputs). ``value`` may also be an
    :data:`AblationValue`: the senders' ablation replacement instead of another run's write
    (the runner's value, e.g. the mean over its reference; :meth:`Runner.ablated_prefix`)."""

    senders: tuple[Component, ...]
    value: str
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.value not in VALUE_SOURCES:
            raise OptionError(f"a sender's change comes from a run ('clean' or 'corrupted') or an ablation value "
                              f"({', '.join(ABLATION_VALUES)}); got {self.value!r}.")
        bad = [c.name for c in self.senders if c.kind not in ("head", "attn", "mlp")]
        if bad or not self.senders:
            raise OptionError(f"senders are heads, ATTN layers and MLPs; got {', '.join(bad) or 'none'}.")


@dataclass(frozen=True)
class Delivery:
    """Add ``change`` to one receiver's input only (path patching).

    ``target``:

    * ``"heads"``: the ``inputs`` (q, k and/or v) of ``heads`` of ``layer``
      are computed from ``norm(x + change)``, x being that block's input in
      this same forward;
    * ``"mlp"``: the MLP of ``layer`` reads ``norm(x_mid + change)``;
    * ``"logits"``: the change is added to the final residual, read with the
      final norm's scale policy ``scale`` (``layer`` is ignored).

    The caller makes sure the receivers are downstream of the senders.
    """

    change: SenderChange
    target: Literal["heads", "mlp", "logits"]
    layer: int = -1
    heads: tuple[int, ...] = ()
    inputs: tuple[str, ...] = ("q", "k", "v")
    scale: str = "frozen"

    def __post_init__(self) -> None:
        if self.target not in ("heads", "mlp", "logits"):
            raise OptionError(f"unknown delivery target {self.target!r}; choose 'heads', 'mlp' or 'logits'.")
        if self.target == "heads" and (not self.heads or not self.inputs
                                       or not set(self.inputs) <= set(get_args(ReceiverInput))):
            raise OptionError("a delivery to heads names the heads and their inputs among q, k, v.")
        if self.scale not in get_args(ScalePolicy):
            raise OptionError(f"unknown scale policy {self.scale!r}; choose 'frozen' or 'recomputed'.")


@dataclass(frozen=True)
class GradientRead:
    """A frozen read of ``sites`` (the forward is not edited) and the metric's gradient with respect to
    each, in one forward and one backward.

    ``drop_layer``: GradDrop (AtP*): block ``drop_layer``'s write to the
    residual passes no gradient (its forward value is unchanged).
    ``freeze_patterns``: every head's query and key pass no gradient, so
    attention patterns are constants for the gradient (AtP*'s QK fix
    recomputes their change exactly instead).
    """

    sites: tuple[Site, ...]
    drop_layer: int | None = None
    freeze_patterns: bool = False


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
