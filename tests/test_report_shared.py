"""The report's analyses share one runner (effects.common.shared_runs): the same numbers as with every analysis
building its own, each unedited run computed once, and every public function alone unchanged."""

from __future__ import annotations

import pandas as pd
import pytest
import tiny
import torch

import hydra_probe as hp
from hydra_probe.effects import common


def _report(m, task, share: bool, reuse: bool = False, **kw):
    """The report with the unedited runs shared or not; ``reuse``: the intervened copies' results too (only these
    may differ, by float rounding, where a single ablation comes from the eager mechanisms sweep)."""
    old = common.SHARE_RUNS, common.REUSE_RESULTS
    common.SHARE_RUNS, common.REUSE_RESULTS = share, reuse
    try:
        return hp.triangulate(m, task, progress=False, **kw)
    finally:
        common.SHARE_RUNS, common.REUSE_RESULTS = old


def _same_report(a, b) -> None:
    """Bit-for-bit the same table, sections, graph tests, Hydra slope and notes."""
    pd.testing.assert_frame_equal(a.to_frame(), b.to_frame(), check_exact=True)
    assert set(a.results) == set(b.results)
    for k, r in a.results.items():
        pd.testing.assert_frame_equal(r.to_frame(), b.results[k].to_frame(), check_exact=True, obj=k)
        if hasattr(r, "contributions"):
            pd.testing.assert_frame_equal(r.contributions(), b.results[k].contributions(), check_exact=True, obj=k)
    pd.testing.assert_frame_equal(a.edges_tested, b.edges_tested, check_exact=True)
    assert a.hydra == pytest.approx(b.hydra, abs=0, rel=0, nan_ok=True)
    assert a.notes == b.notes and a.config == b.config


@pytest.fixture
def count_prefixes(monkeypatch):
    """Every unedited forward the adapter runs: [(prompt ids, attention implementation)]."""
    calls = []

    def patch(m):
        ad = m.adapter
        orig = ad.prefix

        def prefix(ids, *a, **k):
            calls.append((tuple(map(tuple, ids.tolist())), str(getattr(ad.config, "_attn_implementation", None))))
            return orig(ids, *a, **k)

        monkeypatch.setattr(ad, "prefix", prefix)
        return calls

    return patch


@pytest.mark.parametrize("family,kw", [
    ("gpt2", dict(top=2)),
    ("gpt2", dict(top=2, exact="all", value="resample", seed=3, scale="recomputed")),
    ("llama", dict(top=2, value="zero")),
    ("neox", dict(top=2, components="all")),
])
def test_sharing_changes_no_number(family, kw, count_prefixes):
    """With sharing and without: the same report bit for bit (table, every section's frame and contributions, the
    tested edges, the Hydra slope, notes, config); with sharing, no unedited forward runs twice (per prompts and
    attention implementation), where without it they repeat for every analysis."""
    m = tiny.model(family, layers=3, initializer_range=0.3) if family == "gpt2" else tiny.model(family, layers=3)
    task = hp.tasks.ioi(m, 8, corruption="abc", seed=0)
    calls = count_prefixes(m)
    plain = _report(m, task, False, **kw)
    n_plain = len(calls)
    calls.clear()
    shared = _report(m, task, True, **kw)
    _same_report(shared, plain)
    assert len(calls) == len(set(calls)), "an unedited forward ran twice with sharing"
    assert len(calls) < n_plain / 3, (len(calls), n_plain)


def test_shipped_model_report_unchanged_by_sharing():
    m = hp.load_default_model()
    task = hp.tasks.ioi(m, 6, seed=1)
    comps = ["L0H1", "L1H0", "L2H1", "L3H0", "MLP1", "MLP2"]
    kw = dict(components=comps, top=2, iterate=1)
    _same_report(_report(m, task, True, **kw), _report(m, task, False, **kw))


def test_reference_task_value_shares_the_forwards_but_not_the_means():
    """A reference task's mean: the analyses that ablate with it get their own runner (its means), built on the
    same unedited forwards of the task."""
    m = tiny.model("gpt2", layers=2, initializer_range=0.3)
    task = hp.tasks.ioi(m, 6, corruption="abc", seed=0)
    ref = hp.tasks.ioi(m, 10, corruption="abc", seed=5)
    _same_report(_report(m, task, True, value=ref, top=2), _report(m, task, False, value=ref, top=2))
    with common.shared_runs():
        a, _ = common.make_runner(m, task, "logit_diff")
        b, _ = common.make_runner(m, task, "logit_diff", value=ref)
        assert a is not b and a._prefix is b._prefix and b.reference is ref


def test_make_runner_outside_and_inside_a_block():
    """Outside a block every call builds its own runner (each public function works alone, as before); inside, the
    same arguments get the same runner (with the caller's progress), other seeds or metrics their own runner on the
    same unedited forwards, nested blocks the outer one's runners, and the flag off shares nothing."""
    m = tiny.model("gpt2", layers=2)
    task = hp.tasks.ioi(m, 4, seed=0)
    assert common.make_runner(m, task, "logit_diff")[0] is not common.make_runner(m, task, "logit_diff")[0]
    with common.shared_runs():
        a, _ = common.make_runner(m, task, "logit_diff", "mean", progress=False)
        b, _ = common.make_runner(m, task, "logit_diff", progress=True)
        assert a is b and b.progress is True
        c, _ = common.make_runner(m, task, "logit_diff", seed=1)
        d, _ = common.make_runner(m, task, "logit", seed=0)
        assert len({id(a), id(c), id(d)}) == 3 and a._prefix is c._prefix is d._prefix
        assert (c.seed, d.metric.name) == (1, "logit")
        other = hp.tasks.ioi(m, 4, seed=1)
        e, _ = common.make_runner(m, other, "logit_diff")
        assert e is not a and e._prefix is not a._prefix
        with common.shared_runs():
            assert common.make_runner(m, task, "logit_diff")[0] is a
        assert common.make_runner(m, task, "logit_diff")[0] is a  # the inner block left the outer one's cache
        with m.adapter.eager_attention():
            f, _ = common.make_runner(m, task, "logit_diff")
        assert f is not a and f._prefix is not a._prefix  # another attention implementation: its own forwards
    assert common.make_runner(m, task, "logit_diff")[0] is not a
    old, common.SHARE_RUNS = common.SHARE_RUNS, False
    try:
        with common.shared_runs():
            assert common.make_runner(m, task, "logit_diff")[0] is not common.make_runner(m, task, "logit_diff")[0]
    finally:
        common.SHARE_RUNS = old


def test_nnsight_backend_report_unchanged_by_sharing():
    """On the nnsight backend the runner is shared whole (its unedited traces return what was declared, the rest
    is fetched on first use): the same report as without sharing."""
    m = hp.load_model(tiny.hf_model("gpt2", layers=2, initializer_range=0.3), tokenizer=tiny.tokenizer(),
                      backend="nnsight")
    task = hp.tasks.ioi(m, 6, corruption="abc", seed=0)
    _same_report(_report(m, task, True, top=2, iterate=1), _report(m, task, False, top=2, iterate=1))


def _close_report(a, b) -> None:
    """The same verdicts, tested edges and notes; every number equal to float32 rounding."""
    ta, tb = a.to_frame(), b.to_frame()
    pd.testing.assert_frame_equal(ta, tb, check_exact=False, rtol=1e-4, atol=1e-5)
    assert list(ta["verdict"]) == list(tb["verdict"])
    for k, r in a.results.items():
        pd.testing.assert_frame_equal(r.to_frame(), b.results[k].to_frame(), check_exact=False, rtol=1e-4,
                                      atol=1e-5, obj=k)
    pd.testing.assert_frame_equal(a.edges_tested, b.edges_tested, check_exact=False, rtol=1e-4, atol=1e-5)
    assert a.notes == b.notes
    # exact="auto"'s check reads the swept numbers: its shortfalls equal to float32 rounding, the rest exactly
    ca, cb = dict(a.config), dict(b.config)
    xa, xb = ca.pop("exact_check", {}), cb.pop("exact_check", {})
    assert ca == cb and xa.keys() == xb.keys()
    for k in xa:
        assert xa[k]["shortfall"] == pytest.approx(xb[k]["shortfall"], rel=1e-4, abs=1e-5)
        assert (xa[k]["component"], xa[k]["added"]) == (xb[k]["component"], xb[k]["added"])


@pytest.mark.parametrize("family,kw", [
    ("gpt2", dict(top=3, iterate=2)),
    ("llama", dict(top=3, value="zero", exact="all", mechanisms=False)),
])
def test_reused_ablations_change_no_verdict(family, kw, monkeypatch):
    """With the copies' results reused (the default): the paired-ablation confirmations and the iterated ablation
    run no single ablation the self-repair sweep already ran, and the report equals the one without reuse to
    float rounding (a reused single may come from the eager-attention mechanisms sweep)."""
    from hydra_probe.runner import Runner

    m = tiny.model(family, layers=3, initializer_range=0.3) if family == "gpt2" else tiny.model(family, layers=3)
    task = hp.tasks.ioi(m, 8, corruption="abc", seed=0)
    runs: list[tuple] = []
    orig = Runner._run

    def spy(self, source, copies, readout, label, cap, *a, **k):
        if not cap:  # a run that captures sites (the neurons section's) cannot be served from the memo
            runs.extend((source, frozenset(c)) for c in copies if c)
        return orig(self, source, copies, readout, label, cap, *a, **k)

    monkeypatch.setattr(Runner, "_run", spy)
    plain = _report(m, task, True, reuse=False, **kw)
    n_plain = len(runs)
    ablations = [r for r in runs if all(getattr(iv, "value", None) == plain.config["value"] for iv in r[1])]
    runs.clear()
    reused = _report(m, task, True, reuse=True, **kw)
    _close_report(reused, plain)
    assert len(ablations) > len(set(ablations)), "the plain report should repeat some ablation"
    mine = [r for r in runs if all(getattr(iv, "value", None) == plain.config["value"] for iv in r[1])]
    assert len(mine) == len(set(mine)), "an ablation ran twice with reuse"
    assert len(runs) < n_plain


def test_memo_serves_only_what_it_holds():
    """A copy run with captures, or without the readout a later call needs, is run again; deliveries are never
    kept; served results are copies (editing one leaves the memo as it was)."""
    from hydra_probe.components import select
    from hydra_probe.interventions import interventions_for
    from hydra_probe.models.sites import Site

    m = tiny.model("gpt2", layers=2)
    task = hp.tasks.ioi(m, 4, seed=0)
    with common.shared_runs():
        r, _ = common.make_runner(m, task, "logit_diff")
        assert r.memo is not None and r.memo == {}
        c = select(m, ["L0H1"])[0]
        cp = interventions_for([c], "zero", m.head_dim, None)
        a = r.run("clean", [cp])[0]
        assert len(r.memo) == 1 and r.memo[next(iter(r.memo))].proj is None
        b = r.run("clean", [cp], readout=True)[0]  # needs the readout: run again, kept with it
        assert b.proj is not None and r.memo[next(iter(r.memo))].proj is not None
        torch.testing.assert_close(a.metric, b.metric, rtol=0, atol=0)
        served = r.run("clean", [cp])[0]
        served.metric += 1
        assert torch.equal(r.run("clean", [cp])[0].metric, b.metric)
        cap = r.run("clean", [cp], capture={Site(1, "z")})[0]
        assert Site(1, "z") in cap.captures
