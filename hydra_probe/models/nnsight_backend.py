"""The nnsight path: one ``LanguageModel.trace`` per run.

Edits and captures are expressed on nnsight envoys found from the same
architecture table as the local path, so results are equal; with
``model.remote`` the trace is sent to NDIF (``remote=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .adapter import get_path
from .sites import Site


def trace_run(model: Any, ids: torch.Tensor, edits: Mapping[Site, Callable[[torch.Tensor], torch.Tensor]],
              captures: set[Site]) -> dict[Site, torch.Tensor]:
    """Run ``ids`` (B, T) in one nnsight trace with ``edits`` applied.

    Returns the ``captures`` sites (after edits), plus the final residual
    (``Site(n_layers, "resid_pre")``), each (B, T, width), detached.
    """
    ad = model.adapter
    lm = model.nnsight
    final = Site(ad.n_layers, "resid_pre")
    sites = sorted(set(edits) | set(captures) | {final}, key=lambda s: s.order)
    saved: dict[Site, Any] = {}
    with torch.no_grad(), lm.trace(ids.to(ad.device), remote=getattr(model, "remote", False)):
        for s in sites:
            path, io = ad.path_of(s)
            env = get_path(lm, path)
            if s in edits:
                if io == "input":
                    env.input = edits[s](env.input)
                else:
                    env.output = edits[s](env.output)
            if s in captures or s == final:
                saved[s] = (env.input if io == "input" else env.output).save()
    return {s: (v.value if hasattr(v, "value") else v).detach() for s, v in saved.items()}
