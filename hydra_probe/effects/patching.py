"""Activation patching in both directions.

Denoising puts a clean activation into the corrupted run (restoration
``R = (m(corr <- clean_c) - m(corr)) / (m(clean) - m(corr))``); noising puts a
corrupted activation into the clean run (damage
``D = (m(clean) - m(clean <- corr_c)) / (m(clean) - m(corr))``). Scores are
normalised on the means over prompts, in ``summary()``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..checks import public
from ..components import select
from ..errors import MetricError
from ..interventions import Direction, check_direction, interventions_for
from ..results import Result, provenance
from .common import as_model, make_runner, positions_of


class ActivationPatch(Result):
    """Columns: ``component``, ``prompt``, ``direction``, ``patched_metric``,
    ``clean_metric``, ``corrupted_metric`` (and ``position`` for per-position
    residual patching, -1 meaning all positions)."""

    kind = "activation_patch"

    def summary(self) -> pd.DataFrame:
        f = self._frame
        keys = ["component", "position"] if "position" in f.columns else ["component"]
        clean, corr = f["clean_metric"].mean(), f["corrupted_metric"].mean()
        rows = []
        for k, g in f.groupby(keys, sort=False):
            k = k if isinstance(k, tuple) else (k,)
            pm = g["patched_metric"].mean()
            d = g["direction"].iloc[0]
            score = (pm - corr) / (clean - corr) if d == "denoise" else (clean - pm) / (clean - corr)
            per = ((g["patched_metric"] - corr) / (clean - corr) if d == "denoise"
                   else (clean - g["patched_metric"]) / (clean - corr)).to_numpy()
            from ..stats import t_interval

            _, lo, hi = t_interval(per)
            rows.append({**dict(zip(keys, k)), "direction": d, "n": len(g), "patched_metric": pm, "score": score,
                         "score_lo": lo, "score_hi": hi})
        out = pd.DataFrame(rows)
        out.attrs["score"] = "restoration (denoise) or damage (noise), normalised on the mean clean and corrupted metrics"
        return out


def check_separable(clean: np.ndarray, corr: np.ndarray) -> None:
    gap = float(clean.mean() - corr.mean())
    if not np.isfinite(gap) or abs(gap) < 1e-6 * max(1.0, abs(float(clean.mean()))):
        raise MetricError(
            f"the mean clean and corrupted metrics are equal ({clean.mean():.6g} vs {corr.mean():.6g}), so "
            "normalised patching scores are undefined; use a corruption that changes the metric."
        )


@public
def activation_patch(model: Any, task: Any, components: Any = "heads", direction: Direction = "denoise", *,
                     metric: Any = "logit_diff", positions: Any = None, per_position: bool | None = None,
                     progress: bool | None = None) -> ActivationPatch:
    """Patch each component's activation between clean and corrupted runs.

    ``components`` may include ``RESID{l}`` (or the selector ``"resid"``):
    the residual stream entering block l; with ``per_position`` (default for
    the residual) each position is patched separately.
    """
    model = as_model(model)
    check_direction(direction)
    comps = select(model, components)
    pos = positions_of(positions)
    runner, m = make_runner(model, task, metric, progress=progress, positions=pos)
    clean = runner.baseline("clean").metric
    corr = runner.baseline("corrupted").metric
    check_separable(clean.numpy(), corr.numpy())
    source, value = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    per_pos = any(c.kind == "resid" for c in comps) if per_position is None else per_position
    T = min(task.lengths)
    if per_pos and len(set(task.lengths)) > 1:
        # positions counted from the end so they align across prompt lengths
        pos_list = list(range(-T, 0))
    else:
        pos_list = list(range(T))
    plan = []
    for c in comps:
        if per_pos and pos is None:
            plan += [(c, p) for p in pos_list]
        else:
            plan.append((c, None))
    copies = [interventions_for([c], value, model.head_dim, (p,) if p is not None else pos) for c, p in plan]
    outs = runner.run(source, copies, label=f"activation patch ({direction})")
    n = len(task)
    rows = []
    for (c, p), o in zip(plan, outs):
        rows.append(pd.DataFrame({"component": c.name, "prompt": range(n), "direction": direction,
                                  "patched_metric": o.metric.numpy(), "clean_metric": clean.numpy(),
                                  "corrupted_metric": corr.numpy(), "position": -1 if p is None else p}))
    prov = provenance(model, task, metric=m, direction=direction, positions=None if pos is None else list(pos))
    frame = pd.concat(rows, ignore_index=True)
    if not per_pos:
        frame = frame.drop(columns="position")
    return ActivationPatch(frame, prov)
