"""GPT-2's ``gelu_new`` runs as PyTorch's fused tanh GELU inside ``HookedModel.evaluating()``: the same function
(equal to float rounding), restored after the block, and the model's own formula with the switch off."""

from __future__ import annotations

import numpy as np
import tiny
import torch

import hydra_probe as hp
from hydra_probe.models.wrapper import HookedModel


def test_fused_gelu_is_gelu_new():
    from transformers.activations import NewGELUActivation

    x = torch.linspace(-8, 8, 10001, dtype=torch.float64)
    np.testing.assert_allclose(torch.nn.functional.gelu(x, approximate="tanh"), NewGELUActivation()(x),
                               rtol=0, atol=1e-14)


def test_sweeps_equal_the_models_own_activation(monkeypatch):
    m = tiny.model64("gpt2")
    t = tiny.ioi(m, 6, seed=1)
    acts = [x for x in m.hf_model.modules() if type(x).__name__ == "NewGELUActivation"]
    assert acts
    seen = []
    with m.evaluating():
        seen = [("forward" in a.__dict__) for a in acts]
        with m.evaluating():  # nested blocks keep the outer swap
            assert all("forward" in a.__dict__ for a in acts)
        assert all("forward" in a.__dict__ for a in acts)
    assert all(seen) and not any("forward" in a.__dict__ for a in acts)  # restored
    fast = hp.self_repair(m, t, "heads", value="mean").to_frame()
    monkeypatch.setattr(HookedModel, "fast_activations", False)
    with m.evaluating():
        assert not any("forward" in a.__dict__ for a in acts)
    plain = hp.self_repair(m, t, "heads", value="mean").to_frame()
    for col in ("total_effect", "de_lost", "self_repair"):
        np.testing.assert_allclose(fast[col], plain[col], rtol=0, atol=1e-12)


def test_fused_gelu_also_under_an_nnsight_wrapper_and_put_back():
    """nnsight's LanguageModel sets an instance ``forward`` on every module of the model it wraps; a user may
    wrap the same model they gave hydra_probe. The local backend still runs the fused GELU, and puts nnsight's
    ``forward`` back after the block (the wrapper's traces still see the activation)."""
    import nnsight

    from hydra_probe.models.wrapper import _gelu_tanh

    m = tiny.model64("gpt2")
    t = tiny.ioi(m, 4, seed=2)
    before = hp.ablate(m, t, "heads", value="zero").to_frame()
    lm = nnsight.LanguageModel(m.hf_model, tokenizer=m.tokenizer)
    acts = [x for x in m.hf_model.modules() if type(x).__name__ == "NewGELUActivation"]
    theirs = [a.__dict__["forward"] for a in acts]
    assert all(f is not _gelu_tanh for f in theirs)
    with m.evaluating():
        assert all(a.__dict__["forward"] is _gelu_tanh for a in acts)
    assert all(a.__dict__["forward"] is f for a, f in zip(acts, theirs))
    after = hp.ablate(m, t, "heads", value="zero").to_frame()
    np.testing.assert_allclose(after.total_effect, before.total_effect, rtol=0, atol=1e-12)
    ids = t.clean_ids[0][None]
    with torch.no_grad(), lm.trace(ids):
        h = lm.transformer.h[0].mlp.act.output.save()
    assert h.shape[:2] == ids.shape


def test_fused_gelus_gradient_is_the_models_own_on_a_kept_graph(monkeypatch):
    """Where a gradient is taken, the fused GELU's backward multiplies by its slope formed in the forward: the
    gradient of gelu_new's own formula (float64), also in a second backward on the kept graph (GradDrop's
    reuse), and AtP* (GradDrop and the QK fix) gives the estimates of the model's own activation."""
    from transformers.activations import NewGELUActivation

    from hydra_probe.models.wrapper import _gelu_tanh

    x = torch.linspace(-8, 8, 2001, dtype=torch.float64, requires_grad=True)
    y = _gelu_tanh(x)
    assert y.grad_fn is not None and "GeluTanhSlope" in type(y.grad_fn).__name__
    g = torch.randn(2001, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first, = torch.autograd.grad(y, x, g, retain_graph=True)
    again, = torch.autograd.grad(y, x, 2 * g)
    x2 = x.detach().requires_grad_()
    want, = torch.autograd.grad(NewGELUActivation()(x2), x2, g)
    np.testing.assert_allclose(first, want, rtol=0, atol=1e-13)
    np.testing.assert_allclose(again, 2 * want, rtol=0, atol=1e-13)
    with torch.no_grad():
        assert _gelu_tanh(x).grad_fn is None
    m = tiny.model64("gpt2")
    t = tiny.ioi(m, 4, seed=2)
    fast = hp.attribution_patch(m, t, "heads", "denoise", method="atp*").to_frame()["estimate"].to_numpy()
    monkeypatch.setattr(HookedModel, "fast_activations", False)
    plain = hp.attribution_patch(m, t, "heads", "denoise", method="atp*").to_frame()["estimate"].to_numpy()
    assert np.abs(plain).max() > 1e-6
    np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-11 * np.abs(plain).max())
