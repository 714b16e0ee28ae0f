"""The nnsight path: one ``LanguageModel.trace`` per run.

Edits and captures are expressed on nnsight envoys found from the same
architecture table as the local path, so results are equal; with
``model.remote`` the trace is sent to NDIF (``remote=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .adapter import check_fired, get_path
from .sites import Site


def trace_run(model: Any, ids: torch.Tensor, edits: Mapping[Site, Callable[[torch.Tensor], torch.Tensor]],
              captures: set[Site]) -> dict[Site, torch.Tensor]:
    """Run ``ids`` (B, T) in one nnsight trace with ``edits`` applied.

    Returns the ``captures`` sites (after edits), plus the final residual
    (``Site(n_layers, "resid_pre")``), each (B, T, width), detached. Raises
    :class:`~hydra_probe.errors.InterventionError` when an edit never ran on a
    real activation (local traces only; a remote trace cannot report back).
    """
    ad = model.adapter
    lm = model.nnsight
    final = Site(ad.n_layers, "resid_pre")
    sites = sorted(set(edits) | set(captures) | {final}, key=lambda s: s.order)
    saved: dict[Site, Any] = {}
    remote = getattr(model, "remote", False)
    fired: dict[Site, int] = {s: 0 for s in edits}

    def counted(s: Site, f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Any], Any]:
        def run(x: Any) -> Any:
            if isinstance(x, torch.Tensor) or (isinstance(x, tuple) and x and isinstance(x[0], torch.Tensor)):
                fired[s] += 1
            return f(x)
        return run

    with torch.no_grad(), lm.trace(ids.to(ad.device), remote=remote):
        for s in sites:
            path, io = ad.path_of(s)
            env = get_path(lm, path)
            if s in edits:
                edit = edits[s] if remote else counted(s, edits[s])
                if io == "input":
                    env.input = edit(env.input)
                else:
                    env.output = edit(env.output)
            if s in captures or s == final:
                saved[s] = (env.input if io == "input" else env.output).save()
    if not remote:
        check_fired(fired, edits)
    return {s: (v.value if hasattr(v, "value") else v).detach() for s, v in saved.items()}
