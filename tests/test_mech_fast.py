"""The fast paths of "Why it repairs": RepairMechanisms' summaries equal plain pandas references, its frame is
categorical and survives save/load, add_mechanisms equals a row-by-row reference, and the report's self-repair comes
from the same sweep as its mechanisms (exactly) and equals self_repair to float32 rounding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tiny

import hydra_probe as hp
from hydra_probe.effects.mechanisms import MECHANISMS
from hydra_probe.stats import grouped_t, t_interval


@pytest.fixture(scope="module", params=[("gemma2", "recomputed", "symmetric"), ("llama", "frozen", "values_first")])
def mech(request):
    fam, scale, order = request.param
    m = hp.load_model(tiny.hf_model(fam).double(), tokenizer=tiny.tokenizer(bos=True))
    t = tiny.ioi(m, 5)
    return m, t, hp.repair_mechanisms(m, t, ["L0H1", "MLP0", "L1H2+L2H3", "L1H0"], value="mean", scale=scale,
                                      order=order)


def _plain_per_mechanism(r: hp.RepairMechanisms) -> pd.DataFrame:
    f = r.to_frame().astype({"component": object, "mechanism": object, "downstream": object})
    wide = f.pivot_table(index=["component", "prompt"], columns="mechanism", values="amount", aggfunc="sum",
                         sort=False).reindex(columns=list(MECHANISMS)).fillna(0.0)
    sr = r.self_repair_frame().set_index(["component", "prompt"])["self_repair"]
    wide["self_repair"] = sr.reindex(wide.index).to_numpy()
    return wide.reset_index()


def test_per_mechanism_and_summary_equal_plain_references(mech):
    _, t, r = mech
    w, ref = r.per_mechanism(), _plain_per_mechanism(r)
    assert list(w.columns) == list(ref.columns) == ["component", "prompt", *MECHANISMS, "self_repair"]
    assert list(w["component"]) == list(ref["component"]) and list(w["prompt"]) == list(ref["prompt"])
    np.testing.assert_allclose(w[list(MECHANISMS)].to_numpy(float), ref[list(MECHANISMS)].to_numpy(float),
                               rtol=0, atol=1e-12)
    # the mechanisms close on the self-repair, per (component, prompt) (to the float32 of these families' norms)
    np.testing.assert_allclose(w[list(MECHANISMS)].sum(1), w["self_repair"], rtol=0, atol=1e-6)
    present = [mm for mm in MECHANISMS if (r.to_frame()["mechanism"] == mm).any()]
    assert r.mechanisms() == present
    rows = []
    for c, g in ref.groupby("component", sort=False):
        sr = float(g["self_repair"].mean())
        for mm in present:
            m, lo, hi = t_interval(g[mm].to_numpy(), 0.9)
            rows.append([c, mm, len(g), m, lo, hi, sr, m / sr if abs(sr) > 1e-12 else np.nan])
    plain = pd.DataFrame(rows, columns=["component", "mechanism", "n", "amount", "amount_lo", "amount_hi",
                                        "self_repair", "share"])
    s = r.summary(level=0.9)
    assert list(s.columns) == list(plain.columns)
    assert list(s["component"]) == list(plain["component"]) and list(s["mechanism"]) == list(plain["mechanism"])
    assert (s["n"] == len(t)).all()
    num = ["amount", "amount_lo", "amount_hi", "self_repair", "share"]
    np.testing.assert_allclose(s[num].to_numpy(float), plain[num].to_numpy(float), rtol=1e-9, atol=1e-12)


def test_frame_is_categorical_and_round_trips(mech, tmp_path):
    _, t, r = mech
    f = r.to_frame()
    assert list(f.columns) == ["component", "prompt", "mechanism", "downstream", "amount"]
    for col in ("component", "mechanism", "downstream"):
        assert isinstance(f[col].dtype, pd.CategoricalDtype)
        cats = list(f[col].cat.categories)
        assert cats == sorted(cats) and set(cats) == set(f[col].astype(str))  # only the labels used, sorted
    # rows: component-major (the order asked), then prompt
    comps = list(dict.fromkeys(f["component"].astype(str)))
    assert comps == ["L0H1", "MLP0", "L1H2+L2H3", "L1H0"]
    assert f.groupby("component", sort=False, observed=True)["prompt"].apply(
        lambda p: bool(p.is_monotonic_increasing)).all()
    back = hp.load_result(r.save(tmp_path / "m.json"))
    pd.testing.assert_frame_equal(back.to_frame(), f)


def test_add_mechanisms_equals_a_row_by_row_reference(mech):
    from hydra_probe.graph import add_mechanisms, compensation_graph

    m, t, r = mech
    G = compensation_graph(r.as_self_repair(), threshold=0.0, top_k=4)
    H = add_mechanisms(G, r)
    stats = grouped_t(r.to_frame().astype({"component": object, "mechanism": object, "downstream": object}),
                      ["component", "downstream", "mechanism"], "amount", 0.95)
    seen = 0
    for _, s in stats.iterrows():
        if not G.has_edge(s["component"], s["downstream"]):
            continue
        e = H.edges[s["component"], s["downstream"]]
        for key, v in ((s["mechanism"], s["mean"]), (f"{s['mechanism']}_lo", s["lo"]),
                       (f"{s['mechanism']}_hi", s["hi"])):
            assert e[key] == pytest.approx(float(v), rel=1e-12, abs=1e-15), key
        seen += 1
    assert seen > 0
    assert H.graph["mechanism_order"] == r.provenance["order"]


def test_report_takes_its_self_repair_from_the_mechanisms_sweep():
    m = tiny.model("gpt2", layers=2, heads=2, d=16, initializer_range=0.3)
    task = hp.tasks.ioi(m, 6, corruption="swap", seed=0)
    comps = ["L0H0", "L0H1", "L1H0", "MLP0"]
    rep = hp.triangulate(m, task, components=comps, top=2, iterate=0, progress=False)
    sr, mech = rep.results["self_repair"], rep.results["repair_mechanisms"]
    # one sweep: the report's self-repair is its mechanisms' (exactly), and self_repair's to float32 rounding
    pd.testing.assert_frame_equal(sr.to_frame(), mech.as_self_repair().to_frame())
    pd.testing.assert_frame_equal(sr.contributions(), mech.contributions())
    plain = hp.self_repair(m, task, comps)
    pd.testing.assert_frame_equal(sr.to_frame(), plain.to_frame(), check_exact=False, rtol=1e-5, atol=2e-5)
    assert sr.provenance == plain.provenance
    # the "Why it repairs" results are those of the same call made on its own
    alone = hp.repair_mechanisms(m, task, comps)
    pd.testing.assert_frame_equal(mech.to_frame(), alone.to_frame())
