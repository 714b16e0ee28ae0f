"""The shipped model solves IOI on held-out names and shows a real Hydra effect: the numbers its model card
(hydra_probe/zoo/default/card.json) states, measured again on the card's own prompts.

Margin: every measured number must be within 2 % (relative) of the card's, or 0.01 absolute for
accuracies and shares. The card was measured with these very prompts (the card's n_prompts, seed, names and
corruption), so the numbers agree to float32 rounding; the margin only absorbs BLAS and platform differences,
and a regression of a few per cent fails.
"""

import json

import pytest

import hydra_probe as hp
from hydra_probe.zoo import DEFAULT_MODEL_DIR

CARD = json.loads((DEFAULT_MODEL_DIR / "card.json").read_text())
REL = 0.02


def close(x: float, card: float, rel: float = REL) -> bool:
    return abs(x - card) <= rel * abs(card)


@pytest.fixture(scope="module")
def shipped():
    m = hp.load_default_model()
    task = hp.tasks.ioi(m, n_prompts=CARD["n_prompts"], corruption=CARD["corruption"], seed=CARD["seed"],
                        names=CARD["names"])
    return m, task


def test_loads_offline_in_standard_layout():
    import transformers as tf

    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size < 16e6
    hf = tf.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    m = hp.load_model("default")
    assert m.name == "hydra_probe/default-ioi" and m.family == "GPT-2"
    tok = m.tokenizer
    assert len(tok(" Mary", add_special_tokens=False).input_ids) == 1


def test_heldout_accuracy_and_logit_diff(shipped):
    m, task = shipped
    ld = hp.direct_effects(m, task).constant["metric"]
    assert (ld > 0).mean() >= CARD["accuracy"] - 0.01
    assert close(ld.mean(), CARD["logit_diff_mean"])
    assert close(ld.std(), CARD["logit_diff_std"], 0.05)


def test_top_heads_are_the_cards(shipped):
    m, task = shipped
    de = hp.direct_effects(m, task, components="heads").summary().set_index("component").direct_effect
    top = de.sort_values(ascending=False)
    assert list(top.index[:len(CARD["top_heads"])]) == [h["component"] for h in CARD["top_heads"]]
    for h in CARD["top_heads"]:
        assert close(de[h["component"]], h["direct_effect"]), h


def test_top_head_is_compensated_as_the_card_says(shipped):
    m, task = shipped
    card = CARD["ablations"]["mean"]
    sr = hp.self_repair(m, task, [CARD["top_head"]], value="mean")
    s = sr.summary().iloc[0]
    for key in ("de_lost", "total_effect", "self_repair", "norm_term"):
        assert close(s[key], card[key]), (key, s[key], card[key])
    assert s.total_effect / s.de_lost <= card["te_over_del"] + 0.01   # about half of the role is masked
    assert s.self_repair_lo > 0                                        # and beyond the interval
    con = sr.contributions()
    heads = con[con.downstream.str.startswith("L")].groupby("downstream").delta_de.mean().sort_values(ascending=False)
    want = [c for c in card["compensators"] if c["component"] != "NORM"]
    assert heads.index[0] == want[0]["component"]                      # the backup head the card names
    for c in want:
        assert close(heads[c["component"]], c["delta_de"]), c
