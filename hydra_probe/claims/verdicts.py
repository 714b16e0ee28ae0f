"""Per-component verdicts from plain frames of evidence.

:func:`classify` applies the verdict rule (:data:`VERDICT_RULE`) to one row
per component; :func:`verdict_table` joins the summaries of a triangulation
(direct effects, self-repair, both patching directions, confirmed edges,
iterated ablation) into the per-component table and classifies it. Pure
functions of frames: nothing here runs a model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: The verdicts, in the rule's order of precedence.
VERDICTS = ("agree: important", "masked by self-repair", "necessity only", "restoration only", "agree: minor")

VERDICT_RULE = """\
Let gap = mean clean metric - mean corrupted metric and t = the threshold (default 0.1).
  necessity   N = the total effect's 95% interval excludes 0 on the side of gap, and TE / gap >= t
  restoration R = denoising restoration >= t or noising damage >= t (both already normalised on gap)
  masked      M = self-repair is positive beyond its 95% interval (the TE is a lower bound),
                  DE lost / gap >= t and TE < DE lost
verdict: N and R -> "agree: important"; else M and not N -> "masked by self-repair";
         else N -> "necessity only"; else R -> "restoration only"; else "agree: minor".
Attribution estimates are shown beside the exact scores but never enter the verdict."""

#: Columns :func:`classify` reads (one row per component).
CLASSIFY_COLUMNS = ("total_effect", "total_effect_lo", "total_effect_hi", "de_lost", "de_lost_lo", "de_lost_hi",
                    "restoration", "damage", "lower_bound", "confirmed_backups", "iterated_cost")


def classify(frame: pd.DataFrame, threshold: float, scale: float) -> pd.DataFrame:
    """Apply the verdict rule (:data:`VERDICT_RULE`) to one row per component.

    Args:
        frame: one row per component (any index; other columns are ignored) with
            ``total_effect``, ``total_effect_lo``, ``total_effect_hi`` (TE of the
            single ablation, mean and 95% interval across prompts, metric units);
            ``de_lost``, ``de_lost_lo``, ``de_lost_hi`` (direct effect lost, same);
            ``restoration`` (denoising score) and ``damage`` (noising score), both
            shares of the clean - corrupted gap, NaN where not measured;
            ``lower_bound`` (bool: self-repair > 0 beyond its 95% interval);
            ``confirmed_backups`` (str: the compensators a paired ablation
            confirmed, comma-separated, "" for none; NaN counts as none);
            ``iterated_cost`` (float: the cost of removing the component once its
            compensators are ablated too, TE(component + compensators) -
            TE(compensators), metric units; NaN where no iterated ablation ran).
            ``confirmed_backups`` and ``iterated_cost`` may be absent (no paired
            or iterated evidence).
        threshold: t in (0, 1); TE and DE lost are compared with ``t * |scale|``,
            restoration and damage (already shares of the gap) with ``t``.
        scale: the metric scale the thresholds are relative to, in metric units,
            signed like the clean - corrupted gap (a drop of the metric in that
            direction is a loss).

    Returns:
        A frame with the same index and columns ``necessity``, ``restoring``,
        ``masked`` (bools: the rule's N, R and M) and ``verdict`` (one of
        :data:`VERDICTS`).
    """
    f = frame
    te_n = f["total_effect"] / scale
    del_n = f["de_lost"] / scale
    side_lo = f["total_effect_lo"] if scale >= 0 else -f["total_effect_hi"]
    N = (side_lo > 0) & (te_n >= threshold)
    R = (f["restoration"] >= threshold) | (f["damage"] >= threshold)
    M = f["lower_bound"].astype(bool) & (del_n >= threshold) & (te_n < del_n)
    verdict = np.select([N & R, M & ~N, N, R], list(VERDICTS[:4]), default=VERDICTS[4])
    return pd.DataFrame({"necessity": N, "restoring": R, "masked": M, "verdict": verdict}, index=f.index)


__all__ = ["CLASSIFY_COLUMNS", "VERDICTS", "VERDICT_RULE", "classify"]
