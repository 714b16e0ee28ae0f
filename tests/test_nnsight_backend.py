"""The nnsight backend (one trace per run) gives the local backend's numbers."""

from __future__ import annotations

import warnings

import nnsight
import numpy as np
import pandas as pd
import pytest
import tiny
import torch

import hydra_probe as hp
from hydra_probe.models import nnsight_backend


@pytest.fixture
def traces(monkeypatch):
    """Count nnsight traces, so a test knows the nnsight path really ran."""
    calls = [0]
    real = nnsight_backend.run_jobs

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(nnsight_backend, "run_jobs", counted)
    return calls


def _pair(family: str):
    hf = tiny.hf_model(family)
    tok = tiny.tokenizer(bos=family in ("llama", "mistral", "gemma"))
    local = hp.load_model(hf, tokenizer=tok)
    nn = hp.load_model(hf, tokenizer=tok, backend="nnsight")
    return local, nn, tiny.ioi(local, 4)


def _same(a: pd.DataFrame, b: pd.DataFrame, atol: float = 1e-5) -> None:
    assert list(a.columns) == list(b.columns)
    for c in a.columns:
        if a[c].dtype.kind == "f":
            np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), atol=atol, rtol=0, err_msg=c)
        else:
            assert list(a[c]) == list(b[c]), c


def _no_hooks(hf) -> bool:
    return not any(mod._forward_hooks or mod._forward_pre_hooks for mod in hf.modules())


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_every_analysis_agrees_across_backends(family, traces):
    """Ablation, self-repair, activation, path and attribution patching (plain and AtP*) give the local
    backend's numbers on the nnsight backend, on every family; the analyses that trace do trace."""
    local, nn, t = _pair(family)
    comps = ["L0H1", "ATTN1", "MLP2"]
    a = hp.ablate(local, t, comps, "mean").to_frame()
    assert traces[0] == 0
    _same(a, hp.ablate(nn, t, comps, "mean").to_frame())
    assert traces[0] > 0
    _same(hp.self_repair(local, t, comps, "zero").to_frame(), hp.self_repair(nn, t, comps, "zero").to_frame())
    for direction in ("denoise", "noise"):
        _same(hp.activation_patch(local, t, comps + ["RESID1"], direction, per_position=False).to_frame(),
              hp.activation_patch(nn, t, comps + ["RESID1"], direction, per_position=False).to_frame())
        _same(hp.path_patch(local, t, ["L0H1", "MLP0"], [["L2H1", "MLP2"], "logits"], direction).to_frame(),
              hp.path_patch(nn, t, ["L0H1", "MLP0"], [["L2H1", "MLP2"], "logits"], direction).to_frame())
    for method in ("atp", "atp*"):
        _same(hp.attribution_patch(local, t, comps, method=method).to_frame(),
              hp.attribution_patch(nn, t, comps, method=method).to_frame())
    assert _no_hooks(local.hf_model)


@pytest.mark.parametrize("family", ["gpt2"])
def test_backends_agree(family, traces):
    local, nn, t = _pair(family)
    comps = ["L0H1", "ATTN1", "MLP2"]
    n_traces = 0
    for value in ("zero", "mean", "resample"):
        a = hp.ablate(local, t, comps, value).to_frame()
        assert traces[0] == n_traces  # the local backend never traces
        b = hp.ablate(nn, t, comps, value).to_frame()
        assert traces[0] > n_traces
        n_traces = traces[0]
        _same(a, b)
        assert (a.total_effect.abs() > 1e-7).any()
    sa = hp.self_repair(local, t, comps, "mean")
    sb = hp.self_repair(nn, t, comps, "mean")
    _same(sa.to_frame(), sb.to_frame())
    _same(sa.contributions(), sb.contributions())
    for direction in ("denoise", "noise"):
        pa = hp.activation_patch(local, t, ["L1H2", "MLP0", "RESID1", "RESID3"], direction, per_position=False)
        pb = hp.activation_patch(nn, t, ["L1H2", "MLP0", "RESID1", "RESID3"], direction, per_position=False)
        _same(pa.to_frame(), pb.to_frame())
    pa = hp.activation_patch(local, t, ["RESID2"], "denoise", positions=[0, -1], per_position=False)
    pb = hp.activation_patch(nn, t, ["RESID2"], "denoise", positions=[0, -1], per_position=False)
    _same(pa.to_frame(), pb.to_frame())
    assert traces[0] > n_traces
    assert _no_hooks(local.hf_model)


def test_load_from_an_nnsight_language_model(traces):
    hf = tiny.hf_model("gpt2")
    tok = tiny.tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nnsight 0.8 deprecates LanguageModel in favour of TransformersModel
        lm = nnsight.LanguageModel(hf, tokenizer=tok)
    m = hp.load_model(lm)
    assert isinstance(m, hp.HookedModel)
    assert m.hf_model is hf and m.tokenizer is tok and m.family == "GPT-2"
    assert m.nnsight is lm  # the user's LanguageModel is reused, not wrapped again
    mn = hp.load_model(lm, backend="nnsight")
    assert mn.backend == "nnsight" and mn.nnsight is lm
    t = tiny.ioi(m, 4)
    a = hp.ablate(m, t, ["L1H0", "MLP1"], "zero").to_frame()
    assert traces[0] == 0
    b = hp.ablate(mn, t, ["L1H0", "MLP1"], "zero").to_frame()
    assert traces[0] > 0
    _same(a, b)
    # the LanguageModel still works on its own afterwards
    ids = t.batch(t.groups()[0], "clean")
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    with lm.trace(ids):
        out = lm.lm_head.output.save()
    got = out.value if hasattr(out, "value") else out
    torch.testing.assert_close(got, want)


def test_load_from_an_nnsight_transformers_model(traces):
    """nnsight 0.8's replacement for LanguageModel wraps a loaded model too; the nnsight path runs through it."""
    from nnsight.modeling.transformers import TransformersModel

    hf = tiny.hf_model("llama")
    tok = tiny.tokenizer(bos=True)
    tm = TransformersModel(hf, tokenizer=tok, task="text-generation")
    m = hp.load_model(tm, backend="nnsight")
    assert m.nnsight is tm and m.hf_model is hf
    t = tiny.ioi(m, 4)
    got = hp.self_repair(m, t, ["L1H0", "MLP0"], value="mean").to_frame()
    assert traces[0] > 0
    want = hp.self_repair(hp.load_model(hf, tokenizer=tok), t, ["L1H0", "MLP0"], value="mean").to_frame()
    _same(got, want)
