"""The mechanisms of self-repair: exact closure on every family, head rows equal to self_repair's
contributions, neurons summing to their MLP, a hand-set model with a pattern-only and a values-only
backup head, and bad input refused before any forward."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
import tiny
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

import hydra_probe as hp
from hydra_probe.models.sites import Site

COMPS = ["L0H1", "MLP0", "L1H2+L2H3"]  # a joint group across layers too
CASES = [("zero", "frozen", "pattern_first"), ("mean", "recomputed", "values_first"),
         ("resample", "frozen", "symmetric"), ("zero", "recomputed", "symmetric"),
         ("mean", "frozen", "values_first"), ("resample", "recomputed", "pattern_first")]


ALL_FAMILIES = tiny.FAMILIES + tiny.NEW_FAMILIES


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def fam(request):
    m = hp.load_model(tiny.hf_model(request.param).double(),
                      tokenizer=tiny.tokenizer(bos=request.param not in ("gpt2", "neox")))
    return request.param, m, tiny.ioi(m, 4)


def _closure(r: hp.RepairMechanisms) -> float:
    tot = r.to_frame().groupby(["component", "prompt"], sort=False)["amount"].sum()
    sr = r.self_repair_frame().set_index(["component", "prompt"])["self_repair"].reindex(tot.index)
    return float((tot - sr).abs().max())


def _head_and_mlp_rows(r: hp.RepairMechanisms) -> pd.Series:
    """Per (component, downstream, prompt): every row of a head or MLP (pattern + values, mlp, its norm row)."""
    f = r.to_frame()
    f = f[f["downstream"].str.match(r"^(L\d+H\d+|MLP\d+)$")]
    return f.groupby(["component", "downstream", "prompt"])["amount"].sum()


def test_closure_and_head_rows_every_family(fam):
    """Per prompt the amounts sum to the self-repair (1e-5, float64), every value, scale and order across families
    (each case on two families); each head's and MLP's rows equal its self_repair contribution; the frame has the
    contract's columns; block-norm and soft-cap families have their rows."""
    name, m, t = fam
    i = ALL_FAMILIES.index(name)
    attn = m.adapter.config._attn_implementation
    for value, scale, order in (CASES[i % len(CASES)],):
        r = hp.repair_mechanisms(m, t, COMPS, value=value, scale=scale, order=order)
        f = r.to_frame()
        assert list(f.columns) == ["component", "prompt", "mechanism", "downstream", "amount"]
        assert set(f["mechanism"]) <= set(hp.effects.mechanisms.MECHANISMS)
        assert r.provenance["order"] == order and r.provenance["scale"] == scale
        assert _closure(r) < 1e-5
        ref = hp.self_repair(m, t, COMPS, value=value, scale=scale)
        con = ref.contributions().set_index(["component", "downstream", "prompt"])["delta_de"]
        rows = _head_and_mlp_rows(r)
        # (self_repair runs sdpa attention, repair_mechanisms eager; Llama-like RMSNorms compute in float32 even
        # in a float64 model, so the two agree to ~1e-6 there and to ~1e-15 elsewhere)
        assert np.allclose(rows.to_numpy(), con.reindex(rows.index).to_numpy(), atol=1e-5, rtol=0)
        assert len(rows) == int(con.index.get_level_values(1).str.match(r"^(L\d+H\d+|MLP\d+)$").sum())
        # the same ablated forwards as self_repair: SR equal
        sr = ref.to_frame()["self_repair"].to_numpy()
        assert np.allclose(r.self_repair_frame()["self_repair"].to_numpy(), sr, atol=1e-5, rtol=0)
        assert np.allclose(r.as_self_repair().summary()["self_repair"], ref.summary()["self_repair"], atol=1e-5)
        assert m.adapter.config._attn_implementation == attn  # eager only inside the call
        mechs = set(f["mechanism"])
        assert ("block_norm" in mechs) == m.adapter.has_post_attn_norm
        assert ("softcap" in mechs) == (m.adapter.softcap is not None)


def test_orders_and_scales_on_one_family():
    """Every order x scale: closure; pattern + values of a head is one number (the clean-scale dDE) whatever
    the order; symmetric is the mean of the two orders; under 'frozen' the head rows need no norm row."""
    m = hp.load_model(tiny.hf_model("qwen2").double(), tokenizer=tiny.tokenizer(bos=True))
    t = tiny.ioi(m, 4)
    split = {}
    for scale in ("frozen", "recomputed"):
        for order in ("pattern_first", "values_first", "symmetric"):
            r = hp.repair_mechanisms(m, t, ["L0H0", "MLP1"], value="mean", scale=scale, order=order)
            assert _closure(r) < 1e-5
            if order == "symmetric":  # ablating at the last position only
                assert _closure(hp.repair_mechanisms(m, t, "L0H2", scale=scale, order=order, positions="last")) < 1e-5
            f = r.to_frame()
            hv = f[f["mechanism"].isin(["pattern", "values"])]
            split[scale, order] = hv.set_index(["component", "downstream", "prompt", "mechanism"])["amount"]
            if scale == "frozen":
                assert not (f["downstream"].str.startswith("L") & (f["mechanism"] == "norm")).any()
    for order in ("pattern_first", "values_first", "symmetric"):  # the split does not depend on the scale policy
        assert np.allclose(split["frozen", order], split["recomputed", order].reindex(split["frozen", order].index),
                           atol=1e-12)
    pf, vf, sy = (split["frozen", o] for o in ("pattern_first", "values_first", "symmetric"))
    assert np.allclose(sy, 0.5 * (pf + vf.reindex(pf.index)), atol=1e-12)
    tot = pf.groupby(level=[0, 1, 2]).sum()
    assert np.allclose(tot, vf.groupby(level=[0, 1, 2]).sum().reindex(tot.index), atol=1e-12)


def test_pattern_times_values_reconstruct_head_outputs_with_gqa():
    """The captured last-query weights and (grouped) values give each head's output exactly: z_h = sum_j A_hj v_g(h),j."""
    for name in ("gpt2", "neox", "mistral", "gemma"):
        m = hp.load_model(tiny.hf_model(name).double(), tokenizer=tiny.tokenizer(bos=name != "gpt2"))
        ad = m.adapter
        ids = tiny.ioi(m, 2).batch([0, 1], "clean")
        caps = {Site(l, k) for l in range(ad.n_layers) for k in ("z", "values", "attn_last")}
        with ad.eager_attention():
            p = ad.prefix(ids, capture=caps)
        assert ad.config._attn_implementation != "eager"  # restored
        for l in range(ad.n_layers):
            A, v = p.captures[Site(l, "attn_last")], p.captures[Site(l, "values")]
            B, T, _ = v.shape
            v = v.view(B, T, ad.n_kv_heads, ad.head_dim)[:, :, ad.kv_group()]
            z = torch.einsum("bjh,bjhk->bhk", A, v).reshape(B, -1)
            assert torch.allclose(z, p.captures[Site(l, "z")][:, -1], atol=1e-12)


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama"])
def test_neurons_sum_to_the_mlp_row(name):
    m = hp.load_model(tiny.hf_model(name).double(), tokenizer=tiny.tokenizer(bos=name == "llama"))
    t = tiny.ioi(m, 4)
    r = hp.neuron_contributions(m, t, "L0H1", "MLP1", value="mean")
    f = r.to_frame()
    assert list(f.columns) == ["neuron", "prompt", "delta_de"]
    N = m.adapter.W_out(1).shape[0]
    assert len(f) == 4 * N and f["neuron"].nunique() == N
    s = f.groupby("prompt")["delta_de"].sum().to_numpy()
    assert np.allclose(s, r.mlp_row()["delta_de"].to_numpy(), atol=1e-12)
    rm = hp.repair_mechanisms(m, t, "L0H1", value="mean").to_frame()
    mrow = rm[(rm["mechanism"] == "mlp") & (rm["downstream"] == "MLP1")]["amount"].to_numpy()
    assert np.allclose(s, mrow, atol=1e-8)
    top = r.summary(top=5)
    assert len(top) == 5 and {"delta_de_lo", "delta_de_hi", "role"} <= set(top.columns)
    assert top["delta_de"].abs().is_monotonic_decreasing


# ------------------------------------------------------------------ a hand-set model with known mechanisms
WORDS = ["end", "yes", "no"] + [f"a{i}" for i in range(8)] + [f"b{i}" for i in range(8)]
D, NH, DH, BIG = 12, 2, 6, 100.0
A_MARK, B_MARK, END, CARRY, FLAG, ANS_P, ANS_M, ZERO = 2, 3, 4, 5, 6, 7, 8, 9
T_HEAD, P_HEAD, V_HEAD = "L0H0", "L1H0", "L1H1"


def _handset() -> hp.HookedModel:
    """GPT-2 where T (L0H0) writes only at the last position: a FLAG and the answer.

    P (L1H0) attends from the last position to the ``b`` token while FLAG is up and to the ``a`` token
    (value: a carry c_i) when it is down: removing T moves P's pattern, never its values (T writes nothing
    at the earlier positions, and P puts exactly zero weight on the last one). V (L1H1) always attends to the
    last position only (logit gaps over 1000: exact one-hot softmaxes), whose value is -FLAG: removing T moves
    V's values, never its pattern. MLPs are zero.
    """
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    cfg = tf.GPT2Config(vocab_size=len(vocab), n_positions=8, n_embd=D, n_layer=2, n_head=NH,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=1, pad_token_id=1,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = tf.GPT2LMHeadModel(cfg).double()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        E = m.transformer.wte.weight
        E[:, 0], E[:, 1] = BIG, -BIG
        for i in range(8):
            E[vocab[f"a{i}"], A_MARK], E[vocab[f"a{i}"], CARRY] = 1.0, 1.0 + i / 7
            E[vocab[f"b{i}"], B_MARK] = 1.0
        E[vocab["end"], END] = 1.0
        sigma = BIG * (2 / D) ** 0.5
        for blk in m.transformer.h:
            blk.ln_1.weight[2:] = sigma
            blk.ln_2.weight[:] = 1.0
        m.transformer.ln_f.weight[2:] = sigma
        m.lm_head.weight[vocab["yes"], ANS_P] = 1.0
        m.lm_head.weight[vocab["no"], ANS_M] = 1.0
        # c_attn (D, 3D): q [0, D), k [D, 2D), v [2D, 3D); head h uses h*DH .. (h+1)*DH. Reading x_d - x_ZERO
        # cancels LayerNorm's centring.
        W, b = m.transformer.h[0].attn.c_attn.weight, m.transformer.h[0].attn.c_attn.bias
        b[0] = 3000.0                                          # T: attend to the end token
        W[END, D], W[ZERO, D] = 1.0, -1.0
        W[END, 2 * D], W[ZERO, 2 * D] = 1.0, -1.0              # T's value: 1 at the end token, exactly 0 elsewhere
        O = m.transformer.h[0].attn.c_proj.weight
        O[0, FLAG], O[0, ANS_P], O[0, ANS_M] = 1.0, 1.0, -1.0
        W, b = m.transformer.h[1].attn.c_attn.weight, m.transformer.h[1].attn.c_attn.bias
        b[0] = 2500.0                                          # P: query 0 prefers a ...
        W[FLAG, 1], W[ZERO, 1] = 7500.0, -7500.0               # ... query 1 prefers b when FLAG is up
        W[A_MARK, D], W[ZERO, D] = 1.0, -1.0
        W[B_MARK, D + 1], W[ZERO, D + 1] = 1.0, -1.0
        W[CARRY, 2 * D], W[ZERO, 2 * D] = 1.0, -1.0            # P's value: the carry (a tokens only)
        b[DH] = 3000.0                                         # V: attend to the end token
        W[END, D + DH], W[ZERO, D + DH] = 1.0, -1.0
        W[FLAG, 2 * D + DH], W[ZERO, 2 * D + DH] = 1.0, -1.0   # V's value: FLAG
        O = m.transformer.h[1].attn.c_proj.weight
        O[0, ANS_P], O[0, ANS_M] = 1.0, -1.0
        O[DH, ANS_P], O[DH, ANS_M] = -1.0, 1.0
    return hp.load_model(m.eval(), tokenizer=tok)


def _handset_task(m: hp.HookedModel, n: int = 6) -> hp.Task:
    r = random.Random(0)
    rows = [{"clean": f"a{i % 8} b{r.randrange(8)} end", "corrupted": f"b{r.randrange(8)} b{r.randrange(8)} end",
             "answer": " yes", "alternative": " no"} for i in range(n)]
    return hp.tasks.from_pairs(m, rows, name="mechanisms")


@pytest.mark.parametrize("order", ["pattern_first", "values_first", "symmetric"])
def test_handset_pattern_only_and_values_only(order):
    m = _handset()
    t = _handset_task(m)
    r = hp.repair_mechanisms(m, t, T_HEAD, value="zero", order=order)
    f = r.to_frame().set_index(["downstream", "mechanism", "prompt"])["amount"].sort_index()
    con = hp.self_repair(m, t, T_HEAD, value="zero").contributions().set_index(["downstream", "prompt"])["delta_de"]
    n = len(t)
    p_pat, p_val = f.loc[P_HEAD, "pattern"].to_numpy(), f.loc[P_HEAD, "values"].to_numpy()
    v_pat, v_val = f.loc[V_HEAD, "pattern"].to_numpy(), f.loc[V_HEAD, "values"].to_numpy()
    # P: its pattern alone moved (from b, value 0, to a, value c_i): compensation, all of it "pattern"
    assert np.all(con.loc[P_HEAD].to_numpy() > 0.5)
    assert np.allclose(p_pat, con.loc[P_HEAD].to_numpy(), rtol=1e-12, atol=0)
    assert np.abs(p_val).max() < 1e-12
    # V: its values alone moved (-FLAG -> 0): compensation, all of it "values"
    assert np.all(con.loc[V_HEAD].to_numpy() > 0.5)
    assert np.allclose(v_val, con.loc[V_HEAD].to_numpy(), rtol=1e-12, atol=0)
    assert np.abs(v_pat).max() < 1e-12
    assert len(p_pat) == len(v_val) == n
    assert _closure(r) < 1e-9
    s = r.summary().set_index("mechanism")
    assert s.loc["pattern", "amount"] > 0.5 and s.loc["values", "amount"] > 0.5


def test_layer_regression_and_graph_attributes():
    m = _handset()
    t = _handset_task(m)
    r = hp.repair_mechanisms(m, t, "all", value="zero")
    reg = hp.layer_regression(r)
    f = reg.to_frame()
    assert list(f["layer"]) == [0, 1]
    assert {"slope", "slope_lo", "slope_hi", "r2", "n_components"} <= set(f.columns)
    sh = reg.shares()
    lay0 = sh[sh["layer"] == 0].set_index("mechanism")["share"]
    assert lay0.sum() == pytest.approx(1.0, abs=1e-9)     # the shares of a layer sum to its self-repair
    assert lay0["pattern"] > 0.2 and lay0["values"] > 0.2
    from hydra_probe.graph import add_mechanisms, compensation_graph

    G = add_mechanisms(compensation_graph(hp.self_repair(m, t, "all", value="zero")), r)
    e = G.edges[T_HEAD, P_HEAD]
    assert e["pattern"] == pytest.approx(e["weight"], rel=1e-9) and abs(e["values"]) < 1e-9
    e = G.edges[T_HEAD, V_HEAD]
    assert e["values"] == pytest.approx(e["weight"], rel=1e-9) and abs(e["pattern"]) < 1e-9
    assert e["pattern_lo"] <= e["pattern"] <= e["pattern_hi"]


def test_save_load_round_trip(tmp_path):
    m = _handset()
    r = hp.repair_mechanisms(m, _handset_task(m), T_HEAD, value="zero", order="symmetric")
    back = hp.load_result(r.save(tmp_path / "mech.json"))
    assert isinstance(back, hp.RepairMechanisms) and back.provenance["order"] == "symmetric"
    pd.testing.assert_frame_equal(back.to_frame(), r.to_frame(), check_dtype=False)
    assert np.allclose(back.self_repair_frame()["self_repair"], r.self_repair_frame()["self_repair"])


# ------------------------------------------------------------------ bad input, refused before any forward
@pytest.fixture
def no_forward(monkeypatch):
    m = hp.load_model(tiny.hf_model("gpt2"), tokenizer=tiny.tokenizer())
    t = tiny.ioi(m, 4)

    def boom(*a, **k):
        raise AssertionError("a forward ran")
    monkeypatch.setattr(m.adapter.base, "forward", boom)
    for blk in m.adapter.blocks:
        monkeypatch.setattr(blk, "forward", boom)
    return m, t


def test_bad_input_before_any_forward(no_forward):
    m, t = no_forward
    with pytest.raises(hp.ComponentError, match="not downstream"):
        hp.neuron_contributions(m, t, "L1H0", "MLP0")
    with pytest.raises(hp.ComponentError, match="not downstream"):
        hp.neuron_contributions(m, t, "MLP1", "MLP1")
    with pytest.raises(hp.ComponentError, match="not a head or an MLP"):
        hp.neuron_contributions(m, t, "ATTN0", "MLP2")
    with pytest.raises(hp.ComponentError, match="one MLP"):
        hp.neuron_contributions(m, t, "L0H0", "L2H0")
    with pytest.raises(hp.OptionError, match="split order"):
        hp.repair_mechanisms(m, t, "L0H0", order="both")
    with pytest.raises(hp.OptionError, match="scale"):
        hp.repair_mechanisms(m, t, "L0H0", scale="own")
    with pytest.raises(hp.ComponentError):
        hp.repair_mechanisms(m, t, "RESID1")
    with pytest.raises(hp.MetricError):
        hp.repair_mechanisms(m, t, "L0H0", metric="prob")


def test_no_neuron_basis_is_refused_before_any_forward(no_forward):
    import dataclasses

    m, t = no_forward
    m.adapter.table = dataclasses.replace(m.adapter.table, mlp_out_proj=None)
    with pytest.raises(hp.ArchitectureError, match="no neuron basis"):
        hp.neuron_contributions(m, t, "L0H0", "MLP1")


def test_mlp_behind_a_post_norm_has_no_neuron_split():
    m = tiny.model("gemma2")
    with pytest.raises(hp.ArchitectureError, match="post-MLP norm"):
        hp.neuron_contributions(m, tiny.ioi(m, 4), "L0H0", "MLP1")


def test_nnsight_backend_equals_local():
    """Through nnsight (the path remote=True takes) the weights and values are computed in the trace from the
    attention call's inputs: the same amounts (more families and the loopback server: tests/test_remote_report.py)."""
    hf = tiny.hf_model("gpt2").double()
    a = hp.load_model(hf, tokenizer=tiny.tokenizer())
    b = hp.load_model(hf, tokenizer=tiny.tokenizer(), backend="nnsight")
    t = tiny.ioi(a, 4)
    fa = hp.repair_mechanisms(a, t, ["L0H0", "MLP0"]).to_frame()
    fb = hp.repair_mechanisms(b, t, ["L0H0", "MLP0"]).to_frame()
    assert list(fa["downstream"]) == list(fb["downstream"])
    assert np.allclose(fa["amount"], fb["amount"], atol=1e-9, rtol=0)


def test_figures_draw_from_result_frames():
    from hydra_probe.report import mechanism_figures as mf

    m = _handset()
    t = _handset_task(m)
    r = hp.repair_mechanisms(m, t, "all", value="zero")
    reg = hp.layer_regression(r)
    f1 = mf.mechanism_bars(r.summary(), [T_HEAD, "MLP0"], caption="c")
    f2 = mf.layer_regression_figure(reg.points(), reg.to_frame(), reg.shares(), caption="c")
    n = hp.neuron_contributions(m, t, T_HEAD, "MLP1", value="zero")
    f3 = mf.top_neurons(n.summary(top=4), mlp="MLP1", component=T_HEAD)
    assert len(f1.axes) == 1 and len(f2.axes) == 2 and len(f3.axes) == 1


def test_report_section_assembles_from_results():
    from types import SimpleNamespace

    from hydra_probe.report.why_it_repairs import mechanism_figures, mechanism_step, why_it_repairs

    class Doc:
        def __init__(self):
            self.blocks = []

        def __getattr__(self, kind):
            return lambda *a: self.blocks.append((kind, *a))

    m = _handset()
    t = _handset_task(m)
    results, notes = mechanism_step(m, t, components=[T_HEAD, "L0H1", "L1H0", "L1H1", "MLP0"], top=[T_HEAD],
                                    value="zero")
    assert set(results) == {"repair_mechanisms", "layer_regression", "neuron_contributions"} and not notes
    assert results["neuron_contributions"].provenance["component"] == T_HEAD
    figs = mechanism_figures(results, [T_HEAD])
    assert set(figs) == {"mechanism_bars", "top_neurons", "layer_regression"}
    d = Doc()
    why_it_repairs(d, SimpleNamespace(results=results, figures={k: f"{k}.png" for k in figs}, top=[T_HEAD]))
    kinds = [b[0] for b in d.blocks]
    assert d.blocks[0][:3] == ("h", 2, "Why it repairs: mechanisms of self-repair")
    assert kinds.count("fig") == 3 and kinds.count("table") == 3
    table = d.blocks[kinds.index("table")][1]
    assert table["component"].tolist() == [T_HEAD] and "pattern [95% CI]" in table.columns
