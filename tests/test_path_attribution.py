"""Path patching and attribution patching: exact consequences on tiny float64 models."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch

import hydra_probe as hp
from hydra_probe.checks import read_only

FAMILIES = ["gpt2", "neox", "llama"]  # neox: parallel residual; llama: grouped-query attention


def _model(family: str, **kw) -> hp.HookedModel:
    hf = tiny.hf_model(family, **kw).double()
    return hp.load_model(hf, tokenizer=tiny.tokenizer(bos=family in ("llama", "mistral", "gemma")))


_CACHE: dict[str, tuple] = {}


def _mt(family: str):
    if family not in _CACHE:
        m = _model(family)
        _CACHE[family] = (m, tiny.ioi(m, 4))
    return _CACHE[family]


def _no_hooks(hf) -> bool:
    return not any(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks for mod in hf.modules())


# ------------------------------------------------------------------------------------ path patching
@pytest.mark.parametrize("family", FAMILIES + ["qwen2"])
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_path_to_everything_downstream_is_activation_patching(family, direction):
    m, t = _mt(family)
    senders = ["L0H1", "MLP0", "ATTN1", "L1H2"]
    pp = hp.path_patch(m, t, senders, ["all", "logits"], direction, scale="recomputed").to_frame()
    ap = hp.activation_patch(m, t, senders, direction).to_frame()
    assert list(pp.sender) == list(ap.component)
    assert set(pp.receiver) == {"all+logits"}
    np.testing.assert_allclose(pp.patched_metric, ap.patched_metric, atol=1e-10, rtol=0)
    # and the patch did something
    assert (pp.patched_metric - pp.baseline_metric).abs().max() > 1e-6
    assert _no_hooks(m.hf_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_path_to_logits_is_the_change_of_direct_effect(family):
    m, t = _mt(family)
    senders = ["L1H2", "MLP1", "ATTN0"]
    # noise: baseline clean; the corrupted sender's direct effect at the clean scale
    pl = hp.path_patch(m, t, senders, "logits", "noise", scale="frozen").to_frame()
    dc = hp.direct_effects(m, t, senders, run="clean").to_frame()
    dx = hp.direct_effects(m, t, senders, run="corrupted", scale="frozen").to_frame()
    np.testing.assert_allclose(pl.patched_metric - pl.baseline_metric, dx.direct_effect - dc.direct_effect,
                               atol=1e-10, rtol=0)
    # denoise: baseline corrupted; the clean sender's direct effect at the corrupted run's scale
    pl = hp.path_patch(m, t, senders, "logits", "denoise", scale="frozen").to_frame()
    rx = hp.direct_effects(m, t, senders, run="corrupted", scale="recomputed")
    sig_c = hp.direct_effects(m, t, senders, run="clean").constant["sigma"].to_numpy()
    sig_x = rx.constant["sigma"].to_numpy()
    n = len(t)
    want = dc.direct_effect.to_numpy() * np.tile(sig_c / sig_x, len(senders)) - rx.to_frame().direct_effect.to_numpy()
    assert len(want) == len(senders) * n
    np.testing.assert_allclose(pl.patched_metric - pl.baseline_metric, want, atol=1e-10, rtol=0)
    # recomputed scale differs from frozen, but only through the norm
    pr = hp.path_patch(m, t, senders, "logits", "denoise", scale="recomputed").to_frame()
    assert not np.allclose(pr.patched_metric, pl.patched_metric, atol=1e-12, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_receivers_not_downstream_change_nothing(family):
    m, t = _mt(family)
    # upstream of the sender, the sender's own layer, and (neox) the same parallel layer's MLP
    pp = hp.path_patch(m, t, ["L1H2", "ATTN1"], [["L0H1", "MLP0"], ["L1H0", "L1H2"], "ATTN1"], "noise")
    f = pp.to_frame()
    assert list(dict.fromkeys(f.receiver)) == ["L0H1+MLP0", "L1H0+L1H2", "ATTN1"]
    np.testing.assert_array_equal(f.patched_metric, f.baseline_metric)
    assert (f.receivers_reached == 0).all()                     # and the result says so
    same_layer_mlp = hp.path_patch(m, t, ["L1H2"], ["MLP1"], "noise").to_frame()
    assert (same_layer_mlp.receivers_reached == (0 if m.parallel_residual else 1)).all()
    reach = hp.path_patch(m, t, ["L0H1"], [["L1H0", "L2H1", "MLP0", "logits"]], "noise").to_frame()
    assert (reach.receivers_reached == (3 if m.parallel_residual else 4)).all()
    if m.parallel_residual:
        np.testing.assert_array_equal(same_layer_mlp.patched_metric, same_layer_mlp.baseline_metric)
    else:
        assert (same_layer_mlp.patched_metric - same_layer_mlp.baseline_metric).abs().max() > 0


def _capture_z(m: hp.HookedModel, layer: int) -> tuple[list[torch.Tensor], object]:
    """Record the (edited) input of layer ``layer``'s attention output projection (test-only module paths)."""
    hf = m.hf_model
    if m.family == "GPT-2":
        mod = hf.transformer.h[layer].attn.c_proj
    elif m.family == "GPT-NeoX":
        mod = hf.gpt_neox.layers[layer].attention.dense
    else:
        mod = hf.model.layers[layer].self_attn.o_proj
    seen: list[torch.Tensor] = []
    # a forward hook sees the input after every pre-hook edit (ours copies the shadow's z)
    h = mod.register_forward_hook(read_only(lambda _m, args, _out: seen.append(args[0].detach().clone())))
    return seen, h


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_receiver_input_reaches_that_head_only(family, which):
    m, t = _mt(family)
    t1 = t.subset(t.groups()[0])  # one length group: one stacked forward
    B, dh, H = len(t1), m.head_dim, m.n_heads
    seen, h = _capture_z(m, 2)
    try:
        hp.path_patch(m, t1, ["L0H1"], ["L2H1"], "noise", receiver_input=which)
    finally:
        h.remove()
    base = seen[0]  # the clean prefix forward comes first
    path = [s for s in seen if s.shape[0] >= B][-1][:B]  # the path forward (main rows first; a shadow copy after)
    base = base[:, base.shape[1] - path.shape[1]:]  # the path forward may run the later rows only (suffix_rows)
    changed = [(path[..., i * dh:(i + 1) * dh] - base[..., i * dh:(i + 1) * dh]).abs().max().item() for i in range(H)]
    assert changed[1] > 1e-8, changed
    assert max(changed[:1] + changed[2:]) <= 1e-12, changed  # rounding: the later rows' attention (suffix_rows)
    if which != "q" and m.n_kv_heads < m.n_heads:
        assert any(s.shape[0] == 2 * B for s in seen), "a GQA k/v receiver needs a shadow copy"


def test_gqa_key_patch_matches_a_plain_two_forward_reference():
    """Patch k of one head of a group: the patched k reaches that head, the group's other head keeps its z."""
    m, t = _mt("llama")
    assert m.n_kv_heads < m.n_heads
    hf = m.hf_model
    t1 = t.subset(t.groups()[0])
    got = hp.path_patch(m, t1, ["L0H1"], ["L2H2", "L1H0"], "noise", receiver_input="k").to_frame()
    dh = m.head_dim
    ids_c, ids_x = t1.batch(range(len(t1)), "clean"), t1.batch(range(len(t1)), "corrupted")
    lay = hf.model.layers

    def z_of(ids, layer):
        out = []
        hh = lay[layer].self_attn.o_proj.register_forward_pre_hook(lambda _m, a: out.append(a[0].clone()))
        with torch.no_grad():
            hf(input_ids=ids)
        hh.remove()
        return out[0]

    cols = slice(dh, 2 * dh)
    delta = (z_of(ids_x, 0)[..., cols] - z_of(ids_c, 0)[..., cols]) @ lay[0].self_attn.o_proj.weight[:, cols].T

    def k_hook(layer, x_store):
        def fn(_m, _a, out):
            return lay[layer].self_attn.k_proj.forward(lay[layer].input_layernorm.forward(x_store[0] + delta))
        return fn

    # reference, layer by layer: forward A patches the whole k of layer 1 and keeps L1H0's z; forward B uses it;
    # then the same for layer 2 (L2H2), on top of B's stream
    zs = {}
    handles = []
    try:
        for layer, head in ((1, 0), (2, 2)):
            x_store: list[torch.Tensor] = []
            ha = [lay[layer].register_forward_pre_hook(lambda _m, a, x_store=x_store: x_store.append(a[0]) or None),
                  lay[layer].self_attn.k_proj.register_forward_hook(k_hook(layer, x_store)),
                  lay[layer].self_attn.o_proj.register_forward_pre_hook(
                      lambda _m, a, layer=layer, head=head:
                      zs.__setitem__(layer, a[0][..., head * dh:(head + 1) * dh].clone()))]
            with torch.no_grad():
                hf(input_ids=ids_c)
            for x in ha:
                x.remove()

            def put(_m, a, layer=layer, head=head):
                z = a[0].clone()
                z[..., head * dh:(head + 1) * dh] = zs[layer]
                return (z,)
            handles.append(lay[layer].self_attn.o_proj.register_forward_pre_hook(put))
        with torch.no_grad():
            lg = hf(input_ids=ids_c).logits[:, -1]
    finally:
        for x in handles:
            x.remove()
    want = (lg.gather(1, t1.answer_ids[:, None]) - lg.gather(1, t1.alternative_ids[:, None]))[:, 0]
    np.testing.assert_allclose(got.patched_metric, want.numpy(), atol=1e-10, rtol=0)
    assert _no_hooks(hf)


def test_path_patch_result_and_errors(tmp_path):
    m, t = _mt("gpt2")
    r = hp.path_patch(m, t, ["L0H1", "MLP0+L1H1"], [["L2H0", "MLP2"], "logits"], "denoise", receiver_input="v",
                      positions=[-1, -2])
    f = r.to_frame()
    for col in ("sender", "receiver", "prompt", "patched_metric", "direction", "baseline_metric", "clean_metric",
                "corrupted_metric"):
        assert col in f.columns
    assert len(f) == 2 * 2 * len(t)
    assert set(f.receiver) == {"L2H0+MLP2", "logits"}
    assert set(f.sender) == {"L0H1", "MLP0+L1H1"}
    p = r.provenance
    assert p["receiver_input"] == "v" and p["scale"] == "frozen" and p["direction"] == "denoise"
    assert p["positions"] == [-1, -2]
    s = r.summary()
    assert {"sender", "receiver", "patched_metric", "score", "score_lo", "score_hi"} <= set(s.columns)
    g = f[(f.sender == "L0H1") & (f.receiver == "logits")]
    want = ((g.patched_metric - g.corrupted_metric).mean()) / (g.clean_metric.mean() - g.corrupted_metric.mean())
    got = s[(s.sender == "L0H1") & (s.receiver == "logits")].score.iloc[0]
    assert abs(got - want) < 1e-9
    back = hp.load_result(r.save(tmp_path / "pp.json"))
    assert isinstance(back, hp.PathPatch)
    np.testing.assert_allclose(back.to_frame().patched_metric, f.patched_metric)
    with pytest.raises(hp.OptionError, match="receiver_input"):
        hp.path_patch(m, t, ["L0H1"], ["L2H0"], receiver_input="x")
    with pytest.raises(hp.ComponentError, match="sender"):
        hp.path_patch(m, t, ["RESID1"], ["L2H0"])
    with pytest.raises(hp.ComponentError, match="receiver"):
        hp.path_patch(m, t, ["L0H1"], ["RESID2"])
    with pytest.raises(hp.ComponentError):
        hp.path_patch(m, t, ["L0H1"], [])
    with pytest.raises(hp.OptionError):
        hp.path_patch(m, t, ["L0H1"], ["L2H0"], scale="own")


# ------------------------------------------------------------------------------- attribution patching
def _linear_llama(zero_last_mlp: bool) -> hp.HookedModel:
    """A Llama whose final norm has a constant scale (huge eps): the metric is linear in the last layer's writes."""
    m = _model("llama")
    hf = m.hf_model
    with torch.no_grad():
        hf.model.norm.variance_epsilon = 1e8
        hf.model.norm.weight.mul_(1e4)
        if zero_last_mlp:
            hf.model.layers[-1].mlp.down_proj.weight.zero_()
    return m


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_is_exact_when_the_metric_is_linear(direction):
    cases = [(False, ["MLP2"]), (True, ["L2H0", "L2H1", "L2H2", "L2H3", "ATTN2"])]
    for zero, comps in cases:
        m = _linear_llama(zero)
        t = tiny.ioi(m, 4)
        for p in m.hf_model.parameters():
            p.requires_grad_(False)  # deltas carry the gradient, not the parameters
        at = hp.attribution_patch(m, t, comps, direction)
        ap = hp.activation_patch(m, t, comps, direction).to_frame()
        f = at.to_frame()
        base = ap.corrupted_metric if direction == "denoise" else ap.clean_metric
        exact = (ap.patched_metric - base).to_numpy()
        assert np.abs(exact).max() > 1e-8
        np.testing.assert_allclose(f.estimate, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
        np.testing.assert_allclose(f.baseline_metric, base)
        ag = at.agreement(hp.activation_patch(m, t, comps, direction))
        if len(comps) > 1:
            assert ag["pearson"] > 0.9999 and ag["spearman"] > 0.99
        assert list(ag["disagreements"].columns) == ["component", "estimate", "exact", "difference"]
        assert _no_hooks(m.hf_model)
        assert all(p.grad is None for p in m.hf_model.parameters())


def test_attribution_result_residual_and_errors():
    m, t = _mt("gpt2")
    assert all(p.requires_grad for p in m.hf_model.parameters())
    at = hp.attribution_patch(m, t, ["all", "layers"], "denoise")
    f = at.to_frame()
    assert {"component", "prompt", "estimate", "direction", "baseline_metric", "clean_metric",
            "corrupted_metric"} <= set(f.columns)
    assert "position" not in f.columns
    assert all(p.grad is None for p in m.hf_model.parameters())
    assert _no_hooks(m.hf_model)
    np.testing.assert_allclose(f.baseline_metric, f.corrupted_metric)
    s = at.summary()
    assert (s.method == "attribution (first-order estimate)").all()
    assert {"component", "estimate", "score", "estimated_metric"} <= set(s.columns)
    row = s[s.component == "L1H1"].iloc[0]
    g = f[f.component == "L1H1"]
    gap = g.clean_metric.mean() - g.corrupted_metric.mean()
    assert abs(row.score - g.estimate.mean() / gap) < 1e-9
    # heads of a layer add up to the layer (the estimate is linear in the patch)
    per = f[f.component.str.match(r"L1H\d")].groupby("prompt").estimate.sum().to_numpy()
    np.testing.assert_allclose(per, f[f.component == "ATTN1"].estimate.to_numpy(), atol=1e-12)
    # residual stream, per position (numbered as activation patching numbers them)
    L = m.n_layers
    atr = hp.attribution_patch(m, t, ["RESID0", f"RESID{L}", "MLP1"], "denoise")
    fr = atr.to_frame()
    assert sorted(set(fr.position)) == list(range(-min(t.lengths), 0))
    final = fr[fr.component == f"RESID{L}"]
    assert (final[final.position != -1].estimate == 0).all()  # the metric reads the last position only
    ex = hp.activation_patch(m, t, [f"RESID{L}", "MLP1"], "denoise")
    ag = atr.agreement(ex)
    assert ag["n_components"] == 2 * min(t.lengths)
    assert ag["pearson"] > 0.9
    with pytest.raises(hp.InputError, match="direction"):
        at.agreement(hp.activation_patch(m, t, ["L0H1"], "noise"))
    other = hp.tasks.ioi(m, len(t), seed=t.seed + 1)  # other prompts: another claim
    with pytest.raises(hp.InputError, match=rf"task_seed {t.seed + 1} \(estimates: {t.seed}\)"):
        at.agreement(hp.activation_patch(m, other, ["L0H1"], "denoise"))
    with pytest.raises(hp.InputError, match=r"metric 'logit' \(estimates: 'logit_diff'\)"):
        at.agreement(hp.activation_patch(m, t, ["L0H1"], "denoise", metric="logit"))
    noise = hp.attribution_patch(m, t, ["L0H1"], "noise").to_frame()
    np.testing.assert_allclose(noise.baseline_metric, noise.clean_metric)


# ------------------------------------------------------------------- the runner executes path and attribution
def _oom_once(monkeypatch, method: str) -> list[int]:
    """Make Runner.<method> raise torch.OutOfMemoryError the first time it gets a stack of several copies;
    returns the list of stack sizes it was called with."""
    from hydra_probe.runner import Runner

    real = getattr(Runner, method)
    sizes: list[int] = []

    def flaky(self, g, source, copies, *a, **k):
        sizes.append(len(copies))
        if len(copies) > 1 and sizes.count(-1) == 0:
            sizes.append(-1)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, g, source, copies, *a, **k)

    monkeypatch.setattr(Runner, method, flaky)
    return sizes


def test_path_patching_retries_out_of_memory_with_half_the_stack(monkeypatch):
    m, t = _mt("llama")  # grouped-query: shadow copies count twice in the stack
    args = (m, t, ["L0H1", "MLP0", "L1H2"], [["L2H1", "MLP2"], "L2H2", "logits"], "noise")
    want = hp.path_patch(*args, receiver_input="k").to_frame()
    sizes = _oom_once(monkeypatch, "_forward")
    got = hp.path_patch(*args, receiver_input="k").to_frame()
    i = sizes.index(-1)
    assert sizes[i + 1] == max(1, sizes[i - 1] // 2), sizes  # halved, then retried
    np.testing.assert_allclose(got.patched_metric, want.patched_metric, atol=1e-12, rtol=0)


def test_attribution_retries_out_of_memory_with_half_the_stack(monkeypatch):
    m, t = _mt("gpt2")
    want = hp.attribution_patch(m, t, "all", "denoise", method="atp*").to_frame()
    sizes = _oom_once(monkeypatch, "_gradient_forward")
    got = hp.attribution_patch(m, t, "all", "denoise", method="atp*").to_frame()
    i = sizes.index(-1)
    assert sizes[i + 1] == sizes[i - 1] // 2, sizes
    np.testing.assert_allclose(got.estimate, want.estimate, atol=1e-12, rtol=0)


def test_an_edit_that_never_fires_raises(monkeypatch):
    """When the architecture table points a site at a module the forward never calls, the runner says so
    (InterventionError) for a replacement, a path delivery and a gradient read, instead of returning
    unedited numbers."""
    from hydra_probe.effects.common import make_runner
    from hydra_probe.interventions import Delivery, GradientRead, SenderChange, interventions_for
    from hydra_probe.models.sites import Site

    m = _model("gpt2")
    t = tiny.ioi(m, 4)
    runner, _ = make_runner(m, t, "logit_diff")
    for g in range(len(runner.groups)):  # the cached unedited runs, made with the real table
        for s in ("clean", "corrupted"):
            runner.prefix(g, s)
    ad = m.adapter
    real = ad._resolve  # the one site resolver
    dead = {Site(1, "z"), Site(2, "qkv"), Site(1, "mlp_out")}
    # the embedding never runs when a forward restarts at a block
    monkeypatch.setattr(ad, "_resolve", lambda site: ("transformer.wte", "input") if site in dead else real(site))
    with pytest.raises(hp.InterventionError, match="never"):
        runner.run("clean", [interventions_for(m.components(["L1H0"]), "zero", m.head_dim)])
    change = SenderChange(tuple(m.components(["L0H1"])), "corrupted")
    with pytest.raises(hp.InterventionError, match="never"):
        runner.run("clean", [(Delivery(change, "heads", 2, (1,), ("q",)),)])
    with pytest.raises(hp.InterventionError, match="never"):
        runner.gradients("clean", [GradientRead((Site(1, "mlp_out"),))])
    assert _no_hooks(m.hf_model)


# ------------------------------------------------------------------------------------------------ AtP*
def _cancelling_model() -> tuple[hp.HookedModel, hp.Task]:
    """A hand-set 2-layer GPT-2 (ReLU MLPs, norms made linear by a huge eps) in which L0H0's direct effect
    is erased by MLP1 for small changes, but MLP1 saturates (it removes at most ``cap``).

    The metric is x0 - x1 of the final residual at the last position (tokens w5 vs w6). L0H0 attends
    uniformly and writes beta = 0.1 + S/T (clean) or 0.1 (corrupted) along e0 - e1 and along a side channel
    e4 - e5, from which MLP1 writes -min(beta, cap) along e0 - e1. L0H1 writes 0.3 more along e0 - e1 in the
    clean run, unrepaired. Denoising, exactly: L0H0 +4.2, MLP1 -0.8, L0H1 +0.6, the rest 0. At the corrupted
    run MLP1 is in its linear range, so plain AtP gives L0H0 2.5 * (2 - 2) = 0; dropping layer 1's gradient
    gives its direct path, 5.0."""
    import transformers as tf

    tok = tiny.tokenizer()
    cfg = tf.GPT2Config(n_layer=2, n_head=2, n_embd=8, n_inner=4, n_positions=16, vocab_size=tiny.VOCAB,
                        activation_function="relu", layer_norm_epsilon=1e8, tie_word_embeddings=False,
                        bos_token_id=2, eos_token_id=1, pad_token_id=1)
    hf = tf.GPT2LMHeadModel(cfg).double().eval()
    S, T, cap = 10.0, 4, 0.5
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("w3", "w5", "w6")}
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        for name, p in hf.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1e4)                    # LN(x) = x - mean(x), up to var/eps ~ 1e-8
        hf.transformer.wte.weight[ids["w3"], 2] = S
        hf.transformer.wte.weight[ids["w3"], 3] = -S
        a0 = hf.transformer.h[0].attn
        a0.c_attn.weight[2, 16], a0.c_attn.weight[3, 16] = 0.5, -0.5        # L0H0 value: (x2 - x3) / 2
        a0.c_attn.bias[16] = 0.1
        a0.c_attn.weight[2, 20], a0.c_attn.weight[3, 20] = 0.06, -0.06      # L0H1 value
        a0.c_proj.weight[0, [0, 1, 4, 5]] = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
        a0.c_proj.weight[4, [0, 1]] = torch.tensor([1.0, -1.0], dtype=torch.float64)
        m1 = hf.transformer.h[1].mlp
        m1.c_fc.weight[4, :2], m1.c_fc.weight[5, :2] = 1.0, -1.0            # both neurons read 2 beta
        m1.c_fc.bias[1] = -2 * cap
        m1.c_proj.weight[0, [0, 1]] = torch.tensor([-0.5, 0.5], dtype=torch.float64)
        m1.c_proj.weight[1, [0, 1]] = torch.tensor([0.5, -0.5], dtype=torch.float64)
        hf.lm_head.weight[ids["w5"], 0] = 1.0
        hf.lm_head.weight[ids["w6"], 1] = 1.0
    m = hp.load_model(hf, tokenizer=tok)
    rows = [{"clean": f"w{a} w{b} w3 w{c}", "corrupted": f"w{a} w{b} w4 w{c}", "answer": " w5", "alternative": " w6"}
            for a, b, c in [(10, 11, 12), (13, 14, 15), (16, 17, 18), (19, 20, 21)]]
    t = hp.tasks.from_pairs(m, rows, name="cancel")
    assert set(t.lengths) == {T}
    return m, t


def test_atp_star_finds_what_cancelling_effects_hide():
    m, t = _cancelling_model()
    comps = "all"
    exact = hp.activation_patch(m, t, comps, "denoise")
    ex = exact.summary().set_index("component")["patched_metric"] - exact.to_frame().corrupted_metric.mean()
    np.testing.assert_allclose([ex["L0H0"], ex["MLP1"], ex["L0H1"]], [4.2, -0.8, 0.6], atol=1e-6)
    plain = hp.attribution_patch(m, t, comps, "denoise", exact=exact, top_k=1)
    star = hp.attribution_patch(m, t, comps, "denoise", method="atp*", exact=exact, top_k=1)
    p = plain.summary().set_index("component")["estimate"]
    s = star.summary().set_index("component")["estimate"]
    # plain AtP: L0H0 looks like nothing (its paths cancel in the gradient); the others are right
    assert abs(p["L0H0"]) < 1e-6
    np.testing.assert_allclose([p["MLP1"], p["L0H1"]], [-0.8, 0.6], atol=1e-6)
    # AtP*: GradDrop of layer 1 exposes L0H0's direct path; it ranks first, as exact patching does
    np.testing.assert_allclose([s["L0H0"], s["MLP1"], s["L0H1"]], [5.0, -0.8, 0.6], atol=1e-6)
    assert s.abs().idxmax() == ex.abs().idxmax() == "L0H0"
    f = star.to_frame()
    assert set(f[f.component == "L0H0"].dropped_layer) == {1}
    assert set(f[f.component == "L0H1"].dropped_layer) == {-1}  # equal magnitudes: no drop wins
    # the recorded agreement says the same
    assert plain.exact_agreement["exact_top_k_in_top_2k"] == 0
    assert star.exact_agreement["exact_top_k_in_top_2k"] == 1 and star.exact_agreement["recall"] == 1.0
    assert star.exact_agreement["spearman"] > plain.exact_agreement["spearman"]
    assert star.summary().method.iloc[0].startswith("AtP*")
    assert star.provenance["agreement"]["top_k"] == 1


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_atp_star_on_every_family(family):
    """The QK fix reads downstream heads' pattern changes exactly: on a model whose final norm is linear,
    last-layer writes have no downstream head and no layer to drop, so AtP* equals AtP (and both equal
    exact patching); upstream components get finite estimates in both directions."""
    m = _model(family)
    t = tiny.ioi(m, 4)
    L = m.n_layers
    last = [f"L{L - 1}H0", f"MLP{L - 1}"]
    for direction in ("denoise", "noise"):
        a = hp.attribution_patch(m, t, last + ["L0H1", "MLP0"], direction).to_frame()
        s = hp.attribution_patch(m, t, last + ["L0H1", "MLP0"], direction, method="atp*").to_frame()
        np.testing.assert_allclose(s[s.component.isin(last)].estimate, a[a.component.isin(last)].estimate,
                                   atol=1e-10, rtol=0)
        assert np.isfinite(s.estimate).all() and (s[~s.component.isin(last)].estimate.abs() > 0).any()
    assert _no_hooks(m.hf_model)


def test_atp_star_bad_input_fails_before_any_work(monkeypatch):
    from hydra_probe.runner import Runner

    m, t = _mt("gpt2")
    ran = []
    monkeypatch.setattr(Runner, "prefix", lambda *a, **k: ran.append(1))
    with pytest.raises(hp.OptionError, match="atp"):
        hp.attribution_patch(m, t, "heads", method="atp**")
    with pytest.raises(hp.MetricError, match="linear"):
        hp.attribution_patch(m, t, "heads", method="atp*", metric="logprob")
    with pytest.raises(hp.MetricError, match="zero"):
        hp.attribution_patch(m, t, "heads", "noise", metric="kl")
    with pytest.raises(hp.InputError, match="ActivationPatch"):
        hp.attribution_patch(m, t, "heads", exact="not a result")
    assert ran == []


def _pattern_only_model() -> tuple[hp.HookedModel, hp.Task]:
    """A hand-set 2-layer GPT-2 in which L0H0 acts on the metric only through L1H0's attention pattern: it
    writes along e4 - e5, which only L1H0's keys read; L1H0's query is a constant and its values are the
    tokens' values along e6 - e7 (1 for the first token, 0 otherwise); the metric reads L1H0's output
    linearly (norms made linear by a huge eps). So exact patching of L0H0 is a change of softmax, which
    plain AtP linearises and AtP*'s QK fix recomputes exactly."""
    import transformers as tf

    tok = tiny.tokenizer()
    cfg = tf.GPT2Config(n_layer=2, n_head=2, n_embd=8, n_inner=4, n_positions=16, vocab_size=tiny.VOCAB,
                        activation_function="relu", layer_norm_epsilon=1e8, tie_word_embeddings=False,
                        bos_token_id=2, eos_token_id=1, pad_token_id=1)
    hf = tf.GPT2LMHeadModel(cfg).double().eval()
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("w3", "w5", "w6", "w10")}
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        for name, p in hf.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1e4)
        wte = hf.transformer.wte.weight
        wte[ids["w3"], 2], wte[ids["w3"], 3] = 4.0, -4.0       # the signal (clean only)
        wte[ids["w10"], 6], wte[ids["w10"], 7] = 1.0, -1.0     # the first token's value
        a0, a1 = hf.transformer.h[0].attn, hf.transformer.h[1].attn
        a0.c_attn.weight[2, 16], a0.c_attn.weight[3, 16] = 0.5, -0.5  # L0H0 value: the signal
        a0.c_proj.weight[0, 4], a0.c_proj.weight[0, 5] = 1.0, -1.0    # ... written along e4 - e5
        a1.c_attn.bias[0] = 1.0                                        # L1H0 query: constant
        a1.c_attn.weight[4, 8], a1.c_attn.weight[5, 8] = 2.0, -2.0    # L1H0 key: reads e4 - e5
        a1.c_attn.weight[6, 16], a1.c_attn.weight[7, 16] = 0.5, -0.5  # L1H0 value: the token value
        a1.c_proj.weight[0, 0], a1.c_proj.weight[0, 1] = 1.0, -1.0    # ... written along the metric
        hf.lm_head.weight[ids["w5"], 0] = 1.0
        hf.lm_head.weight[ids["w6"], 1] = 1.0
    m = hp.load_model(hf, tokenizer=tok)
    rows = [{"clean": f"w10 w3 w{a} w{b}", "corrupted": f"w10 w4 w{a} w{b}", "answer": " w5", "alternative": " w6"}
            for a, b in [(11, 12), (13, 14), (15, 16)]]
    return m, hp.tasks.from_pairs(m, rows, name="pattern")


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_qk_fix_recomputes_the_softmax_exactly(direction):
    m, t = _pattern_only_model()
    exact = hp.activation_patch(m, t, ["L0H0"], direction).to_frame()
    base = exact.corrupted_metric if direction == "denoise" else exact.clean_metric
    want = (exact.patched_metric - base).to_numpy()
    plain = hp.attribution_patch(m, t, ["L0H0"], direction).to_frame().estimate.to_numpy()
    star = hp.attribution_patch(m, t, ["L0H0"], direction, method="atp*").to_frame()
    assert np.abs(want).min() > 0.2
    np.testing.assert_allclose(star.estimate, want, atol=1e-6, rtol=0)   # the softmax, recomputed
    assert np.abs(plain - want).min() > 0.05                              # the softmax, linearised
    assert (star.dropped_layer == -1).all()
    # GradDrop alone linearises the softmax like plain AtP (nothing to drop here)
    gd = hp.attribution_patch(m, t, ["L0H0"], direction, method="atp*", qk_fix=False).to_frame()
    np.testing.assert_allclose(gd.estimate, plain, atol=1e-10, rtol=0)
