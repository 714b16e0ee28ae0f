"""What every part of the runner shares: sources, copies, run outputs, progress bars, checks."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ..errors import NumericalError, ResourceError
from ..interventions import Delivery, Intervention
from ..models.plumbing import SuffixRefused
from ..models.sites import Site

SOURCES = ("clean", "corrupted")

Copy = tuple[Intervention | Delivery, ...]
"""One copy: the interventions applied together in one run of every prompt."""

CapturePositions = Literal["last", "all"]
"""Which positions :meth:`Runner.run` keeps of captured sites.

``"last"``: the last position only, one (n, width) tensor per site in task
order. ``"all"``: every position, one (B, T, width) tensor per length group
(``Runner.groups[g]`` lists the group's prompts), plus the final residual at
every position.
"""


@dataclass
class RunOutput:
    """The results of one copy (one tuple of interventions) over all prompts.

    Rows are in task order unless said otherwise.

    Attributes:
        metric: (n,) float64 metric of each prompt.
        resid: (n, d) float64 final residual (final norm's input) at the last position.
        proj: (n, C) float64 unscaled projections of the finest components
            (``readout=True``), else None.
        proj_const: (n,) float64 projection of the constant terms
            (``readout=True``), else None.
        captures: the ``capture=`` sites (edited values, as the forward saw
            them; model dtype, CPU): with ``capture_positions="last"``
            ``{site: (n, width)}``; with ``"all"`` ``{site: [per group g a
            (B_g, T_g, width) tensor]}``. Empty when nothing was captured.
        resid_all: with ``capture_positions="all"``, the final residual at
            every position, per group g (B_g, T_g, d) (model dtype, CPU); else None.
        post_sigma: (n, L) float64 each layer's post-attention norm scale
            (families with post norms, ``readout=True``), else None.
    """

    metric: torch.Tensor
    resid: torch.Tensor
    proj: torch.Tensor | None = None
    proj_const: torch.Tensor | None = None
    captures: dict[Site, Any] = field(default_factory=dict)
    resid_all: list[torch.Tensor] | None = None
    post_sigma: torch.Tensor | None = None


@contextlib.contextmanager
def progress_bar(total: int, label: str, enabled: bool | None = None) -> Iterator[Any]:
    """A tqdm bar with an estimate of the time left; ``enabled=None``: only on a terminal."""
    show = sys.stderr.isatty() if enabled is None else bool(enabled)
    bar = tqdm(total=max(total, 1), desc=label, disable=not show, leave=False, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def compose(fns: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    if len(fns) == 1:
        return fns[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        for f in fns:
            x = f(x)
        return x
    return run


def default_budget(model: Any) -> int:
    budget = getattr(model, "token_budget", None)
    return int(budget()) if callable(budget) else 8192


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` (caught as out-of-memory, MemoryError or RuntimeError) means the device ran out of memory."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def halving(chunk: list[int], call: Callable[[list[int]], Any], weight: Callable[[list[int]], int],
            B: int, T: int) -> tuple[list[int], Any, int | None]:
    """``call(chunk)``, and on out-of-memory the first half of the chunk, again and again: (the chunk that
    ran, its result, the token budget it fits: ``weight(chunk) * B * T`` after a halving, else None).
    Raises :class:`ResourceError` when one item alone does not fit; other errors pass through."""
    budget = None
    while True:
        try:
            return chunk, call(chunk), budget
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            if len(chunk) == 1:
                raise ResourceError(oom_advice(B, T)) from None
            chunk = chunk[:max(1, len(chunk) // 2)]
            budget = max(1, weight(chunk)) * B * T


def first_true(x: torch.Tensor) -> int:
    """The first position (dim 1) where ``x`` (B, T, ...) is true for any row and column (T: nowhere)."""
    nz = x.reshape(x.shape[0], x.shape[1], -1).any(-1).any(0)
    return int(nz.to(torch.int8).argmax()) if bool(nz.any()) else int(nz.shape[0])


def oom_advice(B: int, T: int) -> str:
    return (f"one run of {B} prompts x {T} tokens does not fit in memory even unbatched; use fewer prompts "
            "(--n-prompts), shorter prompts, a smaller dtype, or a device with more memory.")


def check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise NumericalError(f"{what} produced NaN or infinite activations; check the model weights, dtype "
                             "(float16 overflows easily; try float32) and inputs.")


def on_later_rows(model: Any, prefix: Any, start: int, r: int, run: Callable[[int], Any]) -> Any:
    """``run(r)``: a run from layer ``start`` of the rows ``r..`` only, each attention taking ``prefix``'s keys
    and values of the earlier rows, where ``r > 0`` and the adapter is ready for it
    (:meth:`Adapter.suffix_ready`); else ``run(0)``, every row. An attention call of a layout the later rows
    cannot take (:class:`SuffixRefused`) makes the adapter run every row from then on, and ``run(0)`` here."""
    ad = model.adapter
    if r > 0:
        with model.evaluating(), torch.no_grad():
            ready = ad.suffix_ready(prefix, start, r)
        if ready:
            try:
                return run(r)
            except SuffixRefused:
                ad.refuse_suffix()
    return run(0)
