"""The verdict module (hydra_probe.claims): hand-made frames whose verdicts are known, and statistics on one prompt."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import tiny

import hydra_probe as hp
from hydra_probe import stats
from hydra_probe.claims import VERDICT_RULE, VERDICTS, classify, verdict_table
from hydra_probe.claims.verdicts import compensator_text, confirmed_edges

NAN = float("nan")


def row(te=0.0, te_lo=None, te_hi=None, de_lost=0.0, restoration=0.0, damage=0.0, lower_bound=False,
        backups="", iterated=NAN, **kw):
    """One component's evidence; the TE interval defaults to +-0.05 around the mean."""
    return {"total_effect": te, "total_effect_lo": te - 0.05 if te_lo is None else te_lo,
            "total_effect_hi": te + 0.05 if te_hi is None else te_hi, "de_lost": de_lost,
            "de_lost_lo": de_lost - 0.05, "de_lost_hi": de_lost + 0.05, "restoration": restoration, "damage": damage,
            "lower_bound": lower_bound, "confirmed_backups": backups, "iterated_cost": iterated, **kw}


# gap = 2 (e.g. a swap corruption of a clean logit difference of 1), threshold 0.1: TE and DE lost need >= 0.2
CASES = {
    "important": (row(te=1.0, de_lost=1.0, restoration=0.5), "agree: important"),
    "important by damage": (row(te=0.4, de_lost=0.4, damage=0.3), "agree: important"),
    "necessity": (row(te=0.5, de_lost=0.5, restoration=0.05, damage=0.02), "necessity only"),
    "restoration": (row(te=0.01, restoration=0.3), "restoration only"),
    "minor": (row(te=0.01, de_lost=0.01, restoration=0.02, damage=0.01), "agree: minor"),
    "masked": (row(te=0.02, de_lost=0.6, lower_bound=True, restoration=0.01), "masked by self-repair"),
    "masked and restoring": (row(te=0.02, de_lost=0.6, lower_bound=True, restoration=0.4), "masked by self-repair"),
    # the TE's interval reaches 0: not necessity, however large the mean
    "unresolved TE": (row(te=0.5, te_lo=-0.1, te_hi=1.1, restoration=0.02), "agree: minor"),
    # the interval excludes 0 but TE is below the threshold
    "small TE": (row(te=0.1, te_lo=0.05, te_hi=0.15, restoration=0.02), "agree: minor"),
    # NaN scores (not measured) restore nothing
    "unmeasured": (row(te=0.5, de_lost=0.5, restoration=NAN, damage=NAN), "necessity only"),
    # one prompt: no interval, so no necessity
    "one prompt": (row(te=1.0, te_lo=NAN, te_hi=NAN, restoration=0.02), "agree: minor"),
}


def frame(cases):
    return pd.DataFrame([r for r, _ in cases.values()], index=list(cases))


def test_classify_hand_made_rows():
    f = frame(CASES)
    out = classify(f, 0.1, 2.0)
    assert list(out.columns) == ["necessity", "restoring", "masked", "verdict"]
    assert out.index.equals(f.index)
    for name, (_, want) in CASES.items():
        assert out.loc[name, "verdict"] == want, name
    assert set(out["verdict"]) <= set(VERDICTS)
    assert bool(out.loc["important", "necessity"]) and bool(out.loc["important", "restoring"])
    assert bool(out.loc["masked", "masked"]) and not bool(out.loc["masked", "necessity"])


def test_classify_follows_the_sign_of_the_scale():
    """With clean below corrupted (negative gap) a loss is a rise of the metric: TE < 0 beyond its interval."""
    f = frame({"up": (row(te=-1.0, de_lost=-1.0, restoration=0.5), None),
               "down": (row(te=1.0, de_lost=1.0, restoration=0.5), None)})
    out = classify(f, 0.1, -2.0)
    assert out.loc["up", "verdict"] == "agree: important"
    assert out.loc["down", "verdict"] == "restoration only"


def test_threshold_is_relative_to_the_scale():
    f = frame({"c": (row(te=0.3, de_lost=0.3, restoration=0.02), None)})
    assert classify(f, 0.1, 2.0).loc["c", "verdict"] == "necessity only"    # 0.3 / 2 >= 0.1
    assert classify(f, 0.1, 4.0).loc["c", "verdict"] == "agree: minor"      # 0.3 / 4 < 0.1


def test_rule_text_names_every_verdict():
    for v in VERDICTS:
        assert f'"{v}"' in VERDICT_RULE


# ------------------------------------------------------------------ verdict_table on hand-made summaries
def summaries():
    comps = pd.DataFrame({"component": ["L0H0", "L0H1", "L1H0"], "layer": [0, 0, 1], "head": [0, 1, 0],
                          "kind": "head"})
    direct = pd.DataFrame({"component": ["L0H0", "L0H1", "L1H0"], "direct_effect": [0.7, 0.05, 0.9],
                           "direct_effect_lo": [0.6, 0.0, 0.8], "direct_effect_hi": [0.8, 0.1, 1.0]})
    sr = pd.DataFrame({
        "component": ["L0H0", "L0H1", "L1H0"],
        "total_effect": [0.1, 0.01, 0.9], "total_effect_lo": [0.05, -0.02, 0.8], "total_effect_hi": [0.15, 0.04, 1.0],
        "de_lost": [0.7, 0.05, 0.9], "de_lost_lo": [0.6, 0.0, 0.8], "de_lost_hi": [0.8, 0.1, 1.0],
        "self_repair": [0.6, 0.04, 0.0], "self_repair_lo": [0.5, -0.01, -0.05], "self_repair_hi": [0.7, 0.09, 0.05],
        "norm_term": [0.05, 0.0, 0.0], "fraction_repaired": [0.6 / 0.7, 0.8, 0.0], "lower_bound": [True, False, False],
        "q_self_repair": [0.001, 0.3, 0.9]})
    top = sr[["component", "de_lost", "self_repair", "fraction_repaired"]].assign(de_lost=[1.0, 0.1, 1.0])
    contrib = pd.DataFrame({"component": ["L0H0", "L0H0", "L0H0", "L0H1"],
                            "downstream": ["L1H0", "NORM", "MLP1", "L1H0"],
                            "delta_de": [0.5, 0.05, 0.04, 0.03], "q": [0.001, 0.01, 0.2, 0.001]})

    def score(vals):
        return pd.DataFrame({"component": ["L0H0", "L0H1", "L1H0"], "score": vals, "score_lo": np.subtract(vals, 0.1),
                             "score_hi": np.add(vals, 0.1)})

    return dict(components=comps, direct=direct, self_repair=sr, self_repair_top=top, contributions=contrib,
                denoise=score([0.02, 0.01, 0.6]), noise=score([0.03, 0.0, 0.5]),
                baseline={"clean_metric": 1.0, "corrupted_metric": -1.0, "gap": 2.0}, threshold=0.1)


def test_verdict_table_joins_and_classifies_hand_made_summaries():
    edges = pd.DataFrame({"source": ["L0H0", "L0H0"], "target": ["L1H0", "MLP1"],
                          "verified": ["confirmed", "refuted"]})
    att = pd.DataFrame({"component": ["L0H0", "L0H0", "L0H1", "L1H0"], "prompt": [0, 1, 0, 0],
                        "estimate": [0.2, 0.4, 0.0, 1.0]})
    t = verdict_table(**summaries(), attribution=att, edges_tested=edges).set_index("component")
    assert t.loc["L1H0", "verdict"] == "agree: important"
    assert t.loc["L0H0", "verdict"] == "masked by self-repair"
    assert t.loc["L0H1", "verdict"] == "agree: minor"
    # compensators: positive ΔDE and q < 0.05 or confirmed, strongest first; MLP1 (q 0.2, refuted) is left out
    assert t.loc["L0H0", "compensators"] == "L1H0 (+0.5, confirmed), NORM (+0.05)"
    assert t.loc["L0H1", "compensators"] == "L1H0 (+0.03)"
    assert t.loc["L1H0", "compensators"] == ""      # no self-repair, no compensators
    assert t.loc["L0H0", "attribution"] == pytest.approx(0.3 / 2)
    assert t.loc["L0H0", "te_norm"] == pytest.approx(0.05) and t.loc["L0H0", "del_norm"] == pytest.approx(0.35)
    assert t.loc["L0H0", "de_lost_top"] == 1.0 and t.loc["L1H0", "restoration"] == 0.6
    assert t.loc["L1H0", "damage_lo"] == pytest.approx(0.4)
    assert list(t.index) == ["L1H0", "L0H0", "L0H1"]  # by importance
    assert t.loc["L1H0", "importance"] == pytest.approx(0.6)


def test_verdict_table_without_optional_evidence():
    t = verdict_table(**summaries())
    assert t["attribution"].isna().all()
    assert t.set_index("component").loc["L0H0", "compensators"] == "L1H0 (+0.5), NORM (+0.05)"


def test_confirmed_edges_and_compensator_text():
    assert confirmed_edges(None) == set() and confirmed_edges(pd.DataFrame()) == set()
    e = pd.DataFrame({"source": ["a", "a"], "target": ["b", "c"], "verified": ["confirmed", "refuted"]})
    assert confirmed_edges(e) == {("a", "b")}
    cs = pd.DataFrame({"component": ["a"] * 5, "downstream": ["b", "c", "d", "e", "f"],
                       "delta_de": [0.1, 0.4, 0.3, 0.2, -0.5], "q": [0.9, 0.01, 0.01, 0.01, 0.001]})
    # b (q 0.9) counts only because a paired ablation confirmed it; at most three, strongest first
    assert compensator_text(cs, {("a", "b")}) == {"a": "c (+0.4), d (+0.3), e (+0.2)"}
    assert compensator_text(cs, {("a", "b")}, k=5) == {"a": "c (+0.4), d (+0.3), e (+0.2), b (+0.1, confirmed)"}


# ------------------------------------------------------------------ one prompt is never significant
def test_interval_statistics_of_one_prompt_are_not_significant():
    m, lo, hi = stats.t_interval([0.7])
    assert m == 0.7 and math.isnan(lo) and math.isnan(hi)
    m, lo, hi = stats.bootstrap_interval([0.7])
    assert m == 0.7 and math.isnan(lo) and math.isnan(hi)
    assert math.isnan(stats.one_sample_p([0.7])) and math.isnan(stats.one_sample_p([0.7], "two-sided"))
    g = stats.grouped_t(pd.DataFrame({"k": ["a", "b", "b"], "x": [0.7, 0.5, 0.5]}), ["k"], "x").set_index("k")
    assert math.isnan(g.loc["a", "p"]) and math.isnan(g.loc["a", "lo"])
    assert g.loc["b", "p"] == 0.0  # two equal nonzero values: no spread, resolved
    rej, q = stats.bh([NAN, 0.001])
    assert list(rej) == [False, True] and math.isnan(q[0])


def test_one_prompt_self_repair_claims_nothing():
    m = tiny.model("gpt2")
    sr = hp.self_repair(m, tiny.ioi(m, 1), "heads", value="zero")
    s = sr.summary()
    assert not s["lower_bound"].any() and s["q_self_repair"].isna().all()
    assert sr.contribution_summary()["q"].isna().all()
