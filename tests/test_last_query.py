"""Issue 14: the final block's attention for the last query position only (``Runner.last_query_only``).

Sweeps that read nothing but the last position of the final residual run the final block's queries, scores,
heads' outputs and output projection at the last position only (keys and values at every position). Every
family's tiny float64 model gives the same ablation, self-repair and activation-patching numbers as the plain
full computation, on a task with two prompt lengths; where the route is not safe the full computation runs.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tiny
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

import hydra_probe as hp
import hydra_probe.models.last_query as lq
from hydra_probe.checks import read_only
from hydra_probe.components import select
from hydra_probe.interventions import interventions_for
from hydra_probe.metrics import get_metric
from hydra_probe.models.adapter import get_path
from hydra_probe.models.sites import Site
from hydra_probe.runner import Runner


@functools.lru_cache(maxsize=None)
def build(family: str, impl: str | None = None):
    hf = tiny.hf_model(family).double()
    if impl is not None:
        hf.set_attn_implementation(impl)
    m = hp.load_model(hf, tokenizer=tiny.tokenizer(bos=family not in ("gpt2", "neox")))
    return m, tiny.ioi(m, 4)


class Spy:
    """Records the final block's output-projection input length and the query length its attention function
    receives inside the route (a read-only hook and a wrapped ``attention_function``)."""

    def __init__(self, m, monkeypatch):
        self.o, self.q = [], []
        ad = m.adapter
        real = lq.attention_function

        def attention_function(attn):
            found = real(attn)
            if found is None:
                return None
            impl, orig = found

            def fn(module, query, *a, **k):
                self.q.append(query.shape[2])
                return orig(module, query, *a, **k)
            return impl, fn

        monkeypatch.setattr(lq, "attention_function", attention_function)
        o_proj = get_path(ad.blocks[-1], ad.table.o_proj)
        self.handle = o_proj.register_forward_hook(read_only(lambda mod, args, out: self.o.append(args[0].shape[1])))

    def clear(self):
        self.o.clear()
        self.q.clear()


def results(m, t):
    a = hp.ablate(m, t, "all", "mean", progress=False).to_frame().ablated_metric.to_numpy()
    s = hp.self_repair(m, t, "heads", "zero", progress=False).to_frame()[["de_lost", "self_repair"]].to_numpy()
    p = hp.activation_patch(m, t, "all", "denoise", progress=False).to_frame().select_dtypes("number").to_numpy()
    return a, s, p


def compare(m, t, monkeypatch, route: bool = True, tol: float = 1e-9):
    spy = Spy(m, monkeypatch)
    monkeypatch.setattr(Runner, "suffix_rows", False)  # it changes the lengths seen (tests/test_suffix_rows.py)
    out, lens = {}, {}
    try:
        for flag in (False, True):
            monkeypatch.setattr(Runner, "last_query_only", flag)
            spy.clear()
            out[flag] = results(m, t)
            lens[flag] = (set(spy.o), set(spy.q))
    finally:
        spy.handle.remove()
    for a, b in zip(out[False], out[True]):
        np.testing.assert_allclose(b, a, atol=tol, rtol=0)
    T = set(t.lengths)
    assert len(T) == 2 and lens[False] == (T, set())  # two prompt lengths; the plain path computes every position
    if route:  # the final output projection saw the last position (and the attention the last query) only
        assert 1 in lens[True][0] and 1 in lens[True][1]
    else:  # the attention computed every query (the copies that begin at the final z still cut its projection)
        assert lens[True][1] == set()
    return out


@pytest.mark.parametrize("family", tiny.FAMILIES + tiny.NEW_FAMILIES)
def test_equal_to_the_full_computation(family, monkeypatch):
    m, t = build(family)
    compare(m, t, monkeypatch)
    ad = m.adapter
    blk = ad.blocks[-1]
    # nothing left behind: no registry entry, replaced forward or hook
    assert not ALL_ATTENTION_FUNCTIONS._local_mapping
    for path in (ad.table.attn, ad.table.o_proj, *ad.table.qkv):
        mod = get_path(blk, path)
        assert "forward" not in mod.__dict__ and not mod._forward_pre_hooks and not mod._forward_hooks


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_eager_attention(family, monkeypatch):
    m, t = build(family, "eager")
    compare(m, t, monkeypatch)


def test_float32(monkeypatch):
    m = tiny.model("gemma2")
    compare(m, tiny.ioi(m, 4), monkeypatch, tol=1e-5)


def test_unknown_attention_function_falls_back(monkeypatch):
    """An attention implementation the package does not know: the full computation (same numbers)."""
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    monkeypatch.setitem(AttentionInterface._global_mapping, "hp_test_attention", lambda *a, **k: sdpa(*a, **k))
    hf = tiny.hf_model("llama").double()
    hf.config._attn_implementation = "hp_test_attention"
    m = hp.load_model(hf, tokenizer=tiny.tokenizer(bos=True))
    L = m.adapter.n_layers
    assert not m.adapter.can_last_query(L - 1) and m.adapter.can_last_query(L - 1, from_z=True)
    compare(m, tiny.ioi(m, 4), monkeypatch, route=False)


def test_offloaded_or_replaced_blocks_fall_back():
    m, _ = build("llama")
    ad = m.adapter
    L = ad.n_layers
    attn = get_path(ad.blocks[-1], ad.table.attn)
    assert ad.can_last_query(L - 1)
    attn._hf_hook = object()  # as accelerate marks a dispatched module
    try:
        assert not ad.can_last_query(L - 1) and not ad.can_last_query(L - 1, from_z=True)
    finally:
        del attn._hf_hook
    attn.forward = attn.forward
    try:
        assert not ad.can_last_query(L - 1) and ad.can_last_query(L - 1, from_z=True)
    finally:
        del attn.forward


@pytest.mark.parametrize("site", ["attn_in", "q", "mlp_out"])
def test_capture_in_the_final_block_falls_back(site, monkeypatch):
    """Capturing a final-block site other than z (here at the last position) keeps the full computation; a z
    capture or a z edit there keeps the route. The numbers equal the plain path's either way."""
    m, t = build("qwen2")
    L = m.adapter.n_layers
    spy = Spy(m, monkeypatch)
    copies = [interventions_for(select(m, [c]), "zero", m.head_dim) for c in ("L0H1", f"L{L - 1}H2")]
    out = {}
    try:
        for cap in (Site(L - 1, site), Site(L - 1, "z")):
            for flag in (False, True):
                monkeypatch.setattr(Runner, "last_query_only", flag)
                spy.clear()
                outs = Runner(m, t, get_metric("logit_diff")).run("clean", copies, capture={cap})
                out[cap, flag] = (outs, set(spy.o))
            for a, b in zip(out[cap, False][0], out[cap, True][0]):
                torch.testing.assert_close(b.metric, a.metric, atol=1e-10, rtol=0)
                torch.testing.assert_close(b.captures[cap], a.captures[cap], atol=1e-10, rtol=0)
    finally:
        spy.handle.remove()
    assert 1 not in out[Site(L - 1, site), True][1]
    assert 1 in out[Site(L - 1, "z"), True][1]


def test_wrapper_checks_shapes():
    """The wrapped attention function cuts the query only for its own module and a mask it understands; its
    output, broadcast over the positions, equals the full function's last row; the registry is restored."""
    m, _ = build("llama")
    attn = get_path(m.adapter.blocks[-1], m.adapter.table.attn)
    other = get_path(m.adapter.blocks[0], m.adapter.table.attn)
    orig = ALL_ATTENTION_FUNCTIONS["sdpa"]
    g = torch.Generator().manual_seed(0)
    B, H, KV, T, dh = 2, attn.config.num_attention_heads, attn.config.num_key_value_heads, 5, attn.head_dim
    q = torch.randn(B, H, T, dh, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, KV, T, dh, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    ref, _ = orig(attn, q, k, v, mask, scaling=0.5)
    with lq.last_query_function(attn) as on:
        assert on
        fn = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None)
        cut, _ = fn(attn, q, k, v, mask, scaling=0.5)
        assert cut.shape == ref.shape and cut.stride(1) == 0
        torch.testing.assert_close(cut[:, -1], ref[:, -1], atol=1e-12, rtol=0)
        whole, _ = fn(other, q, k, v, mask, scaling=0.5)  # another module: untouched
        torch.testing.assert_close(whole, ref, atol=0, rtol=0)
        flat, _ = fn(attn, q, k, v, mask[0, 0], scaling=0.5)  # a mask it does not know: the full call
        torch.testing.assert_close(flat, orig(attn, q, k, v, mask[0, 0], scaling=0.5)[0], atol=0, rtol=0)
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping
