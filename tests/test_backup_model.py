"""A hand-built GPT-2 in which one head is a designed backup of another.

Prompts are three tokens, ``s{i} f{j} end``: a source token carrying a strength
v_i in [1, 2], a filler, and the position where logit(yes) - logit(no) is read.

* Head A (L0H0) attends from ``end`` to the source token, writes +-v_i on the
  answer dimensions (the metric) and raises a FLAG dimension.
* Head B (L1H0) has a query bias that prefers the source token, unless FLAG is
  up: then it attends to the filler, whose value is 0. So B writes nothing
  while A works and writes ``gain_b * v_i`` on the answer dimensions once A
  is ablated: a backup head (a backup name mover in miniature).

Two huge constant residual dimensions (+-BIG) dominate every LayerNorm's
scale, so the norms act almost linearly and the small dimensions can be set
by hand; attention logits are large enough that softmaxes saturate. Every
other head and both MLPs are zero. The tests check that the package's own
measurements recover the design: the edge A -> B with fraction ~ gain_b, a
confirmed positive interaction, and an iterated ablation that closes the gap.
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

import hydra_probe as hp
from hydra_probe.effects.iterated import iterated_ablation
from hydra_probe.graph import compensation_graph, compensators_of, iterated_from_graph, verify_edges

SRC = [f"s{i}" for i in range(8)]
FIL = [f"f{i}" for i in range(8)]
WORDS = ["end", "yes", "no"] + SRC + FIL
D, NH, DH = 10, 2, 5
BIG = 100.0
# residual dims: 0/1 +-BIG, 2 source marker, 3 filler marker, 4 carry, 5 flag, 6 answer+, 7 answer-, 8 always 0
SRC_D, FIL_D, CARRY, FLAG, ANS_P, ANS_M, ZERO = 2, 3, 4, 5, 6, 7, 8
A, B = "L0H0", "L1H0"


def _tokenizer() -> tf.PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]")


def build(gain_b: float = 1.0) -> hp.HookedModel:
    """The backup model; B restores ``gain_b`` of what A wrote."""
    tok = _tokenizer()
    cfg = tf.GPT2Config(vocab_size=len(WORDS) + 2, n_positions=8, n_embd=D, n_layer=2, n_head=NH,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=1, pad_token_id=1,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = tf.GPT2LMHeadModel(cfg)
    v = tok.get_vocab()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        E = m.transformer.wte.weight
        E[:, 0], E[:, 1] = BIG, -BIG
        for i, w in enumerate(SRC):
            E[v[w], SRC_D] = 1.0
            E[v[w], CARRY] = 1.0 + i / (len(SRC) - 1)
        for w in FIL:
            E[v[w], FIL_D] = 1.0
        sigma = BIG * (2 / D) ** 0.5  # every norm's scale, dominated by dims 0/1
        for blk in m.transformer.h:
            blk.ln_1.weight[2:] = sigma  # LayerNorm output ~ x - mean on the small dims; ignores 0/1
            blk.ln_2.weight[:] = 1.0
        m.transformer.ln_f.weight[2:] = sigma
        m.lm_head.weight[v["yes"], ANS_P] = 1.0
        m.lm_head.weight[v["no"], ANS_M] = 1.0
        # c_attn columns: q [0, D), k [D, 2D), v [2D, 3D); head h uses h*DH .. (h+1)*DH of each.
        # Readings subtract the ZERO dimension so LayerNorm's centring cancels.
        W, b = m.transformer.h[0].attn.c_attn.weight, m.transformer.h[0].attn.c_attn.bias
        b[0] = 60.0                                              # A's query: constant
        W[SRC_D, D], W[ZERO, D] = 1.0, -1.0                      # A's key: the source marker
        W[CARRY, 2 * D], W[ZERO, 2 * D] = 1.0, -1.0              # A's value 0: the carry
        W[SRC_D, 2 * D + 1], W[ZERO, 2 * D + 1] = 1.0, -1.0      # A's value 1: 1 (the flag)
        O = m.transformer.h[0].attn.c_proj.weight                # (NH*DH, D)
        O[0, ANS_P], O[0, ANS_M] = 1.0, -1.0
        O[1, FLAG] = 3.0
        W, b = m.transformer.h[1].attn.c_attn.weight, m.transformer.h[1].attn.c_attn.bias
        b[0] = 50.0                                              # B's query 0: prefer the source...
        W[FLAG, 1], W[ZERO, 1] = 50.0, -50.0                     # query 1: ...but the filler when FLAG is up
        W[SRC_D, D], W[FIL_D, D] = 1.0, -1.0                     # key 0: source - filler
        W[FIL_D, D + 1], W[SRC_D, D + 1] = 1.0, -1.0             # key 1: filler - source
        W[CARRY, 2 * D], W[ZERO, 2 * D] = 1.0, -1.0              # B's value: the carry (0 at the filler)
        O = m.transformer.h[1].attn.c_proj.weight
        O[0, ANS_P], O[0, ANS_M] = gain_b, -gain_b
    return hp.load_model(m.eval(), tokenizer=tok)


def task(model: hp.HookedModel, n: int = 16, seed: int = 0) -> hp.Task:
    r = random.Random(seed)
    rows = [{"clean": f"{SRC[i % len(SRC)]} {r.choice(FIL)} end", "corrupted": f"{r.choice(FIL)} {r.choice(FIL)} end",
             "answer": " yes", "alternative": " no"} for i in range(n)]
    return hp.tasks.from_pairs(model, rows, name="backup")


@pytest.fixture(scope="module")
def full():
    m = build(1.0)
    t = task(m)
    sr = hp.self_repair(m, t, "heads", value="zero")
    return m, t, sr, compensation_graph(sr)


def _mean(sr, comp: str, col: str) -> float:
    f = sr.to_frame()
    return float(f.loc[f["component"] == comp, col].mean())


def test_design_holds(full):
    m, t, sr, _ = full
    de = hp.direct_effects(m, t, "heads").summary().set_index("component")["direct_effect"]
    assert de[A] > 2.0                      # A carries the answer (about 3 logits: 2 * mean v * norm gain)
    assert abs(de[B]) < 1e-6                # B is silent while A works
    assert abs(_mean(sr, A, "total_effect")) < 0.01 * de[A]  # so ablating A alone seems to do nothing


@pytest.mark.parametrize("gain_b", [1.0, 0.5])
def test_edge_a_to_b_is_the_backup(full, gain_b):
    if gain_b == 1.0:
        _, _, sr, G = full
    else:
        m = build(gain_b)
        sr = hp.self_repair(m, task(m), "heads", value="zero")
        G = compensation_graph(sr)
    e = G.edges[A, B]
    del_a = _mean(sr, A, "de_lost")
    assert e["sign"] == "compensation" and e["verified"] == "untested"
    assert e["weight"] == pytest.approx(gain_b * del_a, rel=0.01)
    assert e["fraction"] == pytest.approx(gain_b, abs=0.01)
    assert e["weight_lo"] > 0 and e["q"] < 1e-3
    # nothing else compensates: the only other edge is the (tiny) norm-scale term
    others = {v: d["weight"] for v, d in G[A].items() if v != B}
    assert set(others) <= {"NORM"} and all(abs(w) < 0.01 * del_a for w in others.values())
    assert G.nodes[A]["fraction_repaired"] == pytest.approx(gain_b, abs=0.01)


def test_paired_ablation_confirms_the_edge(full):
    m, t, sr, G = full
    res = verify_edges(m, t, G, top=3)
    assert res.tested["target"].tolist() == [B]      # NORM is never tested, zero edges are not in the graph
    e = res.graph.edges[A, B]
    del_a = _mean(sr, A, "de_lost")
    assert e["verified"] == "confirmed"
    assert e["interaction"] == pytest.approx(del_a, rel=0.01)  # I = TE_AB - TE_A - TE_B ~ DEL_A - 0 - 0
    assert e["interaction_lo"] > 0.5 * del_a
    assert G.edges[A, B]["verified"] == "untested"    # the input graph is left alone
    assert res.paired.provenance["value"] == "zero"   # same ablation value as the graph
    assert compensators_of(res.graph, A) == [B]
    # the interaction is the edge itself: B's rise when A is gone, with no other part
    r = res.tested.iloc[0]
    assert r["interaction_edge"] == pytest.approx(G.edges[A, B]["weight"], rel=1e-6)
    assert r["interaction_edge"] == pytest.approx(r["interaction"], rel=0.01)
    assert abs(r["interaction_others"]) + abs(r["interaction_norm"]) < 0.01 * del_a and r["interaction_reverse"] == 0


def test_iterated_ablation_closes_the_gap(full):
    m, t, sr, G = full
    it = iterated_ablation(m, t, A, [B], value="zero")
    s = it.summary().set_index("step")
    del_a = _mean(sr, A, "de_lost")
    assert s.loc[0, "ablated"] == A and s.loc[1, "ablated"] == f"{A}+{B}" and s.loc[1, "added"] == B
    assert s.loc[0, "target_de_lost"] == pytest.approx(del_a, rel=1e-9)
    assert s.loc[0, "total_effect"] < 0.01 * del_a                  # single ablation: hidden
    assert s.loc[1, "total_effect"] == pytest.approx(del_a, rel=0.01)  # with the backup gone: the full role
    assert abs(s.loc[1, "gap"]) < 0.01 * del_a and s.loc[0, "gap"] > 0.9 * del_a
    f = it.to_frame()
    assert (f["gap"] == f["target_de_lost"] - f["total_effect"]).all()
    # B alone costs nothing (it is silent while A works), so removing A once B is gone costs A's whole role
    assert s.loc[1, "target_marginal"] == pytest.approx(del_a, rel=0.01)
    assert s.loc[0, "marginal_recovered"] < 0.01 and s.loc[1, "marginal_recovered"] == pytest.approx(1, abs=0.01)
    te_b = hp.ablate(m, t, [B], value="zero").to_frame()["total_effect"].to_numpy()
    step1 = f[f["step"] == 1]
    assert step1["compensators_te"].to_numpy() == pytest.approx(te_b, abs=1e-6)
    assert (step1["target_marginal"] - (step1["total_effect"] - step1["compensators_te"])).abs().max() < 1e-12
    # the graph convenience picks B (after verification) and runs under the graph's conditions
    v = verify_edges(m, t, G)
    it2 = iterated_from_graph(m, t, v.graph, A)
    assert it2.provenance["compensators"] == [B] and it2.provenance["value"] == "zero"
    assert it2.to_frame()["total_effect"].tolist() == pytest.approx(f["total_effect"].tolist())
