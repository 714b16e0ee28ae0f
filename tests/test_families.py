"""Issue 12: Gemma-2, Gemma-3, Qwen3, OLMo-2, OLMo-3, Phi-3 and StarCoder2 (sandwich / post norms, logit soft-cap,
q/k norms, sliding windows, fused projections under grouped-query attention).

Tiny random float64 models (tests/tiny.py, norm weights randomised with std 0.5 so that a wrong norm formula
shows). Checks against independent computations: the model's own logits, a plain torch-hook loop on the
transformers modules, a Llama with the same weights in separate projections, and a hand-set OLMo-2 whose
numbers are known in closed form.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import tiny
import torch
import transformers as tf
from test_handset import ROWS

import hydra_probe as hp
from hydra_probe.errors import ArchitectureError
from hydra_probe.models import ArchTable, register_table, table_for
from hydra_probe.models.tables import LLAMA

POST_NORM = {"gemma2", "gemma3", "olmo2", "olmo3"}


@functools.lru_cache(maxsize=None)
def build(family: str):
    """The tiny float64 model and a 4-prompt IOI task (two templates, two prompts each, longer than the
    sliding window of 4)."""
    m = tiny.model64(family, layers=3, heads=4, d=32)
    return m, tiny.ioi(m, 4, seed=3)


def own_metric(m, task) -> np.ndarray:
    """The model's own logit difference (its forward, soft-cap included), per prompt."""
    out = []
    for i in range(len(task)):
        with torch.no_grad():
            lg = m.hf_model(task.clean_ids[i][None]).logits[0, -1]
        out.append(float(lg[task.answer_ids[i]] - lg[task.alternative_ids[i]]))
    return np.array(out)


@pytest.mark.parametrize("family", tiny.NEW_FAMILIES)
def test_direct_effects_close_on_the_models_own_metric(family):
    m, task = build(family)
    de = hp.direct_effects(m, task, "all")
    f = de.to_frame()
    c = de.constant
    total = f.groupby("prompt").direct_effect.sum().to_numpy() + c.constant.to_numpy()
    ref = own_metric(m, task)
    assert np.abs(total - ref).max() < 1e-5
    capped = family == "gemma2"
    assert ("SOFTCAP" in set(f.component)) == capped
    if capped:   # the cap bends the metric for real here, and the raw metric is what the heads sum to
        assert np.abs(c.softcap).max() > 0.05
        heads_mlps = f[f.component != "SOFTCAP"].groupby("prompt").direct_effect.sum().to_numpy()
        assert np.abs(heads_mlps + c.constant.to_numpy() - c.raw_metric.to_numpy()).max() < 1e-5
    # whole attention layers are the sum of their heads (each head read through its layer's post norm)
    layers = hp.direct_effects(m, task, "layers").to_frame().set_index(["layer", "prompt"]).direct_effect
    heads = f[f.kind == "head"].groupby(["layer", "prompt"]).direct_effect.sum()
    assert np.abs(layers.sort_index().to_numpy() - heads.sort_index().to_numpy()).max() < 1e-9


def _layer_write(m, layer: int, z: torch.Tensor) -> torch.Tensor:
    """The attention write of ``layer`` for z, from the transformers modules directly (o_proj, post norm)."""
    blk = m.hf_model.model.layers[layer]
    a = blk.self_attn.o_proj(z)
    return blk.post_attention_layernorm(a) if hasattr(blk, "pre_feedforward_layernorm") or not hasattr(
        blk, "input_layernorm") else a


@pytest.mark.parametrize("family", sorted(POST_NORM))
def test_heads_sum_to_the_normalised_attention_output(family):
    """Per-head writes gamma_post * W_O^h z_h / sigma_post sum to the post norm's output of the layer."""
    m, task = build(family)
    from hydra_probe.models.sites import Site

    p = m.adapter.prefix(task.batch(task.groups()[0]), capture={Site(1, "z")})
    z = p.captures[Site(1, "z")]
    with torch.no_grad():
        want = _layer_write(m, 1, z)
        got = m.adapter.head_writes(1, z).sum(-2)
    assert torch.allclose(got, want, atol=1e-6)


SETS = ["L0H1", "L1H3", "MLP0", "MLP1", "ATTN1", "L0H2+L0H3", "L0H0+MLP2"]


@pytest.mark.parametrize("family", tiny.NEW_FAMILIES)
def test_self_repair_rows_close_for_every_value_and_scale(family):
    m, task = build(family)
    for value in ("zero", "mean", "resample"):
        for scale in ("frozen", "recomputed"):
            sr = hp.self_repair(m, task, SETS, value=value, scale=scale, seed=1)
            f = sr.to_frame().set_index(["component", "prompt"])
            con = sr.contributions()
            sums = con.groupby(["component", "prompt"]).delta_de.sum().reindex(f.index).to_numpy()
            assert np.abs(sums - f.self_repair.to_numpy()).max() < 1e-5, (value, scale)
            post = con[con.downstream.str.startswith("POSTNORM")]
            assert (len(post) > 0) == (family in POST_NORM)
            assert ("SOFTCAP" in set(con.downstream)) == (family == "gemma2")
            if family in POST_NORM:
                # one row per post-attention norm the ablation can change: L1H3 reaches layers 1 and 2 only
                assert set(post[post.component == "L1H3"].downstream) == {"POSTNORM1", "POSTNORM2"}
                assert set(post[post.component == "MLP1"].downstream) == {"POSTNORM2"}
                assert np.abs(post.delta_de).max() > 1e-3
            if value == "zero" and scale == "frozen":
                zero_frozen = f
    # independent check of SR = DEL - TE: TE from ablate(), DEL of a zero ablation = the clean direct effect
    te = hp.ablate(m, task, SETS, value="zero").to_frame().set_index(["component", "prompt"]).total_effect
    de = hp.direct_effects(m, task, "all").to_frame()
    for comp in ("L0H1", "MLP1", "ATTN1"):
        cols = [comp] if comp != "ATTN1" else [f"L1H{h}" for h in range(m.n_heads)]
        clean_de = de[de.component.isin(cols)].groupby("prompt").direct_effect.sum().to_numpy()
        want = clean_de - te.loc[comp].to_numpy()
        assert np.abs(zero_frozen.loc[comp].self_repair.to_numpy() - want).max() < 1e-6


@pytest.mark.parametrize("family", ["gemma2", "olmo2", "phi3"])
def test_repair_mechanisms_close(family):
    """The mechanism rows (pattern, values, mlp, norm, block_norm, softcap) sum to the self-repair; a head's
    pattern + values is its frozen contribution row (to the float32 of the models' norms: mechanisms run the
    eager attention implementation, self_repair the default one)."""
    m, task = build(family)
    r = hp.repair_mechanisms(m, task, ["L0H1", "MLP0"], value="mean")
    f = r.to_frame()
    sr = hp.self_repair(m, task, ["L0H1", "MLP0"], value="mean")
    want = sr.to_frame().set_index(["component", "prompt"]).self_repair
    got = f.groupby(["component", "prompt"]).amount.sum().reindex(want.index)
    assert np.abs(got.to_numpy() - want.to_numpy()).max() < 1e-5
    assert ("block_norm" in set(f.mechanism)) == (family in POST_NORM)
    con = sr.contributions().set_index(["component", "downstream", "prompt"]).delta_de
    pv = f[f.mechanism.isin(["pattern", "values"])].groupby(["component", "downstream", "prompt"]).amount.sum()
    assert np.abs(pv.to_numpy() - con.reindex(pv.index).to_numpy()).max() < 1e-5


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_path_patching_through_post_norms_equals_activation_patching(family):
    """Sender -> every downstream receiver (q, k, v, MLP inputs) and the logits, recomputed scale, equals
    activation patching of the sender: the sender's change goes through its layer's post-attention norm (the
    other heads' rescaling included) and, on OLMo-2, receivers read the raw residual (no pre-norms)."""
    m, task = build(family)
    for sender in ("L0H1", "ATTN1", "MLP0"):
        r = hp.path_patch(m, task, [sender], [["all", "logits"]], direction="noise", scale="recomputed").to_frame()
        a = hp.activation_patch(m, task, [sender], direction="noise", per_position=False).to_frame()
        assert np.abs(r.patched_metric.to_numpy() - a.patched_metric.to_numpy()).max() < 1e-5, sender
        assert np.abs(r.patched_metric.to_numpy() - r.baseline_metric.to_numpy()).max() > 1e-4, sender


def test_report_mechanism_step_keeps_post_normed_mlps_whole():
    """The report's 'why it repairs' step on a post-MLP-norm family notes that MLPs stay one unit (their write
    is not a sum over neurons) instead of failing in neuron_contributions."""
    from hydra_probe.report.why_it_repairs import mechanism_step

    m, task = build("olmo2")
    out, notes = mechanism_step(m, task, components=["L0H1", "MLP0"], top=["L0H1", "MLP0"])
    assert "repair_mechanisms" in out and "neuron_contributions" not in out
    assert any("post-MLP norm" in n for n in notes), notes


def _plain_zero_te(m, task, layer: int, head: int | None) -> np.ndarray:
    """Total effect of zero-ablating a head (or the MLP unit) with one plain torch hook on the transformers
    module, one full forward per prompt: the reference for the fast path (prefix reuse, replayed block calls
    with their position embeddings and per-layer sliding-window masks, stacked copies)."""
    blk = m.hf_model.model.layers[layer]
    dh = m.head_dim
    if head is not None:
        def pre(mod, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).clone()
            x[..., head * dh:(head + 1) * dh] = 0
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        h = blk.self_attn.o_proj.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        mod = getattr(blk, "post_feedforward_layernorm", None) or blk.mlp
        h = mod.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
    try:
        ablated = own_metric(m, task)
    finally:
        h.remove()
    return own_metric(m, task) - ablated


@pytest.mark.parametrize("family", tiny.NEW_FAMILIES)
def test_fast_path_equals_a_plain_hook_loop(family):
    m, task = build(family)
    got = hp.ablate(m, task, ["L1H2", "L2H0", "MLP1"], value="zero").to_frame().set_index(["component", "prompt"])
    for comp, layer, head in (("L1H2", 1, 2), ("L2H0", 2, 0), ("MLP1", 1, None)):
        want = _plain_zero_te(m, task, layer, head)
        assert np.abs(got.loc[comp].total_effect.to_numpy() - want).max() < 1e-9, comp


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "olmo3"])
def test_sliding_windows_matter_in_the_tiny_models(family):
    """The fast-path test exercises sliding windows: with a window of 4 the prompts' logits differ from
    full attention (the masks replayed per layer are not all the same)."""
    m, task = build(family)
    ids = task.clean_ids[0][None]
    assert ids.shape[1] > 6
    with torch.no_grad():
        a = m.hf_model(ids).logits[0, -1]
        cfg = m.hf_model.config
        old = cfg.sliding_window
        try:
            cfg.sliding_window = 64
            b = m.hf_model(ids).logits[0, -1]
        finally:
            cfg.sliding_window = old
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "olmo2", "phi3"])
def test_nnsight_backend_equals_local(family):
    m, task = build(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = hp.load_model(m.hf_model, tokenizer=m.tokenizer, backend="nnsight")
        comps = ["L0H1", "MLP1", "L1H0+L2H3"]
        a = hp.self_repair(m, task, comps, value="mean").contributions()
        b = hp.self_repair(n, task, comps, value="mean").contributions()
    assert list(a.downstream) == list(b.downstream)
    assert np.abs(a.delta_de.to_numpy() - b.delta_de.to_numpy()).max() < 1e-9


# ---------------------------------------------------------------------------- fused projections (Phi-3)
def _llama_and_phi3(heads: int, kv: int):
    """A Llama and a Phi-3 with the same weights: Phi-3's qkv_proj = [q; k; v], gate_up_proj = [gate; up]."""
    common = dict(vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64, rms_norm_eps=1e-6,
                  bos_token_id=2, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(**common, initializer_range=0.2)).double().eval()
    phi = tf.Phi3ForCausalLM(tf.Phi3Config(**common)).double().eval()
    sd = {}
    for k, v in llama.state_dict().items():
        sd[k] = v
    for i in range(2):
        p = f"model.layers.{i}."
        sd[p + "self_attn.qkv_proj.weight"] = torch.cat([sd.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        sd[p + "mlp.gate_up_proj.weight"] = torch.cat([sd.pop(p + "mlp.gate_proj.weight"),
                                                        sd.pop(p + "mlp.up_proj.weight")])
    phi.load_state_dict(sd, strict=True)
    tok = tiny.tokenizer(bos=True)
    return hp.load_model(llama, tokenizer=tok), hp.load_model(phi, tokenizer=tok)


@pytest.mark.parametrize("heads,kv", [(8, 2), (8, 1)])
def test_fused_qkv_slices_address_each_heads_q_k_v(heads, kv):
    """Path patching into one receiver head's q, k or v on Phi-3 (fused) equals the same on a Llama with the
    same weights in separate projections, at 4:1 and 8:1 grouped-query attention."""
    llama, phi = _llama_and_phi3(heads, kv)
    task = tiny.ioi(llama, 4, seed=2)
    for L in (llama, phi):
        assert hp.direct_effects(L, task).to_frame().direct_effect.abs().sum() > 0
    assert np.allclose(own_metric(llama, task), own_metric(phi, task), atol=1e-10)
    for which in ("q", "k", "v"):
        site, cols = phi.adapter.head_input_slice(1, 5, which)
        assert site.kind == "qkv"
        g = 5 if which == "q" else 5 // (heads // kv)
        off = {"q": 0, "k": heads * phi.head_dim, "v": (heads + kv) * phi.head_dim}[which]
        assert (cols.start, cols.stop) == (off + g * phi.head_dim, off + (g + 1) * phi.head_dim)
        a = hp.path_patch(llama, task, ["L0H3", "MLP0"], [["L1H5"], ["L1H4", "L1H6"]], receiver_input=which)
        b = hp.path_patch(phi, task, ["L0H3", "MLP0"], [["L1H5"], ["L1H4", "L1H6"]], receiver_input=which)
        pa, pb = a.to_frame().patched_metric.to_numpy(), b.to_frame().patched_metric.to_numpy()
        assert np.abs(pa - pb).max() < 1e-9, which
        assert np.abs(pa - a.to_frame().baseline_metric.to_numpy()).max() > 1e-6   # the patch did something


# ---------------------------------------------------------------------------- hand-set post-norm models
E = torch.tensor([2.0, -2.0, 0.0, 0.0])
GAMMA_POST = torch.tensor([1.0, 1.0, 0.5, 1.0])
CAP = 1.0
TOL = 1e-7   # the families' RMS norms compute in float32 even in a float64 model


def handset(family: str):
    """One post-normed layer, d_model 4, two heads of dim 2: OLMo-2 (post norms only) or Gemma-2 (sandwich
    norms, scale 1 + w, embeddings times sqrt(4) = 2, final logit soft-cap CAP).

    The block input is e = [2, -2, 0, 0] for every token; q = k = 0 (uniform attention) and v makes
    z_h = [1, 0] for both heads (Gemma-2: from the pre-norm's output [sqrt2, -sqrt2, 0, 0]); W_O makes head
    0's output a_0 = [0, 0, 2, 0] and head 1's a_1 = [0, 0, 0, -2]. The attention output a = [0, 0, 2, -2]
    has RMS sigma_p = sqrt(2); the post norm (gamma [1, 1, .5, 1]) writes [0, 0, 1/sqrt2, -sqrt2]. The MLP
    is zero. x = [2, -2, 1/sqrt2, -sqrt2], sigma_f = sqrt(2.625); u = [0, 0, 1, -1]:
    DE(L0H0) = (1/sqrt2)/sigma_f, DE(L0H1) = sqrt2/sigma_f, constant 0, raw metric (3/sqrt2)/sigma_f.
    Zero-ablating L0H0: a' = [0, 0, 0, -2], sigma_p' = 1, write' = [0, 0, 0, -2], x' = [2, -2, 0, -2],
    sigma_f' = sqrt3, raw m' = 2/sqrt3. Frozen rows: POSTNORM0 = 2 (1 - 1/sqrt2)/sigma_f (head 1 rescaled by
    its layer's post norm), NORM = 2 (1/sqrt3 - 1/sigma_f). Recomputed: POSTNORM0 = 2 (1 - 1/sqrt2)/sqrt3,
    NORM = sqrt2 (1/sqrt3 - 1/sigma_f). With the cap, logits are c tanh(raw / c) and SOFTCAP is the change
    of (metric - raw metric).
    """
    tok = tiny.tokenizer()
    common = dict(vocab_size=tiny.VOCAB, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-30, tie_word_embeddings=False,
                  bos_token_id=2, eos_token_id=1, pad_token_id=1, max_position_embeddings=32)
    if family == "olmo2":
        m = tf.Olmo2ForCausalLM(tf.Olmo2Config(**common)).double().eval()
    else:
        m = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=2, query_pre_attn_scalar=2,
                                                 final_logit_softcapping=CAP, attn_logit_softcapping=None,
                                                 sliding_window=32)).double().eval()
    blk = m.model.layers[0]
    off = 1.0 if family == "gemma2" else 0.0     # Gemma's norm scale is 1 + w
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for n in m.modules():
            if "RMSNorm" in type(n).__name__:
                n.weight.fill_(1.0 - off)
        blk.post_attention_layernorm.weight[:] = GAMMA_POST - off
        m.model.embed_tokens.weight[:] = E / (2.0 if family == "gemma2" else 1.0)
        v = 0.5 if family == "olmo2" else 1 / math.sqrt(2)     # v_h = [1, 0] from e (OLMo-2) or N_pre(e) (Gemma-2)
        blk.self_attn.v_proj.weight[0, 0] = v
        blk.self_attn.v_proj.weight[2, 0] = v
        blk.self_attn.o_proj.weight[:, 0] = torch.tensor([0.0, 0.0, 2.0, 0.0])
        blk.self_attn.o_proj.weight[:, 2] = torch.tensor([0.0, 0.0, 0.0, -2.0])
        tiny.read_mary_minus_john(m.lm_head.weight, tok)
    return hp.load_model(m, tokenizer=tok)




@pytest.mark.parametrize("family", ["olmo2", "gemma2"])
def test_handset_post_norm_model_closed_form(family):
    m = handset(family)
    task = hp.tasks.from_pairs(m, ROWS)
    sf, r2, r3 = math.sqrt(2.625), math.sqrt(2), math.sqrt(3)
    capped = family == "gemma2"

    def cap(la, lb):   # the metric from the answer's and the alternative's raw logits
        return CAP * (math.tanh(la / CAP) - math.tanh(lb / CAP)) if capped else la - lb

    metric, ablated = cap((1 / r2) / sf, -r2 / sf), cap(0.0, -2 / r3)
    raw, raw_ablated = (3 / r2) / sf, 2 / r3
    de = hp.direct_effects(m, task, "all")
    g = de.to_frame().set_index(["component", "prompt"]).direct_effect
    assert np.allclose(g.loc["L0H0"], (1 / r2) / sf, atol=TOL, rtol=0)
    assert np.allclose(g.loc["L0H1"], r2 / sf, atol=TOL, rtol=0)
    assert np.allclose(g.loc["MLP0"], 0, atol=TOL)
    assert np.allclose(de.constant.constant, 0, atol=TOL)
    assert np.allclose(de.constant.metric, metric, atol=TOL, rtol=0)
    assert np.allclose(de.constant.softcap, metric - raw, atol=TOL, rtol=0)
    if capped:
        assert abs(metric - raw) > 0.1 and np.allclose(g.loc["SOFTCAP"], metric - raw, atol=TOL, rtol=0)

    te = metric - ablated
    dl = (1 / r2) / sf
    softcap = (ablated - raw_ablated) - (metric - raw)
    want = {"frozen": {"POSTNORM0": 2 * (1 - 1 / r2) / sf, "NORM": 2 * (1 / r3 - 1 / sf), "MLP0": 0.0},
            "recomputed": {"POSTNORM0": 2 * (1 - 1 / r2) / r3, "NORM": r2 * (1 / r3 - 1 / sf), "MLP0": 0.0}}
    for scale, rows in want.items():
        if capped:
            rows["SOFTCAP"] = softcap
        sr = hp.self_repair(m, task, ["L0H0"], value="zero", scale=scale)
        f = sr.to_frame()
        assert np.allclose(f.total_effect, te, atol=TOL, rtol=0)
        assert np.allclose(f.de_lost, dl, atol=TOL, rtol=0)
        assert np.allclose(f.self_repair, dl - te, atol=TOL, rtol=0)
        con = sr.contributions()
        assert set(con.downstream) == set(rows)        # L0H1 is not downstream of L0H0: its change is POSTNORM0
        for name, v in rows.items():
            assert np.allclose(con[con.downstream == name].delta_de, v, atol=TOL, rtol=0), (scale, name)
        assert np.allclose(f.postnorm_term, rows["POSTNORM0"], atol=TOL, rtol=0)
        assert np.allclose(f.softcap_term, softcap if capped else 0.0, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------- tables and bad input
def test_unsupported_family_names_the_supported_ones_and_how_to_register():
    with pytest.raises(ArchitectureError) as e:
        table_for("mamba")
    msg = str(e.value)
    for t in ("gemma2", "gemma3_text", "qwen3", "olmo2", "olmo3", "phi3", "starcoder2", "llama"):
        assert t in msg
    assert "register_table" in msg


def test_register_table_serves_a_new_model_type():
    """A Llama-shaped family needs only a table: register one for a renamed model type and analyse it."""
    hf = tiny.hf_model("llama", layers=2, heads=4).double()
    hf.config.model_type = "my_llama"
    with pytest.raises(ArchitectureError, match="my_llama"):
        hp.load_model(hf, tokenizer=tiny.tokenizer(bos=True))
    from dataclasses import replace

    register_table(replace(LLAMA, family="MyLlama", model_types=("my_llama",)))
    try:
        m = hp.load_model(hf, tokenizer=tiny.tokenizer(bos=True))
        assert m.family == "MyLlama"
        task = tiny.ioi(m, 4)
        de = hp.direct_effects(m, task)
        total = de.to_frame().groupby("prompt").direct_effect.sum().to_numpy() + de.constant.constant.to_numpy()
        assert np.abs(total - own_metric(m, task)).max() < 1e-5
    finally:
        from hydra_probe.models import tables

        tables._REGISTRY.pop("my_llama", None)
    for bad, match in ((dict(qkv_layout="mixed"), "qkv_layout"), (dict(norm_kind="batchnorm"), "norm_kind"),
                       (dict(model_types=()), "model types"), (dict(qkv_layout="fused"), "path")):
        with pytest.raises(ArchitectureError, match=match):
            register_table(replace(LLAMA, **bad))
    with pytest.raises(ArchitectureError, match="ArchTable"):
        register_table({"family": "x"})  # type: ignore[arg-type]
    assert isinstance(table_for("gemma2"), ArchTable)


def _tiny_gemma3_vlm():
    tc = tf.Gemma3TextConfig(vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                             sliding_window=4, bos_token_id=2, eos_token_id=1, pad_token_id=1)
    vc = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=16, patch_size=8)
    torch.manual_seed(0)
    return tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(text_config=tc.to_dict(), vision_config=vc.to_dict(),
                                                             mm_tokens_per_image=4)).eval()


def test_vision_language_checkpoint(tmp_path):
    """A Gemma-3 vision-language object gets an error naming its text model; by folder its language model is
    analysed (the same modules, numbers equal to the full model's on text)."""
    vlm = _tiny_gemma3_vlm()
    tok = tiny.tokenizer(bos=True)
    with pytest.raises(ArchitectureError, match="gemma3_text.*Gemma3ForCausalLM.*text_causal_lm"):
        hp.load_model(vlm, tokenizer=tok)
    text = hp.models.text_causal_lm(vlm)
    assert text.model is vlm.model.language_model and text.lm_head is vlm.lm_head
    ids = torch.tensor([[2, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        assert torch.allclose(text(ids).logits, vlm(ids).logits, atol=1e-6)
    vlm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m = hp.load_model(str(tmp_path), tokenizer=tok)
    assert m.hf_model.config.model_type == "gemma3_text" and m.name == tmp_path.name
    back = tf.Gemma3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    task = tiny.ioi(m, 4)
    with torch.no_grad():
        for i in range(len(task)):
            ids = task.clean_ids[i][None]
            assert torch.allclose(back(ids).logits, m.hf_model(ids).logits, atol=1e-5)
