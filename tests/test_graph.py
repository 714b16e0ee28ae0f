"""Compensation graph: construction, statistics, exports, drawing, verification, iterated ablation."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import tiny

import hydra_probe as hp
from hydra_probe import graph as hg
from hydra_probe import stats
from hydra_probe.effects.iterated import IteratedAblation, iterated_ablation
from hydra_probe.errors import ComponentError, InputError, OptionError, OutputError
from hydra_probe.zoo import DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def setup():
    m = tiny.model("gpt2")
    t = tiny.ioi(m, 8)
    sr = hp.self_repair(m, t, "heads", value="mean")
    return m, t, sr, hg.compensation_graph(sr)


def _edges(G):
    return {(u, v): d for u, v, d in G.edges(data=True)}


# ------------------------------------------------------------------ construction
def _bh(p):
    """Benjamini-Hochberg q-values, written out (step-up, cumulative minimum from the largest p)."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(q)
    out[order] = np.minimum(q, 1)
    return out


def test_edges_are_the_per_prompt_contributions_summarised(setup):
    """Each edge is the mean over prompts of the per-prompt ΔDE rows, with a t interval, a two-sided t test and
    BH q over every (component, downstream) pair, computed here with plain numpy/scipy from the per-prompt
    contributions (not through the package's summary helpers)."""
    from scipy import stats as sps

    _, _, sr, G = setup
    con = sr.contributions()
    groups = {k: g["delta_de"].to_numpy() for k, g in con.groupby(["component", "downstream"], sort=False)}
    keys = list(groups)
    mean = {k: x.mean() for k, x in groups.items()}
    p = np.array([sps.ttest_1samp(groups[k], 0.0).pvalue if groups[k].std() > 0 else float(mean[k] == 0)
                  for k in keys])
    q = dict(zip(keys, _bh(p)))
    nonzero = [k for k in keys if abs(mean[k]) > 0]
    assert G.number_of_edges() == len(nonzero) > 50
    de_lost = sr.to_frame().groupby("component")["de_lost"].mean()
    for (c, d), e in _edges(G).items():
        x = groups[(c, d)]
        half = sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
        assert e["weight"] == pytest.approx(x.mean(), rel=1e-9, abs=1e-15)
        assert (e["weight_lo"], e["weight_hi"]) == pytest.approx((x.mean() - half, x.mean() + half), rel=1e-9,
                                                                 abs=1e-15)
        assert e["p"] == pytest.approx(dict(zip(keys, p))[(c, d)], rel=1e-6)
        assert e["q"] == pytest.approx(q[(c, d)], rel=1e-6)
        assert e["n"] == 8 and e["verified"] == "untested"
        assert e["fraction"] == pytest.approx(x.mean() / de_lost[c])
    f = sr.to_frame().groupby("component")
    for c, g in f:
        nd = G.nodes[c]
        assert nd["ablated"] and nd["kind"] == "head"
        assert nd["de"] == pytest.approx(g["clean_de"].mean())
        assert nd["de_lost"] == pytest.approx(g["de_lost"].mean())
        assert nd["te"] == pytest.approx(g["total_effect"].mean())
        # closure: all out-edges (downstream heads, MLPs, NORM) sum to the self-repair (TE is float32)
        assert sum(d["weight"] for _, _, d in G.out_edges(c, data=True)) == pytest.approx(nd["sr"], abs=1e-6)


def test_nodes_norm_and_provenance(setup):
    _, _, sr, G = setup
    assert G.nodes["NORM"]["kind"] == "norm" and G.nodes["NORM"]["layer"] == 3 and not G.nodes["NORM"]["ablated"]
    assert G.nodes["MLP2"] == {"kind": "mlp", "layer": 2, "ablated": False}
    assert G.nodes["L1H2"]["head"] == 2 and G.nodes["L1H2"]["layer"] == 1
    for k in ("model", "task", "value", "metric", "scale", "n", "seed"):
        assert G.graph[k] == sr.provenance[k]
    assert "Student-t" in G.graph["interval"] and G.graph["level"] == 0.95
    for where in [G.graph, *(d for _, d in G.nodes(data=True)), *(d for _, _, d in G.edges(data=True))]:
        assert all(isinstance(v, (str, int, float, bool)) and v == v for v in where.values())


def test_groups_layers_and_saved_results(setup, tmp_path):
    m, t, sr, G = setup
    sr2 = hp.self_repair(m, t, ["ATTN0", ["L1H0", "L1H1"], "MLP0"], value="mean")
    G2 = hg.compensation_graph(sr2)
    assert (G2.nodes["ATTN0"]["kind"], G2.nodes["MLP0"]["kind"]) == ("attn", "mlp")
    assert G2.nodes["L1H0+L1H1"]["kind"] == "group" and G2.nodes["L1H0+L1H1"]["layer"] == 1
    assert not G2.has_edge("L1H0+L1H1", "L1H2")  # heads of one layer are not downstream of each other
    assert G2.has_edge("ATTN0", "MLP0")
    # a saved and reloaded result gives the same graph
    G3 = hg.compensation_graph(hp.load_result(sr.save(tmp_path / "sr.json")))
    assert nx.utils.graphs_equal(G, G3) and dict(G.nodes(data=True)) == dict(G3.nodes(data=True))


def test_amplification_edges_kept_and_marked(setup):
    _, _, _, G = setup
    signs = {d["sign"] for _, _, d in G.edges(data=True)}
    assert signs == {"compensation", "amplification"}
    for _, _, d in G.edges(data=True):
        assert (d["sign"] == "compensation") == (d["weight"] > 0)


def test_threshold_top_k_relative(setup):
    _, _, sr, G = setup
    w = np.array([abs(d["weight"]) for _, _, d in G.edges(data=True)])
    thr = float(np.median(w))
    Gt = hg.compensation_graph(sr, threshold=thr)
    assert Gt.number_of_edges() == int((w > thr).sum()) and all(abs(d["weight"]) > thr for *_, d in Gt.edges(data=True))
    assert "NORM" in Gt and Gt.graph["threshold"] == thr
    Gk = hg.compensation_graph(sr, top_k=2)
    for c in sr.summary()["component"]:
        out = sorted((abs(d["weight"]) for _, _, d in G.out_edges(c, data=True)), reverse=True)
        kept = sorted((abs(d["weight"]) for _, _, d in Gk.out_edges(c, data=True)), reverse=True)
        assert kept == out[:2]
    assert Gk.graph["top_k"] == 2
    fr = np.array([abs(d["fraction"]) for _, _, d in G.edges(data=True)])
    Gr = hg.compensation_graph(sr, threshold=0.05, relative=True)
    assert Gr.number_of_edges() == int((fr > 0.05).sum())
    assert all(abs(d["fraction"]) > 0.05 for *_, d in Gr.edges(data=True)) and Gr.graph["relative"] is True
    with pytest.raises(OptionError):
        hg.compensation_graph(sr, top_k=0)
    with pytest.raises(OptionError):
        hg.compensation_graph(sr, threshold=-1)
    with pytest.raises(InputError):
        hg.compensation_graph(hp.ablate(*setup[:2], ["L0H0"]))


def test_grouped_t_matches_scalar_helpers():
    rng = np.random.default_rng(1)
    f = pd.DataFrame({"k": np.repeat(list("abcd"), 5), "x": rng.normal(0.3, 1, 20)})
    f.loc[f["k"] == "d", "x"] = 2.0  # constant group
    g = stats.grouped_t(f, ["k"], "x", 0.9).set_index("k")
    for k, x in f.groupby("k")["x"]:
        m, lo, hi = stats.t_interval(x.to_numpy(), 0.9)
        assert (g.loc[k, "mean"], g.loc[k, "lo"], g.loc[k, "hi"]) == pytest.approx((m, lo, hi))
    assert g.loc["a", "p"] == pytest.approx(2 * stats.one_sample_p(f.loc[f.k == "a", "x"], "greater")
                                            if f.loc[f.k == "a", "x"].mean() > 0
                                            else 2 * (1 - stats.one_sample_p(f.loc[f.k == "a", "x"], "greater")))
    assert g.loc["d", "p"] == 0.0 and g.loc["d", "lo"] == g.loc["d", "hi"] == 2.0


def test_hydra_slope_of_result(setup):
    """The slope of the per-component mean TE on mean DE lost, and its 95% interval, written out (least squares
    with the Student-t interval of the slope), not through stats.hydra_slope."""
    from scipy import stats as sps

    _, _, sr, _ = setup
    out = hg.hydra_slope(sr)
    means = sr.to_frame().groupby("component")[["total_effect", "de_lost"]].mean()
    x, y = means["de_lost"].to_numpy(), means["total_effect"].to_numpy()
    sxx = ((x - x.mean()) ** 2).sum()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / sxx
    resid = y - y.mean() - slope * (x - x.mean())
    half = sps.t.ppf(0.975, len(x) - 2) * np.sqrt((resid ** 2).sum() / (len(x) - 2) / sxx)
    assert out["slope"] == pytest.approx(slope, rel=1e-9) and out["n"] == 12
    assert (out["slope_lo"], out["slope_hi"]) == pytest.approx((slope - half, slope + half), rel=1e-9)
    assert out["intercept"] == pytest.approx(y.mean() - slope * x.mean(), rel=1e-9, abs=1e-12)
    assert out["r2"] == pytest.approx(1 - (resid ** 2).sum() / ((y - y.mean()) ** 2).sum(), rel=1e-9)
    assert out["level"] == 0.95
    assert hp.hydra_slope is hg.hydra_slope


def test_hydra_slope_known_answers():
    x = np.array([0.1, 0.4, 0.5, 0.9, 1.3, 2.0])
    # an exact line: slope, intercept and R^2 exact, an interval of zero width
    h = stats.hydra_slope(0.6 * x + 0.2, x)
    assert h["slope"] == pytest.approx(0.6, abs=1e-12) and h["intercept"] == pytest.approx(0.2, abs=1e-12)
    assert h["r2"] == pytest.approx(1.0) and h["n"] == 6
    assert h["slope_hi"] - h["slope_lo"] == pytest.approx(0, abs=1e-9)
    # known noise: the interval covers the true slope at its nominal rate and narrows like 1/sqrt(n)
    rng = np.random.default_rng(0)
    cover, widths = 0, {}
    for n in (10, 160):
        w = []
        for _ in range(200):
            xs = rng.uniform(0, 2, n)
            h = stats.hydra_slope(0.6 * xs + 0.2 + rng.normal(0, 0.1, n), xs)
            cover += n == 10 and h["slope_lo"] <= 0.6 <= h["slope_hi"]
            w.append(h["slope_hi"] - h["slope_lo"])
        widths[n] = np.mean(w)
    assert 0.90 <= cover / 200 <= 0.99
    # sqrt(160 / 10) = 4 times narrower, times t(0.975; 8) / t(0.975; 158) = 1.17 for the smaller sample
    assert widths[10] / widths[160] == pytest.approx(4 * 2.306 / 1.975, rel=0.1)
    # undefined: fewer than three components, or no spread in DE lost
    for y, xx in (([1.0, 2.0], [1.0, 2.0]), ([1.0, 2.0, 3.0], [0.5, 0.5, 0.5])):
        h = stats.hydra_slope(y, xx)
        assert math.isnan(h["slope"]) and math.isnan(h["slope_lo"]) and h["n"] == len(y)


# ------------------------------------------------------------------ exports
def test_exports_round_trip(setup, tmp_path):
    _, _, _, G = setup
    paths = hg.save_graph(G, tmp_path / "out")
    assert sorted(paths) == ["gexf", "graphml", "json"] and all(p.exists() for p in paths.values())
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic writes leave no temporaries

    def same(H, graph_attrs=True):
        assert nx.utils.graphs_equal(G, H) if graph_attrs else set(G.edges) == set(H.edges)
        assert dict(G.nodes(data=True)) == dict(H.nodes(data=True))
        assert _edges(G) == _edges(H)
        if graph_attrs:
            assert G.graph == H.graph

    for _fmt, p in paths.items():
        H = hg.load_graph(p)
        assert isinstance(H, nx.DiGraph)
        same(H)
    # plain networkx readers give the same graph (modulo the readers' own additions)
    H = nx.read_graphml(paths["graphml"])
    assert H.graph.pop("node_default") == {} and H.graph.pop("edge_default") == {}
    same(H)
    import json

    same(nx.node_link_graph(json.loads(paths["json"].read_text()), edges="edges"))
    H = nx.read_gexf(paths["gexf"])
    for n, d in H.nodes(data=True):
        assert d.pop("label") == n
    for *_, d in H.edges(data=True):
        d.pop("id")
    same(H, graph_attrs=False)  # networkx's GEXF writer keeps no graph attributes; load_graph restores them

    one = hg.save_graph(G, tmp_path / "single.graphml")
    assert list(one) == ["graphml"] and hg.load_graph(one["graphml"]).number_of_edges() == G.number_of_edges()
    with pytest.raises(OptionError):
        hg.save_graph(G, tmp_path / "x", formats=("pickle",))
    bad = G.copy()
    bad.nodes["NORM"]["oops"] = float("nan")
    with pytest.raises(OutputError):
        hg.save_graph(bad, tmp_path / "bad")
    with pytest.raises(InputError):
        hg.load_graph(tmp_path / "missing.graphml")


# ------------------------------------------------------------------ drawing
def _synthetic(L: int = 12, H: int = 12, n: int = 3, seed: int = 0) -> hp.SelfRepair:
    """A SelfRepair result of the right shape for an L x H model, with random numbers."""
    rng = np.random.default_rng(seed)
    heads = [(l, h) for l in range(L) for h in range(H)]
    main, con = [], []
    for l, h in heads:
        c = f"L{l}H{h}"
        down = [f"L{k}H{j}" for k in range(l + 1, L) for j in range(H)] + [f"MLP{k}" for k in range(l, L)] + ["NORM"]
        dl = rng.normal(0.5, 0.2, n)
        delta = rng.normal(0, 0.01, (n, len(down)))
        if rng.random() < 0.1 and len(down) > 1:
            delta[:, rng.integers(len(down) - 1)] += 0.4  # a few strong backups
        te = dl - delta.sum(1)
        main.append(pd.DataFrame({"component": c, "prompt": range(n), "clean_de": dl, "de_lost": dl, "total_effect": te,
                                  "self_repair": dl - te, "norm_term": delta[:, -1], "clean_metric": 3.0,
                                  "ablated_metric": 3.0 - te}))
        con.append(pd.DataFrame({"component": c, "downstream": np.tile(down, n),
                                 "prompt": np.repeat(range(n), len(down)),
                                 "delta_de": delta.reshape(-1)}))
    prov = {"model": f"synthetic-{L}x{H}", "task": "synthetic", "value": "zero", "metric": "logit_diff",
            "scale": "frozen", "n": n, "seed": 0}
    return hp.SelfRepair(pd.concat(main, ignore_index=True), prov, {"contributions": pd.concat(con, ignore_index=True)})


def test_draw_144_heads(tmp_path):
    G = hg.compensation_graph(_synthetic(), threshold=0.015)
    assert G.number_of_edges() > 40
    assert sum(1 for _, d in G.nodes(data=True) if d["kind"] == "head") == 144
    pos = hg.layout(G)
    assert pos["L3H0"] == (3.0, 0.0) and pos["L3H5"] == (3.0, -5.0) and pos["NORM"][0] == 12.0
    mlps = [n for n, d in G.nodes(data=True) if d["kind"] == "mlp"]
    assert mlps and all(pos[n][1] < min(y for k, (x, y) in pos.items() if k.startswith("L")) for n in mlps)
    fig = hg.draw_graph(G, max_nodes=25, max_edges=40)
    ax = fig.axes[0]
    assert 0 < len(ax.texts) <= 25 and len(ax.patches) == 40
    out = tmp_path / "g144.png"
    fig.savefig(out, dpi=40)
    assert out.stat().st_size > 5_000


def test_draw_real_graph(setup, tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    _, _, _, G = setup
    fig = hg.draw_graph(G)
    fig.savefig(tmp_path / "real.png", dpi=60)
    assert (tmp_path / "real.png").stat().st_size > 5_000
    assert matplotlib.get_backend() == backend  # no global backend change
    from matplotlib.figure import Figure

    own = Figure()
    assert hg.draw_graph(G, ax=own.add_subplot(), max_nodes=5) is own  # draws into a given Axes


# ------------------------------------------------------------------ verification
def test_verify_edges_marks_edges(setup):
    m, t, _, G = setup
    res = hg.verify_edges(m, t, G, top=3)
    pos = sorted((d["weight"] for u, v, d in G.edges(data=True) if v != "NORM" and d["weight"] > 0), reverse=True)
    assert res.tested["weight"].tolist() == pytest.approx(pos[:3])
    status = {k: d["verified"] for k, d in _edges(res.graph).items()}
    tested = set(zip(res.tested["source"], res.tested["target"]))
    assert len(tested) == 3
    assert all(status[k] in ("confirmed", "refuted") for k in tested)
    assert all(v == "untested" for k, v in status.items() if k not in tested)
    assert all(d["verified"] == "untested" for *_, d in G.edges(data=True))  # input untouched
    ps = res.paired.summary().set_index(["first", "second"])
    for u, v in tested:
        e = res.graph.edges[u, v]
        assert e["interaction"] == pytest.approx(ps.loc[(u, v), "interaction"])
        assert e["interaction_lo"] <= e["interaction"] <= e["interaction_hi"]
        assert (e["verified"] == "confirmed") == (e["weight"] > 0 and e["interaction_lo"] > 0)
    assert res.paired.provenance["value"] == G.graph["value"] and res.graph.graph["verify_n"] == len(t)
    positive = [v for v, d in G["L0H0"].items() if v != "NORM" and d["weight"] > 0]
    assert hg.compensators_of(res.graph, "L0H0", confirmed_only=False, k=None) == sorted(
        positive, key=lambda v: -G.edges["L0H0", v]["weight"])
    with pytest.raises(OptionError):
        hg.verify_edges(m, t, G, value="zero")   # not the graph's ablation value
    with pytest.raises(ComponentError):
        hg.compensators_of(G, "L9H9")


def test_iterated_ablation_steps(setup):
    m, t, sr, _ = setup
    it = iterated_ablation(m, t, "L0H1", ["L1H0", "L2H3"], value="mean")
    assert isinstance(it, IteratedAblation)
    f = it.to_frame()
    assert f["step"].unique().tolist() == [0, 1, 2] and len(f) == 3 * len(t)
    assert f.groupby("step")["ablated"].first().tolist() == ["L0H1", "L0H1+L1H0", "L0H1+L1H0+L2H3"]
    single = sr.to_frame().query("component == 'L0H1'")
    s0 = f[f.step == 0]
    assert s0["total_effect"].to_numpy() == pytest.approx(single["total_effect"].to_numpy())
    assert s0["target_de_lost"].to_numpy() == pytest.approx(single["de_lost"].to_numpy())
    both = hp.ablate(m, t, [["L0H1", "L1H0"]], value="mean").to_frame()
    assert f[f.step == 1]["total_effect"].to_numpy() == pytest.approx(both["total_effect"].to_numpy(), abs=1e-6)
    s = it.summary()
    assert len(s) == 3 and {"gap", "gap_lo", "gap_hi", "recovered"} <= set(s.columns)
    back = hp.load_result(it.save(__import__("tempfile").mkdtemp() + "/it.json"))
    assert isinstance(back, IteratedAblation) and back.to_frame().shape == f.shape
    with pytest.raises(ComponentError):
        iterated_ablation(m, t, "L0H1", ["L1H0", "L0H1"])


# ------------------------------------------------------------------ the shipped model
HAS_DEFAULT = (DEFAULT_MODEL_DIR / "model.safetensors").exists()


def shipped_model_checks(m, n_prompts: int = 24, n_heads: int = 4, top: int = 6):
    """Graph of the top-DE heads of ``m`` on held-out IOI, verified by paired ablation (zero ablation,
    which is what the shipped model's head dropout trains it to compensate)."""
    t = hp.tasks.ioi(m, n_prompts=n_prompts, names="heldout")
    de = hp.direct_effects(m, t, "heads").summary().sort_values("direct_effect", ascending=False)
    heads = de["component"].head(n_heads).tolist()
    sr = hp.self_repair(m, t, heads, value="zero")
    G = hg.compensation_graph(sr)
    res = hg.verify_edges(m, t, G, top=top)
    return G, res


@pytest.mark.skipif(not HAS_DEFAULT, reason=f"the shipped model is not trained yet ({DEFAULT_MODEL_DIR}/"
                                            "model.safetensors is missing); this test runs once it exists")
def test_shipped_model_compensators_confirmed():
    m = hp.load_default_model()
    G, res = shipped_model_checks(m)
    heads = [n for n, d in G.nodes(data=True) if d.get("ablated")]
    assert any(d["weight"] > 0 and d["weight_lo"] > 0 for u, v, d in G.edges(data=True)
               if u in heads and v != "NORM"), "no compensating downstream component among the top-DE heads"
    assert res.confirmed, f"paired ablation confirmed no edge:\n{res.tested}"
    # every tested edge whose interaction is resolved (interval excludes 0) must have the sign of its weight
    assert len(res.tested) == 6
    for _, r in res.tested.iterrows():
        if r["interaction_lo"] > 0 or r["interaction_hi"] < 0:
            assert math.copysign(1, r["interaction"]) == math.copysign(1, r["weight"]), r.to_dict()
    # the verdicts are written into the returned graph; the interaction splits exactly, and its edge part is
    # the graph's own weight (same prompts, value and scale)
    for _, r in res.tested.iterrows():
        assert res.graph.edges[r["source"], r["target"]]["verified"] == r["verified"]
        parts = r[["interaction_edge", "interaction_reverse", "interaction_others", "interaction_norm"]].sum()
        assert parts == pytest.approx(r["interaction"], abs=1e-5)
        assert r["interaction_edge"] == pytest.approx(r["weight"], abs=1e-6)


@pytest.mark.skipif(not HAS_DEFAULT, reason="the shipped model is not trained yet")
def test_shipped_amplification_edge_is_flipped_by_the_norm():
    """An amplification edge into the last MLP: edge < 0, but the final norm's part of the interaction is larger
    and positive, so the paired interaction has the opposite sign (why only compensation edges are verified)."""
    m = hp.load_default_model()
    t = hp.tasks.ioi(m, n_prompts=24, names="heldout")
    s = hp.interaction_parts(m, t, [("L2H1", "MLP3")], value="zero").summary().iloc[0]
    assert s["edge_hi"] < 0 and s["norm_lo"] > 0 and s["norm"] > -s["edge"]
    assert s["interaction"] == pytest.approx(s[["edge", "reverse", "others", "norm"]].sum(), abs=1e-6)
