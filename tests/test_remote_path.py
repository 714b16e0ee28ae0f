"""Path patching remotely: deliveries run as nnsight traces on the loopback NDIF server (and in nnsight's local
simulation) and give the local numbers; one request per chunk of copies, and only the final residual comes back."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import test_remote
import tiny

import hydra_probe as hp
from hydra_probe.models import nnsight_backend
from hydra_probe.models.sites import Site

# the loopback server, nnsight's configuration pointed at it, the request counter (test_remote's fixtures),
# and its frame comparison
server, ndif, requests, _same = test_remote.server, test_remote.ndif, test_remote.requests, test_remote._same


@pytest.fixture
def path_jobs(monkeypatch):
    """Every path-patching trace sent: (job, what came back)."""
    return test_remote.record_jobs(monkeypatch, "run_path_jobs")


def _nnsight(model_or_hf, remote, **kw) -> hp.HookedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model_or_hf is None:
            return hp.load_default_model(backend="nnsight", remote=remote)
        return hp.load_model(model_or_hf, backend="nnsight", remote=remote, **kw)


RECEIVERS = ["logits", ["L3H0", "L2H1"], "MLP3", "all"]


def test_remote_path_patch_equals_local(ndif, requests, path_jobs, monkeypatch):
    local = hp.load_default_model()
    task = hp.tasks.ioi(local, n_prompts=6, seed=1)
    m = _nnsight(None, True)
    n_groups = len(task.groups())

    def local_forward(*a, **k):
        raise AssertionError("a remote model ran a forward here")

    for name in ("prefix", "run_blocks"):  # nothing falls back to the client's copy of the model
        monkeypatch.setattr(m.adapter, name, local_forward)
    for direction in ("noise", "denoise"):
        before = requests[0]
        a = hp.path_patch(local, task, ["L0H1", "MLP0", "ATTN1"], RECEIVERS, direction).to_frame()
        b = hp.path_patch(m, task, ["L0H1", "MLP0", "ATTN1"], RECEIVERS, direction).to_frame()
        _same(a, b)
        reached = a[a.receivers_reached > 0]
        assert (np.abs(reached.patched_metric - reached.baseline_metric) > 1e-3).mean() > 0.5  # not the baseline
        # per group one request for the clean and corrupted runs and ONE for all 9 copies that edit the model
        # (3 senders x 3 receiver sets; the logits-only copies read the cached run and send nothing), and one
        # for all groups bringing the senders' activations (the unedited runs return only what is read, and the
        # baselines that ran first read no sender)
        assert requests[0] - before == 2 * n_groups + 1
    jobs = [j for j, _ in path_jobs]
    assert len(jobs) == 2 * n_groups and {j.copies for j in jobs} == {9}
    # only the last position of the final residual comes back; each sender change ships once per chunk
    L = local.adapter.n_layers
    for job, out in path_jobs:
        assert job.keep == {Site(L, "resid_pre"): "last"}
        assert list(out) == [Site(L, "resid_pre")] and out[Site(L, "resid_pre")].shape == (9 * job.ids.shape[0], 128)
        assert len({id(d) for d in job.deltas}) == len(job.deltas) <= 3 * L
    # one receiver input and the recomputed scale
    _same(hp.path_patch(local, task, ["L1H2", "MLP1"], [["L3H0", "logits"], "L2H3"], "noise", receiver_input="k",
                        scale="recomputed", positions=[-1]).to_frame(),
          hp.path_patch(m, task, ["L1H2", "MLP1"], [["L3H0", "logits"], "L2H3"], "noise", receiver_input="k",
                        scale="recomputed", positions=[-1]).to_frame())


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2", "neox"])
def test_local_simulation_equals_local_across_families(family, path_jobs):
    """nnsight's remote='local' (serialised, local modules hidden) on grouped-query attention (llama: key/value
    groups of two, so a delivery to one head's k/v runs a shadow batch), sandwich norms (gemma2), post norms
    only (olmo2: no pre-norm, the delivered input is the raw residual) and a parallel residual (neox)."""
    hf = tiny.hf_model(family)
    tok = tiny.tokenizer(bos=family == "llama")
    local = hp.load_model(hf, tokenizer=tok)
    m = _nnsight(hf, "local", tokenizer=tok)
    t = tiny.ioi(local, 4)
    for direction in ("noise", "denoise"):
        args = (["L0H1", "MLP0", "ATTN1"], [["L2H1", "MLP2", "logits"], "L1H3", "ATTN2"], direction)
        _same(hp.path_patch(local, t, *args).to_frame(), hp.path_patch(m, t, *args).to_frame())
    shadows = [j for j, _ in path_jobs if j.copies > 9]
    assert bool(shadows) == (local.adapter.n_kv_heads < local.adapter.n_heads)


def test_runner_deliveries_with_captures_and_interventions_remote(ndif, requests):
    """The runner's interface for deliveries (as AtP*'s QK fix uses it): deliveries to some heads' q and k mixed
    with a replacement, and sites captured at every position, on the server equal the local hooks; the copies
    that edit the model go out as one request per group."""
    from hydra_probe.components import select
    from hydra_probe.interventions import Delivery, SenderChange, interventions_for
    from hydra_probe.metrics import get_metric
    from hydra_probe.runner import Runner

    local = hp.load_default_model()
    task = hp.tasks.ioi(local, n_prompts=4, seed=2)
    m = _nnsight(None, True)
    L = local.n_layers
    cap = {Site(2, "z"), Site(3, "mlp_out"), Site(L, "resid_pre")}
    outs = []
    for model in (local, m):
        heads = {c.name: c for c in select(model, "heads")}
        change = SenderChange((heads["L0H1"], heads["L1H2"]), "corrupted")
        copies = [(Delivery(change, "heads", 2, (0, 3), ("q", "k")),),
                  (Delivery(change, "heads", 3, (1,), ("v",)), Delivery(change, "mlp", 3), *interventions_for(
                      select(model, ["L2H2"]), "zero", model.head_dim)),
                  (Delivery(change, "logits", scale="recomputed"),)]
        before = requests[0]
        outs.append(Runner(model, task, get_metric("logit_diff")).run("clean", copies, capture=cap,
                                                                        capture_positions="all"))
    assert requests[0] - before == 2 * len(task.groups())
    for a, b in zip(*outs):
        np.testing.assert_allclose(a.metric.numpy(), b.metric.numpy(), atol=1e-5, rtol=0)
        for s in cap:
            for x, y in zip(a.captures[s], b.captures[s]):
                np.testing.assert_allclose(x.float().numpy(), y.float().numpy(), atol=1e-5, rtol=0, err_msg=str(s))
    assert not np.allclose(outs[0][0].captures[Site(2, "z")][0].numpy(), outs[0][2].captures[Site(2, "z")][0].numpy())


def test_a_path_request_failing_on_the_server_carries_its_message(ndif, monkeypatch):
    """A module the server's model does not have (here: a norm of block 17 of 4) fails there, and its message
    comes back as a package error naming the host; nothing runs locally instead."""
    local = hp.load_default_model()
    task = hp.tasks.ioi(local, n_prompts=4, seed=2)
    real = nnsight_backend.norm_path
    monkeypatch.setattr(nnsight_backend, "norm_path", lambda model, layer, which: real(model, layer, which)
                        .replace(f".{layer}.", ".17."))
    with pytest.raises(hp.RemoteError, match="rejected or failed the request: .*17") as e:
        hp.path_patch(_nnsight(None, True), task, ["L0H1"], ["L3H0"])
    assert ndif.url in str(e.value)
