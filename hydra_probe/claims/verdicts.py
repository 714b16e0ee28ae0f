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

from ..formatting import pct

#: The verdicts, in the rule's order of precedence.
VERDICTS = ("agree: important", "masked by self-repair", "necessity only", "restoration only", "agree: minor")

#: How the scale of TE and DE lost is chosen (also in :data:`VERDICT_RULE`).
SCALE_RULE = "|mean clean metric|, kept between |gap| / 2 and |gap|, with the sign of gap (|clean| where gap = 0)"

VERDICT_RULE = """\
Let clean, corrupted = the mean metrics, gap = clean - corrupted, t = the threshold (default 0.1) and
scale = |clean| kept between |gap|/2 and |gap|, signed like gap. An ablation of the clean run removes what
the clean run has, so TE and DE lost are read against the clean metric, not the gap: a swap corruption
(corrupted ~ -clean) doubles the gap but not the clean metric; under an abc corruption (corrupted ~ 0) the two
agree. The bounds keep the scale meaningful where the clean metric alone is not (near 0, or a metric without a
natural zero such as a raw logit).
  necessity   N = TE's 95% interval excludes 0 on the side of scale, and TE / scale >= t
  restoration R = denoising restoration >= t or noising damage >= t (shares of gap, as patching defines them)
  lower bound L = self-repair > 0 beyond its 95% interval (the single-ablation TE understates the role)
  backed up   B = a paired ablation confirmed a compensator d of the component (dDE_d > 0 and the interaction
                  TE(c,d) - TE(c) - TE(d) > 0 beyond its 95% interval), or L and the iterated ablation (TE of
                  the component once its compensators are ablated too) costs >= (1 - t) x its DE lost,
                  DE lost > 0 beyond its interval
  masked      M = B, or L and DE lost / scale >= t and TE < DE lost
verdict: B -> "masked by self-repair", naming the backups, however small DE lost is beside the gap;
         else N and R -> "agree: important"; else M and not N -> "masked by self-repair";
         else N -> "necessity only"; else R -> "restoration only"; else "agree: minor".
So no component that the report's own paired or iterated ablations show to be backed up reads "minor" or
"restoration only". Attribution estimates are shown beside the exact scores but never enter the verdict."""

#: Columns :func:`classify` reads (one row per component).
CLASSIFY_COLUMNS = ("total_effect", "total_effect_lo", "total_effect_hi", "de_lost", "de_lost_lo", "de_lost_hi",
                    "restoration", "damage", "lower_bound", "confirmed_backups", "iterated_cost")


def verdict_scale(clean: float, corrupted: float) -> float:
    """The scale TE and DE lost are compared with (see :data:`SCALE_RULE`), metric units, signed like the gap.

    ``clean``, ``corrupted``: the mean clean and corrupted metric. ``|clean|`` clipped to
    ``[|gap| / 2, |gap|]``: under a swap corruption (corrupted = -clean) it is ``|clean|`` = |gap| / 2, under an
    abc one (corrupted = 0) ``|clean|`` = |gap|; it never doubles with the corruption. Where the gap is 0 (a
    corruption that leaves the metric unchanged) it is ``|clean|``.
    """
    gap = clean - corrupted
    if abs(gap) <= 1e-9 * max(abs(clean), 1.0):  # a corruption that leaves the metric unchanged: only clean remains
        return float(abs(clean))
    mag = min(max(abs(clean), abs(gap) / 2), abs(gap))
    return float(mag if gap >= 0 else -mag)


def _names(x: object) -> str:
    return x if isinstance(x, str) else ""


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
            ``iterated_backups`` (str: those compensators, comma-separated).
            ``confirmed_backups``, ``iterated_cost`` and ``iterated_backups`` may
            be absent (no paired or iterated evidence).
        threshold: t in (0, 1); TE and DE lost are compared with ``t * |scale|``,
            restoration and damage (already shares of the gap) with ``t``.
        scale: the metric scale the thresholds are relative to, in metric units,
            signed like the clean - corrupted gap (a drop of the metric in that
            direction is a loss): :func:`verdict_scale` of the mean clean and
            corrupted metric.

    Returns:
        A frame with the same index and columns ``necessity``, ``restoring``,
        ``backed_up``, ``masked`` (bools: the rule's N, R, B and M),
        ``verdict`` (one of :data:`VERDICTS`) and ``backups`` (text naming the
        backups behind B and the evidence, e.g. ``"L3H0 (paired ablation)"``;
        "" where B is false).
    """
    f = frame
    n = len(f)
    te_n = f["total_effect"] / scale
    del_n = f["de_lost"] / scale
    side_lo = f["total_effect_lo"] if scale >= 0 else -f["total_effect_hi"]
    del_lo = f["de_lost_lo"] if scale >= 0 else -f["de_lost_hi"]
    N = (side_lo > 0) & (te_n >= threshold)
    R = (f["restoration"] >= threshold) | (f["damage"] >= threshold)
    L = f["lower_bound"].eq(True)  # NaN (a component not ablated) is no lower bound
    paired = (f["confirmed_backups"].map(_names).str.len() > 0 if "confirmed_backups" in f
              else pd.Series(False, index=f.index))
    cost_n = f["iterated_cost"] / scale if "iterated_cost" in f else pd.Series(np.full(n, np.nan), index=f.index)
    iterated = L & (del_lo > 0) & (cost_n >= (1 - threshold) * del_n)
    B = paired | iterated
    M = B | (L & (del_n >= threshold) & (te_n < del_n))
    verdict = np.select([B, N & R, M & ~N, N, R], [VERDICTS[1], *VERDICTS[:4]], default=VERDICTS[4])
    it_names = f["iterated_backups"].map(_names) if "iterated_backups" in f else pd.Series("", index=f.index)
    backups = []
    for i in range(n):
        pair = _names(f["confirmed_backups"].iloc[i]) if paired.iloc[i] else ""
        it = (it_names.iloc[i] or "its compensators") if iterated.iloc[i] else ""
        it_text = f"iterated ablation: {pct(cost_n.iloc[i] / del_n.iloc[i])} of DE lost" if it else ""
        if pair and it == pair:
            backups.append(f"{pair} (paired ablation; {it_text})")
        else:
            backups.append("; ".join(x for x in (pair and f"{pair} (paired ablation)", it and f"{it} ({it_text})")
                                     if x))
    return pd.DataFrame({"necessity": N, "restoring": R, "backed_up": B, "masked": M, "verdict": verdict,
                         "backups": backups}, index=f.index)


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


def confirmed_backups(edges_tested: pd.DataFrame | None) -> dict[str, str]:
    """Per ablated component: the compensators a paired ablation confirmed, strongest edge first, as text."""
    e = edges_tested
    if e is None or e.empty:
        return {}
    e = e[e["verified"] == "confirmed"].sort_values("weight", ascending=False, kind="stable")
    return {c: ", ".join(g["target"]) for c, g in e.groupby("source", sort=False)}


def iterated_costs(iterated: pd.DataFrame | None) -> tuple[dict[str, float], dict[str, str]]:
    """({target: cost}, {target: compensators}) of an iterated ablation's summary: the cost of removing the
    target once every compensator is ablated too (``target_marginal`` at the last step), and those compensators."""
    if iterated is None or iterated.empty:
        return {}, {}
    s = iterated.sort_values("step")
    target = str(s["ablated"].iloc[0])
    return ({target: float(s["target_marginal"].iloc[-1])}, {target: ", ".join(map(str, s["added"].iloc[1:]))})


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
        ``TriangulationReport.to_frame``: the inputs' means and intervals, ``compensators``,
        ``confirmed_backups``, ``iterated_cost``, ``iterated_backups``, ``te_norm`` and ``del_norm`` (TE and DE
        lost / :func:`verdict_scale`), ``importance``, and :func:`classify`'s columns.
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
    t["confirmed_backups"] = t["component"].map(confirmed_backups(edges_tested)).fillna("")
    cost, names = iterated_costs(iterated)
    t["iterated_cost"] = t["component"].map(cost).astype(float)
    t["iterated_backups"] = t["component"].map(names).fillna("")
    scale = verdict_scale(baseline["clean_metric"], baseline["corrupted_metric"])
    t["te_norm"] = t["total_effect"] / scale
    t["del_norm"] = t["de_lost"] / scale
    t["importance"] = t[["te_norm", "del_norm", "restoration", "damage"]].abs().max(axis=1)
    v = classify(t, threshold, scale)
    for col in v.columns:
        t[col] = v[col]
    t = t.sort_values(["importance", "layer", "head"], ascending=[False, True, True], kind="stable")
    return t.reset_index(drop=True)


__all__ = ["CLASSIFY_COLUMNS", "SCALE_RULE", "VERDICTS", "VERDICT_RULE", "classify", "compensator_text",
           "confirmed_backups", "confirmed_edges", "iterated_costs", "verdict_scale", "verdict_table"]
