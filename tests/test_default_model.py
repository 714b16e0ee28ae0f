"""The shipped model solves IOI on held-out names and shows a real Hydra effect."""

import pytest

import hydra_probe as hp
from hydra_probe.zoo import DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def shipped():
    m = hp.load_default_model()
    task = hp.tasks.ioi(m, n_prompts=96, corruption="abc", seed=11, names="heldout")
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
    assert (ld > 0).mean() >= 0.95
    assert ld.mean() > 1.0


def test_top_head_is_compensated(shipped):
    m, task = shipped
    de = hp.direct_effects(m, task, components="heads").summary()
    top = de.sort_values("direct_effect").component.iloc[-1]
    sr = hp.self_repair(m, task, [top], value="mean")
    s = sr.summary().iloc[0]
    assert s.de_lost > 0.5
    assert s.total_effect <= 0.8 * s.de_lost          # >= 20 % compensated
    con = sr.contributions()
    heads = con[con.downstream.str.startswith("L")].groupby("downstream").delta_de.mean()
    assert heads.max() > 0.05                          # a downstream head's direct effect rises
