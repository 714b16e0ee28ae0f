"""Remote, part 2: only what is needed comes back, repair_mechanisms and the triangulation report through the
loopback NDIF server (tests/ndif_loopback.py, which serves the shipped model with its default attention
implementation and cannot import hydra_probe), equal to the local numbers."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import test_remote
import tiny
import torch

import hydra_probe as hp
from hydra_probe.effects import common
from hydra_probe.models.sites import Site

# the loopback server, nnsight's configuration pointed at it, the shipped model and its task: test_remote's fixtures
server, ndif, local, task = test_remote.server, test_remote.ndif, test_remote.local, test_remote.task


@pytest.fixture
def spy(monkeypatch):
    """Every nnsight job sent and what came back: [(job, {site: value})]."""
    return test_remote.record_jobs(monkeypatch, "run_jobs")


def _remote():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hp.load_default_model(backend="nnsight", remote=True)


def _same(a: pd.DataFrame, b: pd.DataFrame, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Equal columns; floats to float32 rounding (the server's attention kernel is not the client's)."""
    test_remote._same(a, b, atol, rtol)


def _nbytes(out: dict) -> int:
    vals = [x for v in out.values() for x in (v if isinstance(v, tuple) else (v,))]
    return sum(x.numel() * x.element_size() for x in vals)


# ---------------------------------------------------------------- 1. only what is needed comes back
def test_unedited_runs_return_only_what_is_read(ndif, spy, local, task):
    """The clean/corrupted request returns the sites the analysis reads (the last position where that suffices,
    per-position sums over the batch for means), not every z, MLP output and residual at every position; the
    numbers are unchanged."""
    m = _remote()
    L, d = local.n_layers, local.d_model
    big = hp.tasks.ioi(local, n_prompts=16, seed=1)  # one group of 10 prompts of one length, three of 2
    heads = ["L0H1", "L1H0", "L2H1", "L3H0"]
    _same(hp.ablate(local, big, heads, "mean").to_frame(), hp.ablate(m, big, heads, "mean").to_frame())
    pre = [(j, o) for j, o in spy if not j.edits]
    assert len(pre) == 2 * len(big.groups())  # one request per group (clean and corrupted traces)
    for j, o in pre:
        B, T = j.ids.shape
        full = (3 * L + 1) * B * T * d * 4  # every z, MLP output and block input at every position (float32)
        assert 0 < _nbytes(o) <= (full / 7 if B == 10 else full), (B, _nbytes(o), full)
        # the final residual's last position (the metric) and, of the clean run, the z and MLP output sums the
        # means need (per position, over the batch: float64 (T, d)); where a sum would be larger than the
        # activations themselves (2 prompts) those come back instead
        modes = {s.kind: mode for s, mode in j.keep.items()}
        assert j.keep[Site(L, "resid_pre")] == "last"
        assert set(modes.values()) <= {"last", "sum" if B == 10 else "all"}
        assert set(modes) <= {"resid_pre", "z", "mlp_out"}
        assert sum(s.kind == "resid_pre" for s in j.keep) == 1

    spy.clear()
    sa = hp.self_repair(local, task, ["L2H1", "MLP2"], "resample")
    sb = hp.self_repair(m, task, ["L2H1", "MLP2"], "resample")
    _same(sa.to_frame(), sb.to_frame())
    _same(sa.contributions(), sb.contributions())
    every = {(s, j.ids.shape[0]) for j, _ in spy if not j.edits for s, mode in j.keep.items() if mode == "all"}
    assert {s for s, _ in every} == {Site(2, "z"), Site(2, "mlp_out")}  # only the donors' sites at every position

    spy.clear()
    pa = hp.activation_patch(local, task, ["L2H1", "MLP0", "RESID2"], "denoise", per_position=False)
    pb = hp.activation_patch(m, task, ["L2H1", "MLP0", "RESID2"], "denoise", per_position=False)
    _same(pa.to_frame(), pb.to_frame())
    allsites = {s for j, _ in spy if not j.edits for s, mode in j.keep.items() if mode == "all"}
    assert allsites == {Site(2, "z"), Site(0, "mlp_out"), Site(2, "resid_pre")}


def test_more_is_fetched_lazily_with_the_same_numbers(ndif, spy, local, task):
    """A later read of what the first request did not bring costs one more request and equals the local forward."""
    from hydra_probe.runner.runner import RemotePrefix

    m = _remote()
    r, _ = hp.effects.common.make_runner(m, task, "logit_diff", "zero")
    rl, _ = hp.effects.common.make_runner(local, task, "logit_diff", "zero")
    r.baseline("clean")
    n = len(spy)
    assert n == 2 * len(task.groups())  # jobs: a clean and a corrupted trace per group, one request each
    p, q = r.prefix(0, "clean"), rl.prefix(0, "clean")
    assert isinstance(p, RemotePrefix) and (Site(1, "z"), "all") not in p.got
    torch.testing.assert_close(p.captures[Site(1, "z")], q.captures[Site(1, "z")], atol=1e-5, rtol=0)
    assert len(spy) == n + 1  # the miss brought every z and MLP output at once (one trace, one request)
    torch.testing.assert_close(p.captures[Site(3, "mlp_out")], q.captures[Site(3, "mlp_out")], atol=1e-5, rtol=0)
    torch.testing.assert_close(p.resid[2], q.resid[2], atol=1e-5, rtol=0)
    assert len(spy) == n + 2
    torch.testing.assert_close(p.last(Site(1, "z")), q.captures[Site(1, "z")][:, -1], atol=1e-5, rtol=0)
    assert len(spy) == n + 2


def test_means_over_a_reference_task_come_back_as_sums(ndif, spy, local, task):
    ref = hp.tasks.ioi(local, n_prompts=8, seed=5)
    _same(hp.ablate(local, task, ["L1H0", "MLP1"], ref).to_frame(), hp.ablate(_remote(), task, ["L1H0", "MLP1"], ref)
          .to_frame())
    sums = [j for j, _ in spy if not j.edits and set(j.keep.values()) == {"sum"}]
    assert len(sums) == len(ref.groups()) and {s for j in sums for s in j.keep} == {Site(1, "z"), Site(1, "mlp_out")}


# ---------------------------------------------------------------- 2. repair_mechanisms remote
def test_repair_mechanisms_remote_equals_local(ndif, spy, local, task):
    """The server runs its own attention implementation (not eager); the values and last-query weights are
    computed in the trace from the attention call's inputs, the split on the client: the local amounts."""
    m = _remote()
    comps = ["L0H1", "L1H3", "MLP1"]
    a = hp.repair_mechanisms(local, task, comps, value="mean", order="symmetric")  # reads weights and values
    b = hp.repair_mechanisms(m, task, comps, value="mean", order="symmetric")
    _same(a.to_frame(), b.to_frame())
    _same(a.self_repair_frame(), b.self_repair_frame())
    f = b.to_frame()
    assert (f[f.mechanism == "pattern"].amount.abs() > 1e-4).any() and (f[f.mechanism == "values"].amount.abs()
                                                                        > 1e-4).any()
    reads = {s.kind for j, _ in spy for s in j.keep}
    assert {"attn_last", "values"} <= reads  # read in the traces, not by local hooks
    sa, sb = hp.layer_regression(a).shares(), hp.layer_regression(b).shares()
    assert list(sa["mechanism"]) == list(sb["mechanism"])
    # bootstrap ratios over resampled prompts with small denominators magnify 1e-7 differences: relative check
    np.testing.assert_allclose(sa[["share", "share_lo", "share_hi"]], sb[["share", "share_lo", "share_hi"]],
                               rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "phi3", "qwen3"])
def test_mechanism_reads_in_the_trace_equal_eager_on_other_families(family):
    """Soft-capped and sliding-window attention (Gemma-2), fused grouped-query q/k/v (Phi-3), q/k norms and rotary
    embeddings (Qwen3): the trace's weights and values give the local amounts."""
    hf = tiny.hf_model(family).double()
    tok = tiny.tokenizer(bos=True)
    a = hp.load_model(hf, tokenizer=tok)
    b = hp.load_model(hf, tokenizer=tok, backend="nnsight")
    t = tiny.ioi(a, 4)
    fa = hp.repair_mechanisms(a, t, ["L0H1", "MLP0"], order="symmetric").to_frame()
    fb = hp.repair_mechanisms(b, t, ["L0H1", "MLP0"], order="symmetric").to_frame()
    assert list(fa["downstream"]) == list(fb["downstream"])
    np.testing.assert_allclose(fa["amount"], fb["amount"], atol=1e-9, rtol=0)


def test_repair_mechanisms_in_nnsights_local_simulation(local):
    """remote='local': each request serialised and run with local modules hidden, as a server would."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = hp.load_default_model(backend="nnsight", remote="local")
    t = hp.tasks.ioi(local, n_prompts=4, seed=1)
    _same(hp.repair_mechanisms(local, t, ["L1H0"], order="symmetric").to_frame(),
          hp.repair_mechanisms(m, t, ["L1H0"], order="symmetric").to_frame())


def test_a_family_without_an_attention_call_is_refused_before_any_request(ndif, spy, monkeypatch, task):
    m = _remote()
    attn = m.nnsight.transformer.h[1].attn
    monkeypatch.setattr(type(attn), "source", property(lambda self: (_ for _ in ()).throw(ValueError("no source"))))
    with pytest.raises(hp.ArchitectureError, match="attention_interface"):
        hp.repair_mechanisms(m, task, ["L0H1"])
    assert spy == []


# ---------------------------------------------------------------- 3. the triangulation report remote
COMPS = ["L1H0", "L2H1", "MLP1"]


def test_report_remote_equals_local(ndif, spy, local):
    """triangulate through the loopback server: every section runs there (no local forward of the client's
    model), and the report's table (verdicts, numbers within 1e-5) and each section's frame equal the local ones."""
    task = hp.tasks.ioi(local, n_prompts=4, seed=1)
    kw = dict(components=COMPS, top=2, iterate=1, progress=False)
    # the local reference without reused ablations: the remote path runs every copy afresh (with reuse a single
    # ablation comes from the eager-attention mechanisms sweep, equal to float32 rounding, ~1e-5 here)
    old, common.REUSE_RESULTS = common.REUSE_RESULTS, False
    try:
        a = hp.triangulate(local, task, **kw)
    finally:
        common.REUSE_RESULTS = old
    m = _remote()
    forwards = []
    # a local forward of the client's model would fire it (read-only: the analyses accept it)
    hook = m.hf_model.register_forward_hook(hp.checks.read_only(lambda *_: forwards.append(1)))
    try:
        b = hp.triangulate(m, task, **kw)
    finally:
        hook.remove()
    assert forwards == []
    assert "repair_mechanisms" in b.results and not any("why it repairs" in n for n in b.notes)
    ta, tb = a.to_frame(), b.to_frame()
    assert list(ta["component"]) == list(tb["component"])
    assert list(ta["verdict"]) == list(tb["verdict"])
    for c in ta.columns:
        if ta[c].dtype.kind == "f":
            np.testing.assert_allclose(ta[c].to_numpy(), tb[c].to_numpy(), atol=1e-5, rtol=0, err_msg=c)
        else:
            assert list(map(str, ta[c])) == list(map(str, tb[c])), c
    assert set(a.results) == set(b.results)
    # the local runs unembed the answer's and the alternative's columns alone (Adapter.logits_at), the server
    # the whole vocabulary: another float32 summation order (logits up to 16, a few ulps of each logit;
    # the interaction, a sum of three total effects, differs by up to ~1.2e-5)
    for k in a.results:
        _same(a.results[k].to_frame(), b.results[k].to_frame(), atol=3e-5)
    assert a.hydra == pytest.approx(b.hydra, abs=1e-5, nan_ok=True)
    assert a.notes == b.notes
