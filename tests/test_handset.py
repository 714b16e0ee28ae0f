"""A hand-set GPT-2 whose direct effects and norm-driven self-repair are known in closed form.

One layer, two heads, d_model 4, head_dim 2. Every token embeds to e = [2, -2, 0, 0];
q/k/v weights are zero and the value bias is [1, 0] for both heads, so each head's
output z = [1, 0] whatever it attends to. W_O makes head 0 write [0, 0, 1.5, -1.5] and
head 1 write [0, 0, 0.5, -0.5]; the MLP is zero. The final residual is
x = [2, -2, 2, -2]: mean 0, sigma = 2. With u = W_U[A] - W_U[B] = [0, 0, 1, -1]:
DE(L0H0) = 3/2 = 1.5, DE(L0H1) = 1/2 = 0.5, constant = 0, logit diff = 2.
Zero-ablating L0H0 leaves x' = [2, -2, 0.5, -0.5], sigma' = sqrt(2.125): the metric is
1/sqrt(2.125), so TE = 2 - 1/sqrt(2.125), DEL = 1.5 and the self-repair is all final-norm:
SR = 1/sqrt(2.125) - 0.5.
"""

import math

import tiny
import torch
import transformers as tf

import hydra_probe as hp


def handset_model():
    tok = tiny.tokenizer()
    cfg = tf.GPT2Config(n_layer=1, n_head=2, n_embd=4, vocab_size=tiny.VOCAB, n_positions=16,
                        layer_norm_epsilon=1e-12, tie_word_embeddings=False, bos_token_id=2, eos_token_id=1)
    m = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for ln in (m.transformer.h[0].ln_1, m.transformer.h[0].ln_2, m.transformer.ln_f):
            ln.weight.fill_(1.0)
        m.transformer.wte.weight[:] = torch.tensor([2.0, -2.0, 0.0, 0.0])
        attn = m.transformer.h[0].attn
        attn.c_attn.bias[8:12] = torch.tensor([1.0, 0.0, 1.0, 0.0])   # v bias, both heads
        attn.c_proj.weight[0] = torch.tensor([0.0, 0.0, 1.5, -1.5])   # head 0, z dim 0
        attn.c_proj.weight[2] = torch.tensor([0.0, 0.0, 0.5, -0.5])   # head 1, z dim 0
        tiny.read_mary_minus_john(m.lm_head.weight, tok)
    return hp.load_model(m, tokenizer=tok)


ROWS = [{"clean": "Then , Tom and Amy went", "corrupted": "Then , Tom and Dan went", "answer": " Mary",
         "alternative": " John"},
        {"clean": "When Sid and Bob got", "corrupted": "When Sid and Ben got", "answer": " Mary",
         "alternative": " John"}]


def test_direct_effects_closed_form():
    m = handset_model()
    task = hp.tasks.from_pairs(m, ROWS)
    de = hp.direct_effects(m, task, components="all").to_frame().groupby("component").direct_effect
    assert abs(de.mean()["L0H0"] - 1.5) < 1e-6
    assert abs(de.mean()["L0H1"] - 0.5) < 1e-6
    assert abs(de.mean()["MLP0"]) < 1e-9
    assert de.std()["L0H0"] < 1e-9


def test_zero_ablation_self_repair_is_the_norm_closed_form():
    m = handset_model()
    task = hp.tasks.from_pairs(m, ROWS)
    sr = hp.self_repair(m, task, ["L0H0"], value="zero")
    f = sr.to_frame()
    s = 1 / math.sqrt(2.125)
    assert abs(f.total_effect - (2 - s)).max() < 1e-6
    assert abs(f.de_lost - 1.5).max() < 1e-6
    assert abs(f.self_repair - (s - 0.5)).max() < 1e-6
    assert abs(f.norm_term - (s - 0.5)).max() < 1e-6
    con = sr.contributions()
    assert set(con.downstream) == {"MLP0", "NORM"}   # L0H1 is not downstream of L0H0
    assert abs(con[con.downstream == "MLP0"].delta_de).max() < 1e-9
    # mean ablation of a constant head changes nothing (the reference reaches every position with two prompts;
    # a mean over the task alone would be degenerate at the 6-token prompt's last position, and is refused)
    ref = hp.tasks.from_pairs(m, ROWS + [{**ROWS[0], "clean": "Then , Sid and Bob went"}])
    fm = hp.self_repair(m, task, ["L0H0"], value=ref).to_frame()
    assert abs(fm.total_effect).max() < 1e-6 and abs(fm.de_lost).max() < 1e-6
