"""Loading from a transformers object, an nnsight LanguageModel and a saved folder gives identical numbers."""

import warnings

import pytest
import tiny
import torch
import transformers as tf

import hydra_probe as hp
from hydra_probe.errors import OptionError


@pytest.mark.parametrize("family", ["gpt2", "neox", "qwen2"])
def test_three_ways_to_load_agree(family, tmp_path):
    hf = tiny.hf_model(family)
    tok = tiny.tokenizer(bos=family != "gpt2")
    a = hp.load_model(hf, tokenizer=tok)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    # transformers 5 may pick a family tokenizer class for the folder; the tiny word-level one is generic
    b = hp.load_model(str(tmp_path), tokenizer=None if family == "gpt2" else tf.PreTrainedTokenizerFast.from_pretrained(tmp_path))
    import nnsight

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = nnsight.LanguageModel(hf, tokenizer=tok)
    c = hp.load_model(lm)
    assert c.hf_model is hf
    frames = []
    for m in (a, b, c):
        task = tiny.ioi(m, 4)
        frames.append(hp.direct_effects(m, task).to_frame().direct_effect.to_numpy())
    assert abs(frames[0] - frames[1]).max() < 1e-6
    assert abs(frames[0] - frames[2]).max() == 0


def test_wrapper_exposes_contract_attributes():
    hf = tiny.hf_model("llama", layers=2, heads=4)
    m = hp.load_model(hf, tokenizer=tiny.tokenizer(bos=True))
    assert m.hf_model is hf and m.tokenizer is not None
    assert (m.n_layers, m.n_heads, m.n_kv_heads) == (2, 4, 2)
    assert [c.name for c in m.components("mlps")] == ["MLP0", "MLP1"]
    assert len(m.components("heads")) == 8
    assert len(m.components("all")) == 10


def test_loading_refuses_pickled_weights(tmp_path):
    hf = tiny.hf_model("gpt2")
    hf.save_pretrained(tmp_path, safe_serialization=False)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    tiny.tokenizer().save_pretrained(tmp_path)
    with pytest.raises(hp.InputError, match="safetensors"):
        hp.load_model(str(tmp_path))


def test_unsupported_architecture_names_supported_ones():
    import transformers as tf

    bert = tf.BertForMaskedLM(tf.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                             intermediate_size=32, vocab_size=50))
    with pytest.raises(hp.ArchitectureError, match="gpt2.*llama|register_table"):
        hp.load_model(bert, tokenizer=tiny.tokenizer())


def test_model_without_lm_head_is_refused():
    import transformers as tf

    base = tf.GPT2Model(tf.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50))
    with pytest.raises(hp.ArchitectureError, match="causal LM"):
        hp.load_model(base, tokenizer=tiny.tokenizer())


def test_evaluating_restores_training_flags():
    hf = tiny.hf_model("gpt2")
    hf.train()
    m = hp.load_model(hf, tokenizer=tiny.tokenizer())
    task = tiny.ioi(m, 4)
    hp.ablate(m, task, ["L0H0"], value="zero")
    assert all(mod.training for mod in hf.modules())


def test_checkpoint_dtype_float32_by_default(tmp_path):
    """transformers 5 keeps a checkpoint's bfloat16; hydra_probe loads float32 unless asked (dtype='auto')."""
    hf = tiny.hf_model("llama").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    tiny.tokenizer(bos=True).save_pretrained(tmp_path)
    m = hp.load_model(str(tmp_path))
    assert next(m.hf_model.parameters()).dtype == torch.float32
    t = tiny.ioi(m, 4)
    assert hp.ablate(m, t, ["L0H1"], value="zero").provenance["dtype"] == "float32"
    assert next(hp.load_model(str(tmp_path), dtype="auto").hf_model.parameters()).dtype == torch.bfloat16
    assert next(hp.load_model(str(tmp_path), dtype=torch.float16).hf_model.parameters()).dtype == torch.float16
    with pytest.raises(OptionError, match="unknown dtype"):
        hp.load_model(str(tmp_path), dtype="fp8")
    with pytest.raises(OptionError, match="floating"):
        hp.load_model(str(tmp_path), dtype=torch.int8)


def test_token_budget_follows_free_memory(monkeypatch):
    """On the CPU the fixed 8192; on a GPU the budget scales with its free memory (torch.cuda.mem_get_info)."""
    from hydra_probe.models.wrapper import budget_for_memory
    from hydra_probe.runner import Runner

    m = tiny.model("gpt2")
    assert m.token_budget() == 8192
    t = tiny.ioi(m, 4)
    assert Runner(m, t, hp.metrics.get_metric("logit_diff")).token_budget == 8192
    assert Runner(m, t, hp.metrics.get_metric("logit_diff"), token_budget=100).token_budget == 100
    small, large = budget_for_memory(m, 2**28), budget_for_memory(m, 2**30)
    assert large == 4 * small > 1024  # proportional to the free memory
    assert budget_for_memory(m, 0) == 1024 and budget_for_memory(m, 2**50) == 262144  # clamped
    half = budget_for_memory(hp.load_model(tiny.hf_model("gpt2").half(), tokenizer=tiny.tokenizer()), 2**28)
    assert half == 2 * small  # half the bytes per token
