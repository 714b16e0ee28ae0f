"""The report's analyses share one runner (effects.common.shared_runs): the same numbers as with every analysis
building its own, each unedited run computed once, and every public function alone unchanged."""

from __future__ import annotations

import pandas as pd
import pytest
import tiny

import hydra_probe as hp
from hydra_probe.effects import common


def _report(m, task, share: bool, **kw):
    old = common.SHARE_RUNS
    common.SHARE_RUNS = share
    try:
        return hp.triangulate(m, task, progress=False, **kw)
    finally:
        common.SHARE_RUNS = old


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
