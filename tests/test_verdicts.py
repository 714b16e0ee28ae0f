"""The verdict module (hydra_probe.claims): hand-made frames whose verdicts are known, and statistics on one prompt."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import tiny
from hypothesis import given, settings
from hypothesis import strategies as st

import hydra_probe as hp
from hydra_probe import stats
from hydra_probe.claims import VERDICT_RULE, VERDICTS, classify, verdict_scale, verdict_table
from hydra_probe.claims.verdicts import compensator_text, confirmed_backups, confirmed_edges, iterated_costs

NAN = float("nan")


def row(te=0.0, te_lo=None, te_hi=None, de_lost=0.0, restoration=0.0, damage=0.0, lower_bound=False,
        backups="", iterated=NAN, iterated_backups="", **kw):
    """One component's evidence; the TE and DE lost intervals default to +-0.02 around the mean."""
    return {"total_effect": te, "total_effect_lo": te - 0.02 if te_lo is None else te_lo,
            "total_effect_hi": te + 0.02 if te_hi is None else te_hi, "de_lost": de_lost,
            "de_lost_lo": de_lost - 0.02, "de_lost_hi": de_lost + 0.02, "restoration": restoration, "damage": damage,
            "lower_bound": lower_bound, "confirmed_backups": backups, "iterated_cost": iterated,
            "iterated_backups": iterated_backups, **kw}


# scale = 2, threshold 0.1: TE and DE lost need >= 0.2; restoration and damage >= 0.1
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
    # issue 16: the report's own paired and iterated evidence. DE lost 0.1 is 5% of the scale: small, yet masked
    "confirmed backup, small DE": (row(te=0.0, de_lost=0.1, lower_bound=True, backups="L3H0"),
                                   "masked by self-repair"),
    "confirmed backup, restoring": (row(te=0.0, de_lost=0.1, lower_bound=True, restoration=0.3, backups="L3H0"),
                                    "masked by self-repair"),
    "confirmed backup, important": (row(te=1.0, de_lost=1.6, lower_bound=True, restoration=0.5,
                                        backups="L3H0, L3H2"), "masked by self-repair"),
    # a paired ablation shows d covering for c even where the net self-repair is not resolved
    "confirmed backup, no lower bound": (row(te=0.01, de_lost=0.05, restoration=0.3, backups="L3H0"),
                                         "masked by self-repair"),
    "iterated cost reaches DE lost": (row(te=0.0, de_lost=0.1, lower_bound=True, iterated=0.095,
                                          iterated_backups="L2H1, MLP3"), "masked by self-repair"),
    "iterated cost short of DE lost": (row(te=0.0, de_lost=0.1, lower_bound=True, iterated=0.05), "agree: minor"),
    # without a resolved self-repair an iterated cost says nothing (TE ~ DE lost reaches it trivially)
    "iterated, no lower bound": (row(te=0.1, de_lost=0.1, iterated=0.1, restoration=0.3), "restoration only"),
    "iterated, DE lost unresolved": (row(te=-0.1, de_lost=0.01, lower_bound=True, iterated=0.01), "agree: minor"),
    "no backup, restoring": (row(te=0.0, de_lost=0.1, lower_bound=True, restoration=0.3), "restoration only"),
}


def frame(cases):
    return pd.DataFrame([r for r, _ in cases.values()], index=list(cases))


def test_classify_hand_made_rows():
    f = frame(CASES)
    out = classify(f, 0.1, 2.0)
    assert list(out.columns) == ["necessity", "restoring", "backed_up", "masked", "verdict", "backups"]
    assert out.index.equals(f.index)
    for name, (_, want) in CASES.items():
        assert out.loc[name, "verdict"] == want, name
    assert set(out["verdict"]) <= set(VERDICTS)
    assert bool(out.loc["important", "necessity"]) and bool(out.loc["important", "restoring"])
    assert bool(out.loc["masked", "masked"]) and not bool(out.loc["masked", "necessity"])
    assert not out.loc["masked", "backed_up"] and out.loc["masked", "backups"] == ""
    assert out.loc["confirmed backup, small DE", "backups"] == "L3H0 (paired ablation)"
    assert out.loc["confirmed backup, important", "backups"] == "L3H0, L3H2 (paired ablation)"
    assert out.loc["iterated cost reaches DE lost", "backups"] == "L2H1, MLP3 (iterated ablation: 95% of DE lost)"
    assert (out["backups"] != "").equals(out["backed_up"].astype(bool))


def test_classify_names_backups_confirmed_both_ways_once():
    f = frame({"c": (row(de_lost=0.1, lower_bound=True, backups="L3H0", iterated=0.1, iterated_backups="L3H0"),
                     None),
               "d": (row(de_lost=0.1, lower_bound=True, backups="L3H0", iterated=0.1, iterated_backups="L3H0, L3H1"),
                     None)})
    out = classify(f, 0.1, 2.0)
    assert out.loc["c", "backups"] == "L3H0 (paired ablation; iterated ablation: 100% of DE lost)"
    assert out.loc["d", "backups"] == "L3H0 (paired ablation); L3H0, L3H1 (iterated ablation: 100% of DE lost)"


def test_classify_without_paired_or_iterated_columns():
    f = frame(CASES).drop(columns=["confirmed_backups", "iterated_cost", "iterated_backups"])
    out = classify(f, 0.1, 2.0)
    assert not out["backed_up"].any()
    assert out.loc["confirmed backup, small DE", "verdict"] == "agree: minor"  # what the old rule said
    assert out.loc["confirmed backup, restoring", "verdict"] == "restoration only"

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


@pytest.mark.parametrize(("clean", "corrupted", "want"), [
    (1.0, -1.0, 1.0),      # swap: the gap doubles, the scale is the clean metric
    (1.0, 0.0, 1.0),       # abc: gap = clean
    (1.0, 0.2, 0.8),       # a weak corruption: at most the gap
    (0.01, -2.0, 1.005),   # clean near 0: at least half the gap
    (20.0, 17.0, 3.0),     # a metric with an offset (a raw logit): at most the gap
    (-1.0, 1.0, -1.0),     # clean below corrupted: signed like the gap
    (2.0, 2.0, 2.0),       # a corruption that changes nothing: the clean metric alone
])
def test_verdict_scale(clean, corrupted, want):
    assert verdict_scale(clean, corrupted) == pytest.approx(want)


def test_a_swap_corruption_does_not_change_ablation_verdicts():
    """The same ablation evidence under swap (gap = 2 x clean) and abc (gap = clean) corruptions: the scale, and so
    every verdict that rests on TE and DE lost, is the same."""
    f = frame({k: v for k, v in CASES.items() if k != "one prompt"})
    f[["restoration", "damage"]] = 0.0
    swap = classify(f, 0.1, verdict_scale(1.0, -1.0))
    abc = classify(f, 0.1, verdict_scale(1.0, 0.0))
    pd.testing.assert_frame_equal(swap, abc)


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
    edges = pd.DataFrame({"source": ["L0H0", "L0H0"], "target": ["L1H0", "MLP1"], "weight": [0.5, 0.04],
                          "verified": ["confirmed", "refuted"]})
    att = pd.DataFrame({"component": ["L0H0", "L0H0", "L0H1", "L1H0"], "prompt": [0, 1, 0, 0],
                        "estimate": [0.2, 0.4, 0.0, 1.0]})
    t = verdict_table(**summaries(), attribution=att, edges_tested=edges).set_index("component")
    assert t.loc["L1H0", "verdict"] == "agree: important"
    assert t.loc["L0H0", "verdict"] == "masked by self-repair" and t.loc["L0H0", "backups"] == "L1H0 (paired ablation)"
    assert t.loc["L0H1", "verdict"] == "agree: minor"
    assert t.loc["L0H0", "confirmed_backups"] == "L1H0" and t.loc["L0H1", "confirmed_backups"] == ""
    # compensators: positive ΔDE and q < 0.05 or confirmed, strongest first; MLP1 (q 0.2, refuted) is left out
    assert t.loc["L0H0", "compensators"] == "L1H0 (+0.5, confirmed), NORM (+0.05)"
    assert t.loc["L0H1", "compensators"] == "L1H0 (+0.03)"
    assert t.loc["L1H0", "compensators"] == ""      # no self-repair, no compensators
    assert t.loc["L0H0", "attribution"] == pytest.approx(0.3 / 2)
    # TE and DE lost against the verdict scale: clean 1, corrupted -1 (a swap) -> 1, not the gap 2
    assert t.loc["L0H0", "te_norm"] == pytest.approx(0.1) and t.loc["L0H0", "del_norm"] == pytest.approx(0.7)
    assert t.loc["L0H0", "de_lost_top"] == 1.0 and t.loc["L1H0", "restoration"] == 0.6
    assert t.loc["L1H0", "damage_lo"] == pytest.approx(0.4)
    assert list(t.index) == ["L1H0", "L0H0", "L0H1"]  # by importance
    assert t.loc["L1H0", "importance"] == pytest.approx(0.9)


def test_verdict_table_without_optional_evidence():
    t = verdict_table(**summaries()).set_index("component")
    assert t["attribution"].isna().all() and t["iterated_cost"].isna().all()
    assert t.loc["L0H0", "compensators"] == "L1H0 (+0.5), NORM (+0.05)"
    # TE / scale = 0.1 >= t: necessity; masked only through the paired confirmation (see the test above)
    assert t.loc["L0H0", "verdict"] == "necessity only" and t.loc["L0H0", "backups"] == ""


def test_verdict_table_small_component_backed_up_by_iterated_ablation():
    """L0H1's DE lost (0.05) is 5% of the scale: without evidence 'minor'; an iterated ablation whose cost reaches
    its DE lost (and a resolved self-repair) makes it masked, naming the compensators."""
    kw = summaries()
    sr = kw["self_repair"].copy()
    sr.loc[1, ["total_effect", "total_effect_lo", "total_effect_hi"]] = [0.005, -0.01, 0.02]
    sr.loc[1, ["de_lost_lo", "self_repair", "self_repair_lo", "lower_bound"]] = [0.03, 0.045, 0.02, True]
    kw["self_repair"] = sr
    before = verdict_table(**kw).set_index("component")
    assert before.loc["L0H1", "verdict"] == "agree: minor"
    it = pd.DataFrame({"step": [0, 1, 2], "ablated": ["L0H1", "L0H1+L1H0", "L0H1+L1H0+MLP1"],
                       "added": ["", "L1H0", "MLP1"], "target_marginal": [0.005, 0.03, 0.048]})
    assert iterated_costs(it) == ({"L0H1": 0.048}, {"L0H1": "L1H0, MLP1"})
    t = verdict_table(**kw, iterated=it).set_index("component")
    assert t.loc["L0H1", "verdict"] == "masked by self-repair"
    assert t.loc["L0H1", "backups"] == "L1H0, MLP1 (iterated ablation: 96% of DE lost)"
    assert t.loc["L0H1", "iterated_cost"] == 0.048 and math.isnan(t.loc["L0H0", "iterated_cost"])


def test_confirmed_edges_and_compensator_text():
    assert confirmed_edges(None) == set() and confirmed_edges(pd.DataFrame()) == set()
    e = pd.DataFrame({"source": ["a", "a", "a", "x"], "target": ["b", "c", "d", "y"], "weight": [0.1, 0.3, 0.2, 0.1],
                      "verified": ["confirmed", "refuted", "confirmed", "refuted"]})
    assert confirmed_edges(e) == {("a", "b"), ("a", "d")}
    assert confirmed_backups(e) == {"a": "d, b"} and confirmed_backups(None) == {}
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


# ------------------------------------------------------------------ property: paired evidence is never "minor"
NAMES = st.sampled_from(["", "", "L2H0", "L2H0, MLP3", NAN])
NUM = st.floats(-3, 3, allow_nan=False)
MAYBE = st.one_of(NUM, st.just(NAN))


@st.composite
def evidence(draw):
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        te, dl = draw(NUM), draw(NUM)
        w = draw(st.floats(0, 2))
        one = draw(st.booleans()) and draw(st.booleans())  # sometimes one prompt: no intervals
        rows.append({"total_effect": te, "total_effect_lo": NAN if one else te - w,
                     "total_effect_hi": NAN if one else te + draw(st.floats(0, 2)), "de_lost": dl,
                     "de_lost_lo": NAN if one else dl - draw(st.floats(0, 2)),
                     "de_lost_hi": NAN if one else dl + draw(st.floats(0, 2)),
                     "restoration": draw(MAYBE), "damage": draw(MAYBE), "lower_bound": draw(st.booleans()),
                     "confirmed_backups": draw(NAMES), "iterated_cost": draw(MAYBE)})
    scale = draw(st.one_of(st.floats(0.1, 5), st.floats(-5, -0.1)))
    return pd.DataFrame(rows), draw(st.floats(0.01, 0.9)), scale


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(evidence())
def test_no_backed_up_component_reads_minor_or_restoration_only(ev):
    f, thr, scale = ev
    out = classify(f, thr, scale)
    assert set(out["verdict"]) <= set(VERDICTS)
    for i in range(len(f)):
        names = f["confirmed_backups"].iloc[i]
        if isinstance(names, str) and names:
            assert out["verdict"].iloc[i] == "masked by self-repair"
            assert out["backups"].iloc[i].startswith(f"{names} (paired ablation")
        if out["backed_up"].iloc[i]:
            assert out["verdict"].iloc[i] not in ("agree: minor", "restoration only")
        # a row's verdict depends on that row alone
        assert classify(f.iloc[[i]], thr, scale)["verdict"].iloc[0] == out["verdict"].iloc[i]


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from(["L0H0", "L0H1", "L1H0"]), st.sampled_from(["L1H0", "MLP1", "L1H1"]),
                          st.sampled_from(["confirmed", "refuted"]), st.floats(0.01, 1)), max_size=5),
       st.lists(st.floats(-1, 1), min_size=3, max_size=3), st.lists(st.floats(0, 1), min_size=3, max_size=3))
def test_report_table_never_calls_a_confirmed_component_minor(edges, te, restoration):
    """verdict_table over hand-made summaries with random TE, restoration and paired-ablation outcomes."""
    kw = summaries()
    sr = kw["self_repair"].copy()
    sr["total_effect"] = te
    sr["total_effect_lo"], sr["total_effect_hi"] = np.subtract(te, 0.05), np.add(te, 0.05)
    kw["self_repair"] = sr
    kw["denoise"] = kw["denoise"].assign(score=restoration)
    e = pd.DataFrame(edges, columns=["source", "target", "verified", "weight"])
    t = verdict_table(**kw, edges_tested=e).set_index("component")
    for c in set(e.loc[e["verified"] == "confirmed", "source"]):
        assert t.loc[c, "verdict"] == "masked by self-repair", (c, t.loc[c].to_dict())
        for d in e.loc[(e["source"] == c) & (e["verified"] == "confirmed"), "target"]:
            assert d in t.loc[c, "backups"]


# ------------------------------------------------------------------ a hand-built model: small DE, fully backed up
def backup_model_with_a_big_writer():
    """tests/test_backup_model.py's model (A = L0H0 writes the answer, B = L1H0 restores it when A is ablated),
    plus a head L0H1 that writes a large answer signal whenever the source token is present. The clean -
    corrupted gap is then about 11x A's direct effect: A is small beside it, and fully backed up by B."""
    import test_backup_model as bm
    import torch

    m = bm.build(1.0)
    with torch.no_grad():
        blk = m.hf_model.transformer.h[0].attn
        W, D, DH = blk.c_attn.weight, bm.D, bm.DH
        W[bm.SRC_D, 2 * D + DH], W[bm.ZERO, 2 * D + DH] = 1.0, -1.0  # L0H1 value: the source marker (query 0:
        O = blk.c_proj.weight                                         # uniform attention, 1/3 on the clean run)
        O[DH, bm.ANS_P], O[DH, bm.ANS_M] = 45.0, -45.0               # about +30 on logit(yes) - logit(no)
    return m, bm.task(m), bm


def test_small_fully_backed_up_component_is_masked_and_names_its_backup():
    m, task, bm = backup_model_with_a_big_writer()
    rep = hp.triangulate(m, task, value="zero", top=3, progress=False)
    t = rep.to_frame().set_index("component")
    b = rep.baseline
    a = t.loc[bm.A]
    assert b["gap"] > 8 * a["de_lost"] > 0 and abs(b["verdict_scale"]) > 8 * a["de_lost"]  # small beside the gap
    assert abs(a["total_effect"]) < 0.1 * a["de_lost"]                  # its single ablation hides 90%+
    assert a["del_norm"] < rep.config["threshold"] and a["restoration"] < rep.config["threshold"]
    assert a["verdict"] == "masked by self-repair" and a["backed_up"]
    assert a["confirmed_backups"] == bm.B and a["backups"].startswith(f"{bm.B} (paired ablation")
    # without the paired and iterated evidence the same numbers would read "minor"
    old = classify(t.drop(columns=["confirmed_backups", "iterated_cost", "iterated_backups"]).loc[[bm.A]],
                   rep.config["threshold"], b["verdict_scale"])
    assert old["verdict"].iloc[0] == "agree: minor"
    # the key findings open with it and its backup
    first = rep.summary().splitlines()[0]
    assert first.startswith("Masked by self-repair, with confirmed backups") and f"{bm.A} " in first and bm.B in first
