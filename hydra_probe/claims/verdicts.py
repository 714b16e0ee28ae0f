"""Per-component verdicts from plain frames of evidence.

:func:`classify` applies the verdict rule (:data:`VERDICT_RULE`) to one row
per component; :func:`verdict_table` joins the summaries of a triangulation
(direct effects, self-repair, both patching directions, confirmed edges,
iterated ablation) into the per-component table and classifies it. Pure
functions of frames: nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def confirmed_edges(edges_tested: pd.DataFrame | None) -> set[tuple[str, str]]:
    """The (ablated, compensator) pairs a paired ablation confirmed (``verified == "confirmed"``)."""
    e = edges_tested
    if e is None or e.empty:
        return set()
    return {(a, b) for a, b, v in zip(e["source"], e["target"], e["verified"]) if v == "confirmed"}


def compensator_text(contributions: pd.DataFrame, confirmed: set[tuple[str, str]], k: int = 3) -> dict[str, str]:
    """Per ablated component: its compensators, strongest first, at most ``k``, as text.

    A compensator is a downstream row (component or NORM) of the contribution
    summary (``component``, ``downstream``, ``delta_de``, ``q``) with positive
    mean ΔDE and BH q < 0.05, or whose edge a paired ablation confirmed
    (marked ", confirmed"): ``"L2H1 (+0.31, confirmed), NORM (+0.05)"``.
    """
    out = {}
    for c, g in contributions.groupby("component", sort=False):
        conf = np.array([(c, d) in confirmed for d in g["downstream"]], dtype=bool)
        keep = (g["delta_de"].to_numpy() > 0) & ((g["q"].to_numpy() < 0.05) | conf)
        g = g[keep].sort_values("delta_de", ascending=False, kind="stable").head(k)
        out[c] = ", ".join(f"{d} ({v:+.3g}{', confirmed' if (c, d) in confirmed else ''})"
                           for d, v in zip(g["downstream"], g["delta_de"]))
    return out


def _scores(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    s = frame[["component", "score", "score_lo", "score_hi"]]
    return s.rename(columns={"score": name, "score_lo": f"{name}_lo", "score_hi": f"{name}_hi"})


def verdict_table(*, components: pd.DataFrame, direct: pd.DataFrame, self_repair: pd.DataFrame,
                  self_repair_top: pd.DataFrame, contributions: pd.DataFrame, denoise: pd.DataFrame,
                  noise: pd.DataFrame, baseline: Mapping[str, float], threshold: float,
                  attribution: pd.DataFrame | None = None, edges_tested: pd.DataFrame | None = None,
                  iterated: pd.DataFrame | None = None) -> pd.DataFrame:
    """The per-component triangulation table with verdicts, from the analyses' summaries.

    Args:
        components: ``component``, ``layer``, ``head``, ``kind``, one row per component (their order is kept
            for ties).
        direct: ``DirectEffects.summary()`` (``direct_effect`` with ``_lo``/``_hi``).
        self_repair: ``SelfRepair.summary()``; ``self_repair_top``: the same on the top fraction of prompts
            by clean DE (``SelfRepair.summary(top_fraction=...)``).
        contributions: ``SelfRepair.contribution_summary()`` (``component``, ``downstream``, ``delta_de``, ``q``).
        denoise, noise: ``ActivationPatch.summary()`` of each direction (``score`` with ``_lo``/``_hi``).
        baseline: ``clean_metric``, ``corrupted_metric`` and ``gap`` (means, metric units).
        threshold: the verdict threshold t (see :data:`VERDICT_RULE`).
        attribution: ``AttributionPatch.to_frame()`` (per-prompt ``estimate``), or None.
        edges_tested: ``EdgeVerification.tested`` (``source``, ``target``, ``verified``), or None.
        iterated: ``IteratedAblation.summary()``, or None.

    Returns:
        One row per component, most important first, with the columns documented in
        ``TriangulationReport.to_frame`` and ``necessity``, ``restoring``, ``masked``, ``verdict``.
    """
    gap = baseline["gap"]
    de = direct[["component", "direct_effect", "direct_effect_lo", "direct_effect_hi"]]
    sr = self_repair[["component", "total_effect", "total_effect_lo", "total_effect_hi", "de_lost", "de_lost_lo",
                      "de_lost_hi", "self_repair", "self_repair_lo", "self_repair_hi", "norm_term",
                      "fraction_repaired", "lower_bound", "q_self_repair"]]
    top = self_repair_top[["component", "de_lost", "self_repair", "fraction_repaired"]]
    sr = sr.merge(top.rename(columns={"de_lost": "de_lost_top", "self_repair": "self_repair_top",
                                      "fraction_repaired": "fraction_repaired_top"}), on="component", how="left")
    comp_text = compensator_text(contributions, confirmed_edges(edges_tested))

    t = components[["component", "layer", "head", "kind"]].merge(de, on="component", how="left")
    t = t.merge(sr, on="component", how="left")
    t = t.merge(_scores(denoise, "restoration"), on="component", how="left")
    t = t.merge(_scores(noise, "damage"), on="component", how="left")
    if attribution is not None:
        a = attribution.groupby("component", sort=False)["estimate"].mean()
        t["attribution"] = t["component"].map(a) / gap
    else:
        t["attribution"] = np.nan
    t["compensators"] = t["component"].map(comp_text).fillna("")
    t.loc[~t["self_repair"].gt(0), "compensators"] = ""
    t["te_norm"] = t["total_effect"] / gap
    t["del_norm"] = t["de_lost"] / gap
    t["importance"] = t[["te_norm", "del_norm", "restoration", "damage"]].abs().max(axis=1)
    v = classify(t, threshold, gap)
    for col in v.columns:
        t[col] = v[col]
    t = t.sort_values(["importance", "layer", "head"], ascending=[False, True, True], kind="stable")
    return t.reset_index(drop=True)


__all__ = ["CLASSIFY_COLUMNS", "VERDICTS", "VERDICT_RULE", "classify", "compensator_text", "confirmed_edges",
           "verdict_table"]
