"""bfloat16 and float16 weights: decompositions accumulate in float64 and close within the stated tolerance."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import tiny
import torch

import hydra_probe as hp


def _cast(family: str, dtype: torch.dtype):
    hf = tiny.hf_model(family, layers=3)
    tok = tiny.tokenizer(bos=family in ("llama", "mistral", "gemma"))
    return hp.load_model(hf, tokenizer=tok), hp.load_model(copy.deepcopy(hf).to(dtype), tokenizer=tok)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_direct_effects_close_to_the_low_precision_metric(family, dtype):
    ref, m = _cast(family, dtype)
    assert m.adapter.dtype == dtype
    t = tiny.ioi(ref, 8)
    d, d32 = hp.direct_effects(m, t), hp.direct_effects(ref, t)
    f, c = d.to_frame(), d.constant.set_index("prompt")
    assert f.direct_effect.dtype == np.float64  # accumulated in float64 whatever the weights
    total = f.groupby("prompt").direct_effect.sum()
    mass = f.assign(a=f.direct_effect.abs()).groupby("prompt").a.sum() + c.constant.abs()
    rtol = torch.finfo(dtype).eps * (8 + m.n_layers)
    # the stated tolerance, recorded in the provenance and per prompt
    assert d.provenance["dtype"] == str(dtype).replace("torch.", "")
    assert d.provenance["closure_rtol"] == pytest.approx(rtol) == m.closure_rtol
    np.testing.assert_allclose(c.closure_tol, rtol * mass, rtol=1e-9)
    assert d.provenance["closure_tol"] == pytest.approx(float(c.closure_tol.max()))
    err = (total + c.constant - c.metric).abs()
    assert (err <= c.closure_tol).all(), (err / c.closure_tol).max()
    # not trivially: the low-precision metric itself is off the float32 one by more than float32's tolerance
    assert (c.metric - d32.constant.metric).abs().max() > d32.provenance["closure_rtol"] * mass.max()
    # and the decomposition agrees with float32's (the weights differ by their rounding only)
    de32 = d32.to_frame().direct_effect.to_numpy()
    tol = (rtol * mass).reindex(f.prompt).to_numpy()
    assert (np.abs(f.direct_effect.to_numpy() - de32) <= tol).all()
    np.testing.assert_array_less(np.abs(c.constant.to_numpy() - d32.constant.constant.to_numpy()),
                                 (rtol * mass).to_numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ablations_and_self_repair_run_and_agree_with_float32(dtype):
    ref, m = _cast("gpt2", dtype)
    t = tiny.ioi(ref, 8)
    comps = ["L0H1", "L1H2", "MLP1"]
    a, a32 = hp.ablate(m, t, comps, "mean").to_frame(), hp.ablate(ref, t, comps, "mean").to_frame()
    scale = a32.clean_metric.abs().max() + a32.total_effect.abs().max()
    tol = torch.finfo(dtype).eps * (8 + m.n_layers) * 4 * scale
    assert np.isfinite(a.total_effect).all()
    np.testing.assert_allclose(a.total_effect, a32.total_effect, atol=tol, rtol=0)
    s, s32 = hp.self_repair(m, t, comps, "mean"), hp.self_repair(ref, t, comps, "mean")
    assert s.provenance["closure_rtol"] == m.closure_rtol
    for col in ("clean_de", "de_lost", "total_effect", "self_repair"):
        np.testing.assert_allclose(s.to_frame()[col], s32.to_frame()[col], atol=tol, rtol=0, err_msg=col)
    json.dumps(s.provenance)  # the recorded tolerance saves with the result


def test_load_in_bfloat16_from_a_folder(tmp_path):
    folder = tmp_path / "m"
    tiny.hf_model("llama", layers=2).save_pretrained(folder)
    tiny.tokenizer(bos=True).save_pretrained(folder)
    m = hp.load_model(str(folder), dtype="bfloat16")
    assert m.adapter.dtype == torch.bfloat16
    assert m.closure_rtol == pytest.approx(torch.finfo(torch.bfloat16).eps * 10)
    t = tiny.ioi(m, 4)
    c = hp.direct_effects(m, t).constant
    assert (c.closure_tol > 0).all()
    assert hp.load_model(str(folder)).closure_rtol < 1e-5  # float32 by default


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])  # sdpa, and Gemma-2's eager attention with its soft cap
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_atp_star_pattern_route_in_half_precision(family, dtype, monkeypatch):
    """AtP*'s QK fix in half precision takes the pattern route (the check of its A V against the base run's z
    passes at that precision) and is as close to the float32 model's estimates as the output route is."""
    from hydra_probe.models.adapter import Adapter
    from hydra_probe.runner import Runner

    f32, half = _cast(family, dtype)
    t = tiny.ioi(f32, 6, seed=3)
    atp = lambda m: hp.attribution_patch(m, t, "heads", "denoise", method="atp*").to_frame()["estimate"].to_numpy()  # noqa: E731
    want = atp(f32)

    monkeypatch.setattr(Runner, "qk_pattern_keys", 64)  # the tiny models' prompts exceed half their head_dim
    routes: list[str] = []
    for name in ("attention_patterns", "attention_patterns_given"):
        real = getattr(Adapter, name)

        def spy(self, *a, _real=real, **k):
            got = _real(self, *a, **k)
            routes.append("pattern" if isinstance(got, tuple) else str(got))
            return got
        monkeypatch.setattr(Adapter, name, spy)
    got = atp(half)
    assert routes and set(routes) == {"pattern"}  # every layer's QK fix read its patterns
    monkeypatch.setattr(Runner, "qk_patterns", False)
    out = atp(half)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1.5 * np.abs(out - want).max() + 1e-3 * scale
    assert np.abs(got - out).max() <= 0.05 * scale
