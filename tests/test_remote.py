"""Remote execution end to end: the nnsight client protocol against a loopback NDIF server (tests/ndif_loopback.py).

The server runs in a subprocess on 127.0.0.1, serves the shipped model from its folder, cannot import
hydra_probe, and executes each request with nnsight's own server-side deserialisation. These tests run in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nnsight
import numpy as np
import pandas as pd
import pytest

import hydra_probe as hp
from hydra_probe.zoo import DEFAULT_MODEL_DIR

try:  # the loopback server's only dependency (in the test extra): CI must run these tests, never skip them
    import tornado  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("the loopback NDIF server needs tornado (pip install '.[test]')", allow_module_level=True)

SERVER = Path(__file__).with_name("ndif_loopback.py")


class Loopback:
    """The loopback server as a subprocess; stops when its stdin closes."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen([sys.executable, str(SERVER), "--model", str(DEFAULT_MODEL_DIR), "--idle", "300",
                                      *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        line = ""
        for _ in range(100):  # bounded: anything printed before the port line is skipped
            line = self.proc.stdout.readline()
            if not line or line.startswith("PORT "):
                break
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"the loopback server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


KEY = "sesame"


@pytest.fixture(scope="module")
def server():
    # small results ride the websocket, larger ones are staged for download: both routes run
    s = Loopback("--inline-limit", "20000", "--api-key", KEY)
    yield s
    s.close()


@pytest.fixture
def ndif(server, monkeypatch):
    """Point nnsight's own configuration at the loopback server, as a user sets NDIF_HOST and NDIF_API_KEY."""
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", server.url)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", KEY)
    monkeypatch.setattr(nnsight.CONFIG.APP, "REMOTE_LOGGING", False)
    return server


@pytest.fixture
def requests(monkeypatch):
    """Count requests sent by nnsight's remote backend."""
    from nnsight.intervention.backends import remote

    calls = [0]
    real = remote.RemoteBackend.request

    def counted(self, *a, **k):
        calls[0] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(remote.RemoteBackend, "request", counted)
    return calls


@pytest.fixture(scope="module")
def local():
    return hp.load_default_model()


@pytest.fixture(scope="module")
def task(local):
    return hp.tasks.ioi(local, n_prompts=6, seed=1)


def _remote(remote=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hp.load_default_model(backend="nnsight", remote=remote)


def _same(a: pd.DataFrame, b: pd.DataFrame, atol: float = 1e-5, rtol: float = 0.0) -> None:
    """Equal columns: floats within ``atol`` (+ ``rtol`` relative), everything else exactly."""
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b) > 0
    for c in a.columns:
        if a[c].dtype.kind == "f":
            np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), atol=atol, rtol=rtol, err_msg=c)
        else:
            assert list(a[c]) == list(b[c]), c


def record_jobs(monkeypatch, name: str, tag: bool = False) -> list[tuple]:
    """Spy on ``nnsight_backend.<name>`` (a function of (model, jobs) returning one result per job): the returned
    list fills with (job, result) pairs, or (name, job, result) with ``tag``, as requests are sent."""
    from hydra_probe.models import nnsight_backend

    seen: list[tuple] = []
    real = getattr(nnsight_backend, name)

    def spy(model, jobs):
        out = real(model, jobs)
        seen.extend(((name, j, o) if tag else (j, o)) for j, o in zip(jobs, out))
        return out

    monkeypatch.setattr(nnsight_backend, name, spy)
    return seen


def test_remote_equals_local(ndif, requests, local, task):
    m = _remote()
    assert m.remote is True and m.backend == "nnsight"
    heads = local.components("heads")
    a = hp.ablate(local, task, "heads", "mean").to_frame()
    b = hp.ablate(m, task, "heads", "mean").to_frame()
    _same(a, b)
    assert (a.total_effect.abs() > 1e-4).any()
    # batched: per group of equal-length prompts one request for the clean and corrupted runs together, and one
    # per chunk of copies (all heads fit one chunk here), never one per component
    n_groups = len(task.groups())
    assert requests[0] == 2 * n_groups < len(heads)
    sa = hp.self_repair(local, task, ["L2H1", "L3H0", "MLP2"], "resample")
    sb = hp.self_repair(m, task, ["L2H1", "L3H0", "MLP2"], "resample")
    _same(sa.to_frame(), sb.to_frame())
    _same(sa.contributions(), sb.contributions())
    _same(hp.direct_effects(local, task).to_frame(), hp.direct_effects(m, task).to_frame())
    pa = hp.activation_patch(local, task, ["L2H1", "MLP0", "RESID2", "RESID4"], "denoise", per_position=False)
    pb = hp.activation_patch(m, task, ["L2H1", "MLP0", "RESID2", "RESID4"], "denoise", per_position=False)
    _same(pa.to_frame(), pb.to_frame())


def test_more_analyses_remote_equal_local(ndif, local, task):
    m = _remote()
    _same(hp.paired_ablation(local, task, [("L2H1", "L3H0")]).to_frame(),
          hp.paired_ablation(m, task, [("L2H1", "L3H0")]).to_frame())
    _same(hp.neuron_contributions(local, task, "L2H1", "MLP3").to_frame(),
          hp.neuron_contributions(m, task, "L2H1", "MLP3").to_frame())
    texts = ["When Mary and John went to the store, John gave a drink to Mary"] * 3
    _same(hp.text_self_repair(local, texts, ["L2H1"]).to_frame(), hp.text_self_repair(m, texts, ["L2H1"]).to_frame())


def test_only_the_last_position_comes_back(ndif, monkeypatch, local, task):
    """A sweep's request keeps last-position activations only, not whole (B, T, d) tensors."""
    seen = record_jobs(monkeypatch, "run_jobs")
    hp.self_repair(_remote(), task, ["L1H0", "L1H1"], "zero")
    sweeps = [(j, o) for j, o in seen if j.edits]
    assert sweeps
    for job, out in sweeps:
        assert set(job.keep.values()) == {"last"} and job.copies == 2
        for v in out.values():
            assert v.shape[:1] == (job.copies * job.ids.shape[0],) and v.dim() == 2
    # what goes out is small too: a mean ships once per site and head (one row, broadcast on the server)
    seen.clear()
    hp.ablate(_remote(), task, "heads", "mean")
    specs = [spec for job, _ in seen for sp in job.edits.values() for spec in sp]
    assert len(specs) == len(task.groups()) * 32
    assert all(val.shape[0] == 1 and val.shape[-1] == 16 for *_, val in specs)  # 1 row, one head's columns
    assert len({id(val) for *_, val in specs}) == len(specs)  # one value per (site, head), none repeated


def test_local_simulation_equals_local(local, task):
    """nnsight's remote='local' serialises each request and runs it with local modules hidden."""
    m = _remote("local")
    _same(hp.ablate(local, task, ["L0H1", "ATTN1", "MLP3"], "resample").to_frame(),
          hp.ablate(m, task, ["L0H1", "ATTN1", "MLP3"], "resample").to_frame())
    _same(hp.self_repair(local, task, ["L2H3"], "mean").to_frame(), hp.self_repair(m, task, ["L2H3"], "mean").to_frame())


def test_host_url_passed_directly_and_uncompressed(ndif, monkeypatch, local, task):
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", "http://127.0.0.1:9")  # not used: the URL given wins
    monkeypatch.setattr(nnsight.CONFIG.API, "COMPRESS", False)  # payload and result sent without zstd
    m = _remote(ndif.url + "/")
    assert m.remote == ndif.url
    _same(hp.ablate(local, task, ["L1H2"], "zero").to_frame(), hp.ablate(m, task, ["L1H2"], "zero").to_frame())


def test_loopback_speaks_the_non_blocking_protocol(ndif, local):
    """nnsight's non-blocking mode: POST without a websocket, then poll GET /response/{id} and download."""
    lm = _remote().nnsight
    from nnsight.modeling import huggingface

    huggingface._ID_CACHE.setdefault(lm.repo_id, lm.repo_id)
    ids = local.tokenizer(["When Mary and John went to the store"], return_tensors="pt").input_ids
    with lm.trace(ids, remote=True, blocking=False) as tracer:
        out = lm.lm_head.output[:, -1].save()  # noqa: F841 - returned through the poll
    backend = tracer.backend
    assert backend.job_id
    result = None
    for _ in range(200):  # bounded: about 20 s
        result = backend()
        if result is not None:
            break
        time.sleep(0.1)
    assert result is not None and "out" in result
    import torch

    with torch.no_grad():
        want = local.hf_model(ids).logits[:, -1]
    torch.testing.assert_close(result["out"], want, atol=1e-5, rtol=0)


def test_rejected_request_carries_the_servers_message(ndif, monkeypatch, task, tmp_path):
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    m = _remote()
    out = tmp_path / "ablation.json"
    with pytest.raises(hp.RemoteError, match="missing or invalid API key") as e:
        hp.ablate(m, task, ["L1H2"], "zero").save(out)
    assert ndif.url in str(e.value)
    assert not out.exists()
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", KEY)
    assert len(hp.ablate(m, task, ["L1H2"], "zero").to_frame()) == len(task)


def test_a_request_failing_on_the_server_carries_its_message(ndif, monkeypatch, task):
    """An error raised while the server runs the request (here: a block that does not exist) comes back."""
    from hydra_probe.models import nnsight_backend

    real = nnsight_backend.concrete_path

    def wrong(model, site):
        path, io = real(model, site)
        return path.replace(".h.1.", ".h.17."), io

    monkeypatch.setattr(nnsight_backend, "concrete_path", wrong)
    with pytest.raises(hp.RemoteError, match="rejected or failed the request: .*17") as e:
        hp.ablate(_remote(), task, ["L1H2"], "zero")
    assert ndif.url in str(e.value)


def test_model_not_served_is_rejected(ndif, task, tmp_path):
    import transformers as tf

    other = tmp_path / "other"
    hf = tf.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    hf.save_pretrained(other)
    tf.AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR).save_pretrained(other)
    m = hp.load_model(str(other), backend="nnsight", remote=True)
    with pytest.raises(hp.RemoteError, match="is not served here"):
        hp.ablate(m, task, ["L1H2"], "zero")


def test_unreachable_host_fails_fast_naming_it(monkeypatch, task):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    host = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", host)
    monkeypatch.setattr(nnsight.CONFIG.APP, "REMOTE_LOGGING", False)
    m = _remote()
    t0 = time.monotonic()
    with pytest.raises(hp.RemoteError, match="cannot be reached") as e:
        hp.ablate(m, task, ["L1H2"], "zero")
    assert host in str(e.value)
    assert time.monotonic() - t0 < 10
    with pytest.raises(hp.RemoteError, match=r"https://ndif\.invalid cannot be reached"):  # a name that never resolves
        hp.ablate(_remote("https://ndif.invalid"), task, ["L1H2"], "zero")


def test_bad_remote_settings_fail_before_work(monkeypatch):
    with pytest.raises(hp.OptionError, match="backend='nnsight'"):
        hp.load_default_model(remote=True)
    with pytest.raises(hp.OptionError, match="backend='nnsight'"):
        hp.load_model("default", remote="local")
    with pytest.raises(hp.OptionError, match="not a URL"):
        hp.load_model("default", backend="nnsight", remote="api.ndif.us")
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", "ndif.example")
    with pytest.raises(hp.OptionError, match="NDIF_HOST"):
        hp.load_default_model(backend="nnsight", remote=True)
    with pytest.raises(hp.OptionError, match="remote must be"):
        hp.load_default_model(backend="nnsight", remote=1)


def test_a_client_without_weights_is_refused_clearly():
    """A LanguageModel built from a name without loading weights (meta device) cannot be read here: said at once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers as tf

        lm = nnsight.LanguageModel(str(DEFAULT_MODEL_DIR), tokenizer=tf.AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR))
    assert next(lm._module.parameters()).device.type == "meta"
    with pytest.raises(hp.OptionError, match="weights"):
        hp.load_model(lm, backend="nnsight", remote=True)


def live_models():  # pragma: no cover - needs the network
    """For the live checks: (local model, the same model remote, a 4-prompt IOI task) of a small model NDIF serves
    (``HYDRA_PROBE_NDIF_MODEL``, default GPT-2)."""
    import transformers as tf

    name = os.environ.get("HYDRA_PROBE_NDIF_MODEL", "openai-community/gpt2")
    hf = tf.AutoModelForCausalLM.from_pretrained(name)
    tok = tf.AutoTokenizer.from_pretrained(name)
    local = hp.load_model(hf, tokenizer=tok)
    return local, hp.load_model(hf, tokenizer=tok, backend="nnsight", remote=True), hp.tasks.ioi(local, n_prompts=4)


@pytest.mark.skipif(not os.environ.get("NDIF_API_KEY"), reason="live NDIF check: set NDIF_API_KEY to run it")
def test_live_ndif():  # pragma: no cover - needs the network and an NDIF key
    """Against the live service (nnsight's configured host): a small model it serves, ablations equal local."""
    local, remote, t = live_models()
    _same(hp.ablate(local, t, ["L9H6", "L10H0"], "mean").to_frame(),
          hp.ablate(remote, t, ["L9H6", "L10H0"], "mean").to_frame(), atol=1e-3)
