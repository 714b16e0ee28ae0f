"""Metrics that read only the answer's and the alternative's logits unembed those two columns alone
(``Adapter.logits_at``): equal to the full logits' columns on every family (soft caps, biases, tied
embeddings), and every analysis gives the numbers of the full-vocabulary path."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch

import hydra_probe as hp
from hydra_probe.metrics import METRICS, Metric

ALL = tiny.FAMILIES + tiny.NEW_FAMILIES


@pytest.mark.parametrize("family", ALL)
def test_columns_equal_the_full_logits(family):
    m = tiny.model64(family)
    ad = m.adapter
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, m.d_model, generator=g, dtype=ad.dtype)
    ids = torch.randint(0, m.hf_model.config.vocab_size, (7, 3), generator=g)
    with torch.no_grad():
        full = ad.logits(x).gather(-1, ids)
        got = ad.logits_at(x, ids)
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-12)


def test_softcap_and_bias_are_applied():
    """A head with a bias and a final soft cap: the columns carry both."""
    m = tiny.model64("gemma2")
    ad = m.adapter
    assert ad.softcap is not None
    head = ad.unembed
    with torch.no_grad():
        head.bias = torch.nn.Parameter(torch.linspace(-3, 3, head.out_features, dtype=head.weight.dtype))
        x = 50 * torch.randn(5, m.d_model, dtype=ad.dtype)  # large logits: the cap bends them
        ids = torch.arange(10).view(5, 2)
        full = ad.logits(x).gather(-1, ids)
        np.testing.assert_allclose(ad.logits_at(x, ids), full, rtol=0, atol=1e-12)
        assert full.abs().max() < ad.softcap


def test_a_wrapped_head_takes_the_full_logits():
    """A head that is not a plain Linear (or that something hooks) is called as a module."""
    m = tiny.model64("llama")
    ad = m.adapter
    seen = []
    h = ad.unembed.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    try:
        x = torch.randn(4, m.d_model, dtype=ad.dtype)
        ids = torch.tensor([[1, 2]] * 4)
        with torch.no_grad():
            got = ad.logits_at(x, ids)
    finally:
        h.remove()
    assert seen and seen[0][-1] == m.hf_model.config.vocab_size
    assert got.shape == (4, 2)


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "qwen3"])
def test_analyses_equal_the_full_vocabulary_path(family, monkeypatch):
    m = tiny.model64(family)
    t = tiny.ioi(m, 6, seed=3)

    def run() -> list[np.ndarray]:
        sr = hp.self_repair(m, t, "heads", value="mean").to_frame()
        return [sr["total_effect"].to_numpy(), sr["self_repair"].to_numpy(),
                hp.activation_patch(m, t, "heads", "denoise").to_frame()["patched_metric"].to_numpy(),
                hp.attribution_patch(m, t, "heads", "denoise", method="atp*").to_frame()["estimate"].to_numpy(),
                hp.ablate(m, t, "heads", value="zero", metric="logit").to_frame()["total_effect"].to_numpy()] + [
                hp.path_patch(m, t, senders=["L0H1", "MLP0", "L1H2"], receivers=[["logits"], ["all"]], scale=scale,
                              direction="noise").to_frame()["patched_metric"].to_numpy()
                for scale in ("frozen", "recomputed")]

    fast = run()
    for name in ("logit_diff", "logit"):
        assert METRICS[name].columns_only
        monkeypatch.setitem(METRICS, name, Metric(**{**METRICS[name].__dict__, "columns_only": False}))
    from hydra_probe.models.adapter import Adapter

    def unused(*a, **k):
        raise AssertionError("the full-vocabulary path took the columns")

    monkeypatch.setattr(Adapter, "logits_at", unused)
    real = Adapter._unembed_at
    monkeypatch.setattr(Adapter, "_unembed_at", lambda self, n, ids: unused() if ids is not None else real(self, n, ids))
    plain = run()
    for f, p in zip(fast, plain):
        np.testing.assert_allclose(f, p, rtol=0, atol=1e-10)
