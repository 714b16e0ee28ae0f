"""Issue 14: AtP*'s engine nearer its limit.

``Runner.qk_fix`` runs only each downstream layer's attention with every sender's change stacked, and
``Runner.gradients`` shares one forward among the GradDrop reads (vector-Jacobian products under the dropped
layer). Both must equal their plain references (``Runner.fast_qk = False``: one full pinned forward per
sender with a delivery to every downstream head's q and k, the code main ran; ``Runner.shared_gradients =
False``: one stacked copy per read) to float rounding, in float64, on tiny models of every family.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tiny
import torch

import hydra_probe as hp
from hydra_probe.effects.common import make_runner
from hydra_probe.interventions import GradientRead, SenderChange
from hydra_probe.models.sites import Site
from hydra_probe.runner import Runner


@functools.lru_cache(maxsize=None)
def build(family: str):
    """A tiny float64 model and a 4-prompt IOI task of two prompt lengths (longer than the sliding windows)."""
    m = tiny.model64(family, layers=3, heads=4, d=32, initializer_range=0.2)
    return m, tiny.ioi(m, 4, seed=3)


@pytest.fixture
def plain(monkeypatch):
    """Switch a runner flag to its plain reference for the duration of a ``with`` block."""
    import contextlib

    @contextlib.contextmanager
    def off(*flags: str):
        with monkeypatch.context() as mp:
            for f in flags:
                mp.setattr(Runner, f, False)
            yield
    return off


def _on_and_off(plain, flag: str, seen: list[bool], run):
    """``run()`` with the runner flag ``flag`` on, where ``seen`` must record its route taken, and off (the plain
    reference), where it must not: (on, off)."""
    seen.clear()
    on = run()
    assert any(seen)
    with plain(flag):
        seen.clear()
        off = run()
        assert not any(seen)
    return on, off


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-9) -> None:
    scale = max(float(want.abs().max()), 1e-12)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=rel * scale, rtol=0)


@pytest.mark.parametrize("family", tiny.FAMILIES + tiny.NEW_FAMILIES)
def test_qk_engine_equals_one_pinned_forward_per_sender(family, plain):
    m, t = build(family)
    L = m.n_layers
    runner, _ = make_runner(m, t, "logit_diff")
    zs = tuple(Site(layer, "z") for layer in range(1, L))
    reads = runner.gradients("corrupted", [GradientRead(zs, None, True)] + [GradientRead(zs, d, True) for d in (1, 2)])
    c = {x.name: x for x in m.components(["all", "layers"])}
    changes = [SenderChange((c["L0H1"],), "clean", (-1, -3)), SenderChange((c["MLP0"],), "clean"),
               SenderChange((c["ATTN1"],), "clean"), SenderChange((c["L1H3"],), "clean", (-1,)),
               SenderChange((c["MLP2"],), "clean"), SenderChange((c["L0H0"], c["MLP1"]), "clean")]
    with plain("compose_qk"):
        got = runner.qk_fix("corrupted", changes, reads)
    with plain("fast_qk"):
        want = runner.qk_fix("corrupted", changes, reads)
    assert got.shape == (3, len(changes), len(t))
    _close(got, want)
    # lone heads' q/k composed through W_O: the same up to the model's own norm rounding (HF's RMSNorm
    # computes in float32 even in a float64 model; the composition does not)
    composed = runner.qk_fix("corrupted", changes, reads)
    _close(composed, want, 1e-9 if m.adapter.table.norm_kind == "layernorm" else 1e-4)
    assert not runner._no_compose
    # a real term for every sender below the last layer; none for the last layer's MLP
    assert (got[0, [0, 1, 2, 3, 5]].abs().amax(-1) > 1e-6).all() and (got[:, 4] == 0).all()
    # a read that drops layer 1 is never used for senders at layer 1 or above: its terms are not computed
    assert (got[1, [2, 3, 5]] == 0).all() and (got[1, 0].abs() > 0).any()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_qk_engine_where_the_value_projection_is_wrapped(family, plain):
    """A value projection whose forward someone replaced (a wrapper, an adapter layer) is not sliced: every
    copy's values are computed and the unchanged copy's copied over them; same numbers."""
    m, t = build(family)
    runner, _ = make_runner(m, t, "logit_diff")
    zs = tuple(Site(layer, "z") for layer in range(1, m.n_layers))
    reads = runner.gradients("clean", [GradientRead(zs, None, True)])
    changes = [SenderChange((c,), "corrupted") for c in m.components(["L0H1", "MLP0", "L1H0"])]
    with plain("compose_qk"):  # a block with a replaced forward is not composed
        want = runner.qk_fix("clean", changes, reads)
    ad = m.adapter
    mods = [ad.module_of(Site(layer, "v" if ad.table.qkv_layout == "separate" else "qkv"))[0]
            for layer in range(m.n_layers)]
    calls = []
    try:
        for mod in mods:
            mod.forward = (lambda f: lambda x: (calls.append(x.shape[0]), f(x))[1])(mod.forward)
        got = runner.qk_fix("clean", changes, reads)
    finally:
        for mod in mods:
            del mod.forward
    _close(got, want)
    assert calls and max(calls) > len(runner.groups[0])  # every copy's values computed (not the last copy's alone)


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "olmo2", "gemma2"])
def test_shared_graddrop_equals_one_stacked_copy_per_read(family, plain):
    """Every site kind attribution reads (z, MLP outputs, residual inputs, the final residual), both
    settings of the pattern freeze in one call, and reads that start above a dropped layer."""
    m, t = build(family)
    L = m.n_layers
    runner, _ = make_runner(m, t, "logit_diff")
    sites = tuple(Site(layer, k) for layer in range(L) for k in ("z", "mlp_out", "resid_pre")) + (Site(L, "resid_pre"),)
    upper = tuple(s for s in sites if s.layer >= 1)
    reads = [GradientRead(sites, None, flag) for flag in (True, False)]
    reads += [GradientRead(sites, d, flag) for d in range(L) for flag in (True, False)]
    reads += [GradientRead(upper, 0), GradientRead(upper, 1, True), GradientRead(upper)]
    got = runner.gradients("clean", reads)
    with plain("shared_gradients"):
        want = runner.gradients("clean", reads)
    for r, a, b in zip(reads, got, want):
        assert a.drop_layer == r.drop_layer and set(a.grads) == set(b.grads) == set(r.sites)
        _close(a.metric, b.metric)
        for s in r.sites:
            for g in range(len(runner.groups)):
                _close(a.grads[s][g], b.grads[s][g])
                _close(a.acts[s][g], b.acts[s][g])
    # dropping a layer changes the gradient below it and zeroes it inside the dropped block
    d1 = got[2 + 2]  # drop layer 1, patterns frozen
    assert (d1.grads[Site(1, "z")][0] == 0).all() and (d1.grads[Site(1, "mlp_out")][0] == 0).all()
    assert not torch.allclose(d1.grads[Site(0, "z")][0], got[0].grads[Site(0, "z")][0])
    assert torch.equal(d1.grads[Site(2, "z")][0], got[0].grads[Site(2, "z")][0])


@pytest.mark.parametrize("family", tiny.FAMILIES + tiny.NEW_FAMILIES)
def test_graddrop_together_equals_one_product_per_dropped_layer(family, plain, monkeypatch):
    """GradDrop's products taken block by block, every dropped layer above a block in one batched product
    (``Runner.graddrop_together``), give the per-drop products' gradients at every site kind, for reads that
    drop each layer, with and without the pattern freeze, on every row and on the changed rows only; a batch
    that fails (an op vmap cannot batch) falls back to the per-drop products for the rest of the runner."""
    from hydra_probe.runner import gradients as gm

    m, t = build(family)
    L = m.n_layers
    runner, _ = make_runner(m, t, "logit_diff")
    sites = tuple(Site(layer, k) for layer in range(L) for k in ("z", "mlp_out", "resid_pre")) + (Site(L, "resid_pre"),)
    reads = [GradientRead(sites, d, flag) for d in (None, *range(L)) for flag in (True, False)]
    seen: list[bool] = []
    real = gm._drops_together
    monkeypatch.setattr(gm, "_drops_together", lambda *a: (seen.append(True), real(*a))[1])

    def check(got, want):
        for r, a, b in zip(reads, got, want):
            for s in r.sites:
                for g in range(len(runner.groups)):
                    _close(a.grads[s][g], b.grads[s][g])
        # the drop of layer 1 differs from the full gradient below it and is zero inside block 1
        d1 = got[2 * 2]
        assert (d1.grads[Site(1, "z")][0] == 0).all()
        assert not torch.allclose(d1.grads[Site(0, "z")][0], got[0].grads[Site(0, "z")][0])

    for source, rows in (("clean", False), ("corrupted", True)):
        check(*_on_and_off(plain, "graddrop_together", seen,
                           lambda s=source, r=rows: runner.gradients(s, reads, changed_rows_only=r)))
    want = runner.gradients("clean", reads)
    grad = torch.autograd.grad

    def no_batch(*a, **k):
        if k.get("is_grads_batched"):
            raise RuntimeError("vmap: an op without a batching rule")
        return grad(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", no_batch)
    check(runner.gradients("clean", reads), want)
    assert runner._graddrop_apart
    seen.clear()
    runner.gradients("clean", reads)
    assert not seen  # the runner no longer tries


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "olmo2"])
def test_atp_star_unchanged(family, plain):
    """attribution_patch(method="atp*") with the new engine gives main's numbers (both references on),
    both directions, and with per-position rows (each position's change on its own)."""
    m, t = build(family)
    runs = [(["heads", "mlps", "ATTN1"], "denoise", {}), (["heads", "mlps"], "noise", {}),
            (["L0H2", "MLP0", "RESID1"], "denoise", {"per_position": True})]
    for comps, direction, kw in runs:
        got = hp.attribution_patch(m, t, comps, direction, method="atp*", **kw).to_frame()
        with plain("fast_qk", "shared_gradients"):
            want = hp.attribution_patch(m, t, comps, direction, method="atp*", **kw).to_frame()
        _close(torch.tensor(got.estimate.to_numpy()), torch.tensor(want.estimate.to_numpy()))
        assert (got.dropped_layer.to_numpy() == want.dropped_layer.to_numpy()).all()


def test_qk_fix_retries_out_of_memory_with_half_the_stack(monkeypatch):
    m, t = build("llama")
    runner, _ = make_runner(m, t, "logit_diff")
    zs = tuple(Site(layer, "z") for layer in range(1, m.n_layers))
    reads = runner.gradients("clean", [GradientRead(zs, None, True)])
    changes = [SenderChange((c,), "corrupted") for c in m.components(["heads", "mlps"])]
    want = runner.qk_fix("clean", changes, reads)
    real = Runner._qk_chunk
    sizes: list[int] = []

    def flaky(self, g, source, chs, *a, **k):
        sizes.append(len(chs))
        if len(chs) > 1 and -1 not in sizes:
            sizes.append(-1)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, g, source, chs, *a, **k)

    monkeypatch.setattr(Runner, "_qk_chunk", flaky)
    got = runner.qk_fix("clean", changes, reads)
    i = sizes.index(-1)
    assert sizes[i + 1] == sizes[i - 1] // 2, sizes
    _close(got, want, 1e-12)


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_composed_qk_writes_one_workspace_per_projection_and_frees_it(family, plain, monkeypatch):
    """The composed q/k of every layer and chunk go into one buffer per projection (no fresh allocation per
    layer), which no result aliases (a budget of one change per chunk: every chunk overwrites the last one's)
    and which the runner drops when the QK fix ends."""
    m, t = build(family)
    runner, _ = make_runner(m, t, "logit_diff")
    zs = tuple(Site(layer, "z") for layer in range(1, m.n_layers))
    reads = runner.gradients("clean", [GradientRead(zs, None, True)])
    changes = [SenderChange((c,), "corrupted") for c in m.components("heads")]
    with plain("fast_qk"):
        want = runner.qk_fix("clean", changes, reads)
    made: list[tuple] = []
    real = Runner._qk_workspace

    def spy(self, slot, shape, dtype, device):
        out = real(self, slot, shape, dtype, device)
        made.append((slot, out.untyped_storage().data_ptr()))
        return out

    monkeypatch.setattr(Runner, "_qk_workspace", spy)
    runner.token_budget = 2 * max(len(idx) * len(t.clean_ids[idx[0]]) for idx in t.groups())
    got = runner.qk_fix("clean", changes, reads)
    _close(got, want, 1e-9 if m.adapter.table.norm_kind == "layernorm" else 1e-4)
    assert len(made) > 2 * len({s for s, _ in made}) and runner._qk_bufs == {}
    per_slot = {s: {p for q, p in made if q == s} for s, _ in made}
    assert all(len(p) <= len(t.groups()) + 1 for p in per_slot.values()), per_slot  # reused, grown rarely


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_composed_qk_falls_back_where_the_norm_is_not_as_described(family, plain, monkeypatch):
    """A norm the table describes wrongly (here: a gamma off by 2x) is caught on the unchanged copy before its
    composed q/k are used; the layer then takes the plain route, with the same numbers."""
    m, t = build(family)
    runner, _ = make_runner(m, t, "logit_diff")
    zs = tuple(Site(layer, "z") for layer in range(1, m.n_layers))
    reads = runner.gradients("clean", [GradientRead(zs, None, True)])
    changes = [SenderChange((c,), "corrupted") for c in m.components(["L0H1", "L1H0", "L0H3"])]
    with plain("compose_qk"):
        want = runner.qk_fix("clean", changes, reads)
    ad = m.adapter
    true = ad.attn_input_affine
    monkeypatch.setattr(ad, "attn_input_affine", lambda layer: (lambda g, b, e, c: (2 * g, b, e, c))(*true(layer)))
    got = runner.qk_fix("clean", changes, reads)
    _close(got, want)
    assert runner._no_compose == set(range(1, m.n_layers))


def test_composed_weights_are_kept_for_the_other_direction():
    """The second QK fix on one runner (the report's other AtP* direction) reuses the composed q/k weights and
    gives what a fresh runner gives."""
    m, t = build("llama")
    zs = tuple(Site(layer, "z") for layer in range(1, m.n_layers))
    changes = lambda value: [SenderChange((c,), value) for c in m.components(["L0H1", "L1H0", "L0H3", "L1H2"])]  # noqa: E731
    shared, _ = make_runner(m, t, "logit_diff")
    shared.qk_fix("corrupted", changes("clean"), shared.gradients("corrupted", [GradientRead(zs, None, True)]))
    kept = dict(shared._qk_weights)
    assert kept and shared._qk_weight_bytes > 0
    got = shared.qk_fix("clean", changes("corrupted"), shared.gradients("clean", [GradientRead(zs, None, True)]))
    assert shared._qk_weights.keys() == kept.keys()  # nothing new was composed
    fresh, _ = make_runner(m, t, "logit_diff")
    want = fresh.qk_fix("clean", changes("corrupted"), fresh.gradients("clean", [GradientRead(zs, None, True)]))
    _close(got, want)


def prefix_task(m: hp.HookedModel, seed: int = 0) -> hp.Task:
    """A task whose clean and corrupted prompts share a prefix: a group of length 10 whose prompts first differ at
    positions 4 and 5 (so the QK fix may skip query rows 0..3), and a group of length 12 where one prompt's first
    token differs (nothing to skip)."""
    from hydra_probe.tasks.task import Task

    g = torch.Generator().manual_seed(seed)
    clean, corrupted = [], []
    for T, positions in ((10, (6, 4)), (10, (7, 5)), (12, (0, 9)), (12, (8,))):
        ids = torch.randint(3, 60, (T,), generator=g)
        other = ids.clone()
        for p in positions:
            other[p] = 3 + (ids[p] - 3 + int(torch.randint(1, 57, (1,), generator=g))) % 57
        clean.append(ids)
        corrupted.append(other)
    ans = torch.randint(3, 60, (4,), generator=g)
    return Task([{"clean": "", "corrupted": "", "answer": "", "alternative": ""}] * 4, "prefix", "shared prefix",
                seed, clean, corrupted, ans, (ans - 3 + 1) % 57 + 3)


@pytest.mark.parametrize("family", tiny.FAMILIES + tiny.NEW_FAMILIES)
def test_qk_fix_skips_exactly_the_unchanged_query_rows(family, plain, monkeypatch):
    """Runner.qk_changed_rows_only: the terms are those computed over every query row (composed and stacked
    routes, both directions, changes narrowed to positions, MLPs, whole layers, several senders), and those of
    the plain reference; rows were skipped in the group with a shared prefix and not in the other. A skip one row
    too far changes the terms (the comparison can see a wrong skip)."""
    from hydra_probe.models.adapter import Adapter

    m = build(family)[0]
    t = prefix_task(m)
    runner, _ = make_runner(m, t, "logit_diff")
    assert [len(t.clean_ids[idx[0]]) for idx in runner.groups] == [10, 12]
    zs = tuple(Site(layer, "z") for layer in range(1, m.n_layers))
    c = {x.name: x for x in m.components(["all", "layers"])}
    seen: list[tuple[int, dict[str, int]]] = []
    real = Adapter._qk_attention

    def spy(self, layer, first, state):
        seen.append((first, state))
        return real(self, layer, first, state)

    monkeypatch.setattr(Adapter, "_qk_attention", spy)
    tol = 1e-9 if m.adapter.table.norm_kind == "layernorm" else 1e-4  # composed vs the model's float32 RMSNorm
    for source, value in (("corrupted", "clean"), ("clean", "corrupted")):
        reads = runner.gradients(source, [GradientRead(zs, None, True), GradientRead(zs, 1, True)])
        changes = [SenderChange((c["L0H1"],), value, (-1, -3)), SenderChange((c["MLP0"],), value),
                   SenderChange((c["ATTN1"],), value), SenderChange((c["L1H3"],), value, (-1,)),
                   SenderChange((c["L0H2"],), value), SenderChange((c["L1H0"],), value),
                   SenderChange((c["L0H0"], c["MLP1"]), value)]
        # the composed route on the later rows only (Runner.suffix_rows; the earlier rows' keys are the
        # model's own, whose RMSNorm rounds in float32: the composed route's tolerance)
        rows_only = runner.qk_fix(source, changes, reads)
        monkeypatch.setattr(Runner, "suffix_rows", False)
        got = runner.qk_fix(source, changes, reads)
        with plain("compose_qk"):
            got_stacked = runner.qk_fix(source, changes, reads)
        with plain("qk_changed_rows_only"):
            want = runner.qk_fix(source, changes, reads)
        with plain("qk_changed_rows_only", "compose_qk"):
            want_stacked = runner.qk_fix(source, changes, reads)
        with plain("fast_qk"):
            ref = runner.qk_fix(source, changes, reads)
        _close(got, want)
        _close(got_stacked, want_stacked)
        _close(got_stacked, ref)
        _close(got, ref, tol)
        _close(rows_only, got, tol)
        _close(rows_only, ref, tol)
        monkeypatch.setattr(Runner, "suffix_rows", True)
        assert (want[0, [0, 1, 2, 4, 6]].abs().amax(-1) > 1e-6).all()
    # the group of length 10 skipped rows 0..3 (rows 0..6 for L0H1's change at -1 and -3 alone), every attention
    # call checked causal; the group of length 12 skipped nothing
    assert {f for f, _ in seen} >= {0, 4}
    assert all(st and not st.get("full") for f, st in seen if f > 0)
    # a skip one row too far is seen (with sliding windows of 4 the terms of the rows before 6 are zero: no read
    # reaches them from the last position, so there the skip goes on to the last row)
    first = Runner._first_changed_row
    far = 8 if family in ("gemma2", "gemma3", "olmo3") else 1

    def too_far(self, ch):
        f = first(self, ch)
        return min(f + far, ch.shape[2] - 1) if 0 < f < ch.shape[2] - 1 else f

    monkeypatch.setattr(Runner, "_first_changed_row", too_far)
    bad = runner.qk_fix(source, changes, reads)
    assert not torch.allclose(bad, want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_query_rows_are_cut_only_where_the_attention_is_causal():
    """The attention function's row cut (last_query.query_rows_function): a causal mask (boolean or additive, also
    a sliding window) is cut to its rows; a mask that lets an early row see a later key, eager attention without a
    mask, a non-causal module and a position bias are not (None); sdpa without a mask is causal but not cut (True)."""
    from hydra_probe.models.last_query import _row_mask

    q = k = torch.zeros(2, 4, 6, 8)
    mod = torch.nn.Module()
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    window = causal & torch.ones(6, 6, dtype=torch.bool).triu(-2)
    additive = torch.zeros(1, 1, 6, 6).masked_fill(~causal, torch.finfo(torch.float32).min)
    for mask in (causal, window, additive, additive.expand(2, 1, 6, 6)):
        assert torch.equal(_row_mask("sdpa", mod, q, k, mask, 2, {}), mask[:, :, 2:])
    assert _row_mask("sdpa", mod, q, k, torch.ones(1, 1, 6, 6, dtype=torch.bool), 2, {}) is None
    assert _row_mask("eager", mod, q, k, torch.zeros(1, 1, 6, 6), 2, {}) is None
    assert _row_mask("eager", mod, q, k, None, 2, {}) is None
    assert _row_mask("sdpa", mod, q, k, None, 2, {}) is True
    assert _row_mask("sdpa", mod, q, k, additive, 2, {"position_bias": torch.zeros(1, 4, 6, 6)}) is None
    assert _row_mask("sdpa", mod, q, k, causal, 0, {}) is None and _row_mask("sdpa", mod, q, k, causal, 6, {}) is None
    mod.is_causal = False
    assert _row_mask("sdpa", mod, q, k, None, 2, {}) is None


def test_fast_rotary_is_llamas_bit_for_bit():
    """models.rotary.apply_rotary gives transformers' Llama apply_rotary_pos_emb bit for bit (float32, float64, a
    float32 cos/sin with float64 queries as OLMo-2 has them), and is swapped in only where a family's rotary is
    Llama's (not NeoX's partial rotary)."""
    from transformers.models.gpt_neox import modeling_gpt_neox
    from transformers.models.llama import modeling_llama

    from hydra_probe.models.rotary import _is_llama_rotary, apply_rotary

    g = torch.Generator().manual_seed(0)
    for dt, cdt in ((torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float64, torch.float32)):
        q = torch.randn(3, 7, 5, 16, generator=g, dtype=torch.float64).to(dt).transpose(1, 2)  # as the modules view it
        k = torch.randn(3, 2, 7, 16, generator=g, dtype=torch.float64).to(dt)
        cos, sin = torch.randn(2, 1, 7, 16, generator=g, dtype=torch.float64).to(cdt)
        for a, b in zip(apply_rotary(q, k, cos, sin), modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert _is_llama_rotary(modeling_llama) and not _is_llama_rotary(modeling_gpt_neox)


def test_fast_rotary_sees_through_the_kernels_wrapper():
    """transformers >= 5.25 with the ``kernels`` package makes Llama's ``apply_rotary_pos_emb`` an ``nn.Module``
    whose forward calls the function (``use_kernel_forward_from_hub``): it is still Llama's rotary, unless a
    kernel was given to it (an instance ``forward``); a wrapper around another function is not."""
    import types

    from transformers.models.gpt_neox import modeling_gpt_neox
    from transformers.models.llama import modeling_llama

    from hydra_probe.models.rotary import _is_llama_rotary, _plain

    def wrap(func):  # the shape of kernels' _create_func_module
        class Func(torch.nn.Module):
            def forward(self, *args, **kwargs):
                return func(*args, **kwargs)
        return Func()

    plain = _plain(modeling_llama.apply_rotary_pos_emb)  # the function itself, whichever transformers this is
    fake = types.SimpleNamespace(apply_rotary_pos_emb=wrap(plain), rotate_half=modeling_llama.rotate_half)
    assert _plain(fake.apply_rotary_pos_emb) is plain and _is_llama_rotary(fake)
    fake.apply_rotary_pos_emb.forward = lambda *a: None  # a kernel swapped in
    assert not _is_llama_rotary(fake)
    neox = types.SimpleNamespace(apply_rotary_pos_emb=wrap(_plain(modeling_gpt_neox.apply_rotary_pos_emb)),
                                 rotate_half=modeling_llama.rotate_half)
    assert not _is_llama_rotary(neox)


@pytest.fixture
def pattern_calls(monkeypatch):
    """How often each adapter call of the QK fix's pattern route gave a pattern ("pattern") or declined ("True" /
    "False"); the route is on for the tiny models' prompts (their head_dim is 8 to 16: the default
    ``Runner.qk_pattern_keys`` would leave prompts of more than 4 to 8 tokens to the output route)."""
    from hydra_probe.models.adapter import Adapter

    monkeypatch.setattr(Runner, "qk_pattern_keys", 64)

    calls: dict[str, int] = {}
    for name in ("attention_patterns", "attention_patterns_given"):
        real = getattr(Adapter, name)

        def spy(self, *a, _real=real, **k):
            got = _real(self, *a, **k)
            key = "pattern" if isinstance(got, tuple) else str(got)
            calls[key] = calls.get(key, 0) + 1
            return got

        monkeypatch.setattr(Adapter, name, spy)
    return calls


@pytest.mark.parametrize("family", tiny.FAMILIES + tiny.NEW_FAMILIES)
def test_pattern_route_equals_the_output_route(family, plain, pattern_calls):
    """Runner.qk_patterns: the QK fix's terms read from each copy's attention pattern against grad_z . V are those
    read from its heads' output z (composed and stacked routes; every row, and the changed rows only, in a task
    with a shared prefix), in float64 to rounding; the pattern route was taken in every layer and every call
    (eager attention: Gemma-2's; sdpa: the others)."""
    m = build(family)[0]
    c = {x.name: x for x in m.components(["all", "layers"])}
    zs = tuple(Site(layer, "z") for layer in range(1, m.n_layers))
    for t in (build(family)[1], prefix_task(m)):
        runner, _ = make_runner(m, t, "logit_diff")
        reads = runner.gradients("clean", [GradientRead(zs, None, True), GradientRead(zs, 1, True)])
        changes = [SenderChange((c["L0H1"],), "corrupted"), SenderChange((c["L1H3"],), "corrupted", (-1,)),
                   SenderChange((c["MLP0"],), "corrupted"), SenderChange((c["L0H0"], c["MLP1"]), "corrupted")]
        for flags in ((), ("compose_qk",)):
            with plain(*flags):
                pattern_calls.clear()
                got = runner.qk_fix("clean", changes, reads)
                assert pattern_calls.get("pattern", 0) >= m.n_layers - 1 and set(pattern_calls) == {"pattern"}
                assert not runner._no_patterns
                with plain("qk_patterns"):
                    pattern_calls.clear()
                    want = runner.qk_fix("clean", changes, reads)
                    assert not pattern_calls
            assert (want[0, :3].abs().amax(-1) > 1e-6).all()
            _close(got, want, 1e-12)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pattern_route_falls_back_where_its_pattern_is_not_the_attentions(family, plain, pattern_calls,
                                                                          monkeypatch):
    """A pattern that is not the one the attention applies (here: computed at half the scale) fails the check of
    the unchanged copy's ``A V`` against the captured z; every layer then takes the output route, with the output
    route's numbers. An attention call the pattern function does not know (here: every mask refused) goes to the
    original function: the output route again. So do prompts longer than ``Runner.qk_pattern_keys`` head
    dimensions (the default: half of one)."""
    from hydra_probe.models import patterns

    m, t = build(family)
    zs = tuple(Site(layer, "z") for layer in range(1, m.n_layers))
    changes = [SenderChange((x,), "corrupted") for x in m.components(["L0H1", "L1H0", "MLP0"])]
    fresh = lambda: make_runner(m, t, "logit_diff")[0]  # noqa: E731
    want = {}
    for flags in ((), ("compose_qk",)):
        with plain("qk_patterns", *flags):
            r = fresh()
            want[flags] = r.qk_fix("clean", changes, r.gradients("clean", [GradientRead(zs, None, True)]))
    with monkeypatch.context() as mp:  # prompts longer than the pattern route's limit: the output route
        mp.setattr(Runner, "qk_pattern_keys", 0.5)
        assert len(t.clean_ids[0]) > 0.5 * m.adapter.head_dim
        for flags in ((), ("compose_qk",)):
            with plain(*flags):
                r = fresh()
                pattern_calls.clear()
                got = r.qk_fix("clean", changes, r.gradients("clean", [GradientRead(zs, None, True)]))
                assert not pattern_calls
                _close(got, want[flags], 1e-12)
    real = patterns.softmax_pattern
    for name, bad in (("softmax_pattern", lambda q, k, mask, s, cap=None: real(q, k, mask, s / 2, cap)),
                      ("_mask_of", lambda *a: False)):
        with monkeypatch.context() as mp:
            mp.setattr(patterns, name, bad)
            for flags in ((), ("compose_qk",)):
                with plain(*flags):
                    r = fresh()
                    pattern_calls.clear()
                    got = r.qk_fix("clean", changes, r.gradients("clean", [GradientRead(zs, None, True)]))
                    assert r._no_patterns == set(range(1, m.n_layers)) and "pattern" not in pattern_calls
                    _close(got, want[flags], 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_softmax_pattern_is_sdpas(dtype):
    """patterns.softmax_pattern against torch's scaled_dot_product_attention on repeated keys: grouped queries
    (4 query heads per key head), boolean and additive masks broadcast over heads, a soft cap (against the
    formula), float32 softmax for a half-precision query."""
    from hydra_probe.models.patterns import softmax_pattern

    g = torch.Generator().manual_seed(0)
    N, H, Hk, Tq, Tk, dh = 2, 8, 2, 3, 7, 5
    q, k, v = (torch.randn(N, h, t, dh, generator=g).to(dtype) for h, t in ((H, Tq), (Hk, Tk), (Hk, Tk)))
    causal = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    additive = torch.zeros(N, 1, Tq, Tk).masked_fill(~causal, -1e9).to(dtype)
    kr, vr = (x.repeat_interleave(H // Hk, 1) for x in (k, v))
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    for mask in (causal, additive, None):
        A = softmax_pattern(q, k, mask, 0.3)
        assert A.dtype == (dtype if dtype == torch.float64 else torch.float32)
        want = torch.nn.functional.scaled_dot_product_attention(q.double(), kr.double(), vr.double(),
                                                                attn_mask=None if mask is None else mask.double()
                                                                if mask.is_floating_point() else mask, scale=0.3)
        np.testing.assert_allclose((A.double() @ vr.double()).numpy(), want.numpy(), atol=tol, rtol=0)
    s = (q.double() @ kr.double().transpose(-1, -2)) * 0.3
    capped = (torch.tanh(s / 2) * 2).masked_fill(~causal, float("-inf")).softmax(-1)
    np.testing.assert_allclose(softmax_pattern(q, k, causal, 0.3, 2.0).double().numpy(), capped.numpy(),
                               atol=tol, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "gemma3", "phi3"])
def test_pattern_route_under_eager_attention(family, pattern_calls, monkeypatch):
    """Models loaded with eager attention (their default is sdpa): the pattern route reads each family's own
    eager function's weights and gives the output route's AtP* estimates in float64."""
    hf = tiny.hf_model(family).double()
    hf.set_attn_implementation("eager")
    m = hp.load_model(hf, tokenizer=tiny.tokenizer(bos=True))
    assert m.adapter.config._attn_implementation == "eager"
    t = tiny.ioi(m, 4, seed=3)
    atp = lambda: hp.attribution_patch(m, t, "heads", "denoise", method="atp*").to_frame()["estimate"].to_numpy()  # noqa: E731
    got = atp()
    assert pattern_calls and set(pattern_calls) == {"pattern"}
    monkeypatch.setattr(Runner, "qk_patterns", False)
    want = atp()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("family", tiny.FAMILIES + tiny.NEW_FAMILIES)
def test_qk_fix_forms_only_the_query_rows_a_gradient_reads(family, plain, pattern_calls, monkeypatch):
    """Runner.qk_read_rows: on the pattern route a layer's query rows before the first one where a read's gradient
    is nonzero (the last layer: all but the read position) are not formed; the terms are those of every query row
    (composed and stacked routes, both directions, every row and the changed rows only, narrowed changes, MLPs,
    several senders) and of the plain reference. Patterns of fewer rows were formed, and where the queries are a
    leading block of the projection's columns (not NeoX's) the changed copies' composed queries of one row alone. A
    restriction one row too far changes the terms (the comparison can see a wrong cut)."""
    from hydra_probe.models import patterns
    from hydra_probe.runner import gradients

    m = build(family)[0]
    c = {x.name: x for x in m.components(["all", "layers"])}
    zs = tuple(Site(layer, "z") for layer in range(1, m.n_layers))
    cut, split = [], []
    real_cut, real_split = patterns._last_queries, gradients._query_split
    monkeypatch.setattr(patterns, "_last_queries", lambda q, mask, keep: (
        cut.append(keep is not None and keep < q.shape[2]) or real_cut(q, mask, keep)))
    monkeypatch.setattr(gradients, "_query_split", lambda *a: (split.append(real_split(*a)) or split[-1]))
    tol = 1e-9 if m.adapter.table.norm_kind == "layernorm" else 1e-4  # composed vs the model's float32 RMSNorm
    for t in (build(family)[1], prefix_task(m)):
        runner, _ = make_runner(m, t, "logit_diff")
        for source, value in (("corrupted", "clean"), ("clean", "corrupted")):
            reads = runner.gradients(source, [GradientRead(zs, None, True), GradientRead(zs, 1, True)])
            changes = [SenderChange((c["L0H1"],), value, (-1, -3)), SenderChange((c["MLP0"],), value),
                       SenderChange((c["L1H3"],), value), SenderChange((c["L0H2"],), value),
                       SenderChange((c["L0H0"], c["MLP1"]), value)]
            for flags in ((), ("compose_qk",)):
                with plain(*flags):
                    got, want = _on_and_off(plain, "qk_read_rows", cut, functools.partial(runner.qk_fix, source, changes, reads))
                _close(got, want)
            with plain("fast_qk"):
                _close(got, runner.qk_fix(source, changes, reads), tol)
            assert (want[0].abs().amax(-1) > 1e-6).all()
    # composed (no post-attention norm): the queries of one row alone, where they lead the projection's columns
    assert any(s is not None for s in split) == (family != "neox" and not m.adapter.has_post_attn_norm)
    first = gradients._first_read_row
    monkeypatch.setattr(gradients, "_first_read_row", lambda memo, grads: min(first(memo, grads) + 1, 10 ** 6))
    bad = runner.qk_fix(source, changes, reads)
    assert not torch.allclose(bad, want, rtol=0, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_qk_fix_hands_what_depends_on_its_base_run_to_the_next_call_on_it(family, monkeypatch):
    """A QK fix hands its per-layer memo of the base run (block inputs, norm scales, unchanged projections,
    values, checks and ``x . W`` of every row) to the next QK fix on the same run: AtP*'s ablation then noising
    on the clean run. The second call reads it (also the rows of a later first changed row) and gives the terms
    of a runner without it; a call on the other run drops it, and nothing keyed by a read's gradients is handed
    on."""
    m = build(family)[0]
    t = prefix_task(m)
    c = {x.name: x for x in m.components(["all", "layers"])}
    zs = tuple(Site(layer, "z") for layer in range(1, m.n_layers))
    heads = ["L0H1", "L0H2", "L1H0", "L1H3"]
    hits: list[bool] = []
    real = Runner._x_dot_w

    def spy(self, memo, who, r, *a):
        hits.append(("cross", who) in memo)
        return real(self, memo, who, r, *a)

    monkeypatch.setattr(Runner, "_x_dot_w", spy)
    runner, _ = make_runner(m, t, "logit_diff")
    reads = runner.gradients("clean", [GradientRead(zs, None, True), GradientRead(zs, 1, True)])
    runner.qk_fix("clean", [SenderChange((c[h],), "mean") for h in heads], reads)
    kept = runner._qk_layers["clean"]
    keys = {k[0] if isinstance(k, tuple) else k for per in kept.values() for lm in per.values() for k in lm}
    assert "cross" in keys and not keys & {"M", "read from"}
    noising = [SenderChange((c[h],), "corrupted") for h in heads] + [SenderChange((c["MLP0"],), "corrupted")]
    hits.clear()
    got = runner.qk_fix("clean", noising, reads)
    assert hits and all(hits)
    fresh, _ = make_runner(m, t, "logit_diff")
    want = fresh.qk_fix("clean", noising, fresh.gradients("clean", [GradientRead(zs, None, True),
                                                                     GradientRead(zs, 1, True)]))
    assert (want[0].abs().amax(-1) > 1e-6).all()
    _close(got, want, 1e-12)
    runner.qk_fix("corrupted", noising[:1], runner.gradients("corrupted", [GradientRead(zs, None, True)]))
    assert set(runner._qk_layers) == {"corrupted"}


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_qk_fix_forms_the_unchanged_pattern_once_per_layer(family, plain, pattern_calls, monkeypatch):
    """Runner.qk_unchanged_once: with several chunks of changes per layer (a small token budget), the chunks after
    a layer's first run their changed copies alone against the unchanged copy's pattern kept from the first; the
    terms equal those of every chunk running it (both directions, a task with a shared prefix), and a kept pattern
    that is off changes them (the comparison can see a wrong one)."""
    m = build(family)[0]
    c = {x.name: x for x in m.components(["all", "layers"])}
    zs = tuple(Site(layer, "z") for layer in range(1, m.n_layers))
    alone: list[bool] = []
    real = Runner._composed_z

    def spy(self, *a, unchanged=True, **k):
        alone.append(not unchanged)
        return real(self, *a, unchanged=unchanged, **k)

    monkeypatch.setattr(Runner, "_composed_z", spy)
    heads = [f"L{layer}H{h}" for layer in range(m.n_layers - 1) for h in range(m.n_heads)]
    for t in (build(family)[1], prefix_task(m)):
        for source, value in (("corrupted", "clean"), ("clean", "corrupted")):
            runner, _ = make_runner(m, t, "logit_diff")
            runner.token_budget = 3 * max(len(x) for x in t.clean_ids) * len(t)  # a few copies per chunk
            reads = runner.gradients(source, [GradientRead(zs, None, True), GradientRead(zs, 1, True)])
            changes = [SenderChange((c[h],), value) for h in heads]
            got, want = _on_and_off(plain, "qk_unchanged_once", alone, functools.partial(runner.qk_fix, source, changes, reads))
            assert (want[0, :m.n_heads].abs().amax(-1) > 1e-6).all()
            _close(got, want, 1e-12)
    orig = torch.Tensor.clone
    with monkeypatch.context() as mp:  # the kept pattern a little off: the terms move
        mp.setattr(torch.Tensor, "clone", lambda x, *a, **k: orig(x, *a, **k) * 1.01)
        bad = runner.qk_fix(source, changes, reads)
    assert not torch.allclose(bad, want, rtol=0, atol=1e-6 * float(want.abs().max()))
