"""Attribution patching (AtP and AtP*) as nnsight traces: remote numbers equal the local ones.

The gradient reads and the QK fix's forwards run on the loopback NDIF server (tests/ndif_loopback.py, which
cannot import hydra_probe and runs requests without gradients), or in nnsight's local simulation of a
remote server (``remote="local"``) on tiny models of several families.
"""

from __future__ import annotations

import os
import warnings

import nnsight
import numpy as np
import pytest
import test_remote
import tiny
from test_remote import KEY, _remote, _same

import hydra_probe as hp

# the loopback server, nnsight's configuration pointed at it, the request counter, the shipped model and its task: test_remote's fixtures
server, ndif, requests, local, task = test_remote.server, test_remote.ndif, test_remote.requests, test_remote.local, test_remote.task


def _local_and_simulated(family: str) -> tuple[hp.HookedModel, hp.HookedModel, hp.Task]:
    """A tiny float64 model loaded locally and through nnsight's remote='local' simulation, and a 4-prompt task."""
    hf = tiny.hf_model(family).double()
    tok = tiny.tokenizer(bos=family != "gpt2")
    m = hp.load_model(hf, tokenizer=tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = hp.load_model(hf, tokenizer=tok, backend="nnsight", remote="local")
    return m, r, tiny.ioi(m, 4)


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "gemma2"])
def test_local_simulation_equals_local_on_tiny_families(family):
    """nnsight's remote='local' (serialised, local modules hidden): fused, interleaved and separate q/k/v,
    grouped-query attention (llama, gemma2), post norms and logit soft-capping (gemma2)."""
    m, r, t = _local_and_simulated(family)
    comps = ["L0H1", "L1H0", "MLP0", "ATTN1"]
    for method, direction in (("atp*", "denoise"), ("atp", "noise")):
        a = hp.attribution_patch(m, t, comps, direction, method=method).to_frame()
        b = hp.attribution_patch(r, t, comps, direction, method=method).to_frame()
        _same(a, b, atol=1e-9)
        assert (a.estimate.abs() > 1e-6).any()
    if family == "llama":  # metrics that are not linear in the logits go out as their gradient at the logits
        for metric in ("logprob", "kl"):
            a = hp.attribution_patch(m, t, comps, "denoise", metric=metric).to_frame()
            _same(a, hp.attribution_patch(r, t, comps, "denoise", metric=metric).to_frame(), atol=1e-9)
            assert (a.estimate.abs() > 1e-6).any()
    if family == "gpt2":  # a token budget of two copies: reads and changes go out in several chunks
        r.token_budget = lambda: 2 * max(len(idx) * len(t.clean_ids[idx[0]]) for idx in t.groups())
        b = hp.attribution_patch(r, t, comps, "denoise", method="atp*").to_frame()
        _same(hp.attribution_patch(m, t, comps, "denoise", method="atp*").to_frame(), b, atol=1e-9)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ablation_estimate_in_local_simulation_equals_local(family):
    """attribution_ablate as traces: the replacements (zeros, the reference mean from the server's sums,
    resampled clean activations) formed from fetched captures, the QK fix of their changes as QK jobs."""
    m, r, t = _local_and_simulated(family)
    comps = ["L0H1", "L1H0", "MLP0", "ATTN1"]
    for value in ("zero", "mean", "resample"):
        a = hp.attribution_ablate(m, t, comps, value=value).to_frame()
        _same(a, hp.attribution_ablate(r, t, comps, value=value).to_frame(), atol=1e-9)
        assert (a.estimate.abs() > 1e-6).any()


def test_remote_atp_equals_local_both_directions(ndif, requests, local, task):
    """Heads, MLPs and per-position residual rows; one request per length group for the gradient reads."""
    m = _remote()
    comps = [c.name for c in local.components("heads") + local.components("mlps")]
    groups = len(task.groups())
    for direction in ("denoise", "noise"):
        a = hp.attribution_patch(local, task, comps, direction).to_frame()
        requests[0] = 0
        b = hp.attribution_patch(m, task, comps, direction).to_frame()
        _same(a, b)
        assert (a.estimate.abs() > 1e-3).sum() > len(comps)  # real estimates, not zeros on both sides
        # per group: one request for the clean and corrupted runs, one for every gradient read of the group; and
        # one for all groups bringing the other run's activations at the read sites (the unedited runs return
        # only what is read, and the gradient reads that ran first read none of them)
        assert requests[0] == 2 * groups + 1
    a = hp.attribution_patch(local, task, ["RESID1", "RESID3", "L2H1"], "denoise").to_frame()
    b = hp.attribution_patch(m, task, ["RESID1", "RESID3", "L2H1"], "denoise").to_frame()
    assert "position" in b.columns and b.position.nunique() > 1
    _same(a, b)


def test_remote_atp_star_equals_local(ndif, requests, monkeypatch, local, task):
    """AtP* (GradDrop reads stacked in one request, the QK fix's forwards for all components in one more);
    only the read sites' activations (first copy) and gradients, and the heads' output changes, come back."""
    grad_jobs = test_remote.record_jobs(monkeypatch, "run_gradient_jobs", tag=True)
    qk_jobs = test_remote.record_jobs(monkeypatch, "run_qk_jobs", tag=True)
    m = _remote()
    comps = ["L0H1", "L0H5", "L1H2", "L2H1", "ATTN1", "MLP0", "MLP2", "L3H0"]
    a = hp.attribution_patch(local, task, comps, "denoise", method="atp*").to_frame()
    requests[0] = 0
    b = hp.attribution_patch(m, task, comps, "denoise", method="atp*").to_frame()
    _same(a, b)
    # per group: the unedited runs, the gradient reads, the QK fix; for all groups one request for the other run's
    # activations at the read sites and one for the senders' activations (the unedited runs return only what is
    # read; both are read after the first request)
    assert requests[0] == 3 * len(task.groups()) + 2
    seen = grad_jobs + qk_jobs  # (function, job, result)
    names = [n for n, _, _ in seen]
    assert names.count("run_gradient_jobs") == names.count("run_qk_jobs") == len(task.groups())
    for name, job, out in seen:
        B, T = job.ids.shape
        if name == "run_gradient_jobs":
            acts, grads = out
            assert set(acts) == set(grads) == set(job.rows) and job.copies > 1
            assert all(v.shape[:2] == (B, T) for v in acts.values())
            assert all(grads[s].shape[:2] == (len(r), T) for s, r in job.rows.items())
        else:  # per downstream layer the changes that reach it (3 senders in layer 0, 2 in layer 1, 2 in layer 2)
            assert {layer: v.shape[0] for layer, v in out.items()} == {1: 3, 2: 5, 3: 7}
    plain = hp.attribution_patch(local, task, comps, "denoise").to_frame()
    assert np.abs(a.estimate - plain.estimate).max() > 1e-3  # the QK fix and GradDrop changed something
    n = hp.attribution_patch(local, task, comps[:4], "noise", method="atp*", qk_fix=False).to_frame()
    _same(n, hp.attribution_patch(m, task, comps[:4], "noise", method="atp*", qk_fix=False).to_frame())


def test_rejected_or_failed_requests_are_remote_errors(ndif, monkeypatch, task):
    m = _remote()
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    with pytest.raises(hp.RemoteError, match="missing or invalid API key") as e:
        hp.attribution_patch(m, task, ["L1H2"], "denoise")
    assert ndif.url in str(e.value)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", KEY)
    from hydra_probe.models import nnsight_backend

    real = nnsight_backend.concrete_path

    def wrong(model, site):  # a gradient read at a block the server's model does not have
        path, io = real(model, site)
        return path.replace(".h.1.", ".h.17."), io

    m = _remote()
    from hydra_probe.effects.common import make_runner

    runner, _ = make_runner(m, task, "logit_diff")
    runner.prefix(0, "corrupted")  # the unedited runs with the real paths
    monkeypatch.setattr(nnsight_backend, "concrete_path", wrong)
    from hydra_probe.interventions import GradientRead
    from hydra_probe.models.sites import Site

    with pytest.raises(hp.RemoteError, match="rejected or failed the request: .*17"):
        runner.gradients("corrupted", [GradientRead((Site(1, "z"),))])


@pytest.mark.skipif(not os.environ.get("NDIF_API_KEY"), reason="live NDIF check: set NDIF_API_KEY to run it")
def test_live_ndif_attribution():  # pragma: no cover - needs the network and an NDIF key
    """Against the live service (nnsight's configured host): AtP* on a small model it serves equals local."""
    local, remote, t = test_remote.live_models()
    comps = ["L9H6", "L10H0", "MLP9"]
    _same(hp.attribution_patch(local, t, comps, method="atp*").to_frame(),
          hp.attribution_patch(remote, t, comps, method="atp*").to_frame(), atol=1e-2)


def test_runner_qk_fix_as_traces_equals_local():
    """Runner.qk_fix's trace branch against its local engine: changes of several senders and positions, and a
    read that drops a layer at or below a sender (its terms are 0 there)."""
    from hydra_probe.effects.common import make_runner
    from hydra_probe.interventions import GradientRead, SenderChange
    from hydra_probe.models.sites import Site

    hf = tiny.hf_model("llama", layers=4).double()
    tok = tiny.tokenizer(bos=True)
    m = hp.load_model(hf, tokenizer=tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = hp.load_model(hf, tokenizer=tok, backend="nnsight", remote="local")
    t = tiny.ioi(m, 4)
    c = {x.name: x for x in m.components(["L0H1", "L1H2", "MLP0", "ATTN1", "L2H0", "MLP3"])}
    changes = [SenderChange((c["L0H1"],), "clean"), SenderChange((c["MLP0"], c["L1H2"]), "clean", (-1, -2)),
               SenderChange((c["ATTN1"],), "clean", (-1,)), SenderChange((c["L2H0"],), "clean"),
               SenderChange((c["MLP3"],), "clean")]
    zs = tuple(Site(layer, "z") for layer in range(1, 4))
    reads = [GradientRead(zs, None, True), GradientRead(zs, 1, True)]
    got = []
    for model in (m, r):
        runner, _ = make_runner(model, t, "logit_diff")
        got.append(runner.qk_fix("corrupted", changes, runner.gradients("corrupted", reads)))
    a, b = got
    assert a.shape == (2, 5, len(t))
    np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-10, rtol=0)
    assert (a[0, :4].abs().amax(-1) > 1e-8).all() and (a[1, 0].abs() > 1e-8).any()
    assert (b[1, 1:4] == 0).all() and (b[:, 4] == 0).all()  # read 1 drops layer 1, at or below their senders;
    # MLP3 has no layer above it
