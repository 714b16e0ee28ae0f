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
