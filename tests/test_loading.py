"""Loading from a transformers object, an nnsight LanguageModel and a saved folder gives identical numbers."""

import json
import warnings

import numpy as np
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


# ---------------------------------------------------------------------------- GGUF (issue 12)
def write_gguf(hf, path, arch: str = "qwen2", tokens: list[str] | None = None, merges: list[str] | None = None
               ) -> None:
    """Write ``hf`` (a Qwen2 causal LM) as an unquantized GGUF file with the gguf package's writer; ``tokens``
    and ``merges`` add a byte-level BPE tokenizer (see :func:`byte_level_vocab`)."""
    gguf = pytest.importorskip("gguf")
    cfg = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-qwen2")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_vocab_size(cfg.vocab_size)
    if tokens is not None:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
        w.add_token_merges(merges or [])
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_pad_token_id(1)
        w.add_add_bos_token(True)
    if arch == "qwen2":
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
        for k, v in hf.state_dict().items():
            w.add_tensor(names.get_name(k, try_suffixes=(".weight", ".bias")), v.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary in which every test word with a leading space (" Mary") is one token:
    special tokens, the 256 bytes, and each word's prefixes, merged left to right (every merge's left side
    starts with the space byte, so no merge can fire inside a word)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    sp = bytes_to_unicode()
    tokens = ["<unk>", "<pad>", "<s>"] + [sp[b] for b in range(256)]
    seen, merges = set(tokens), []
    for word in tiny.WORDS:
        s = "".join(sp[b] for b in (" " + word).encode())
        for i in range(1, len(s)):
            if s[:i + 1] not in seen:
                seen.add(s[:i + 1])
                tokens.append(s[:i + 1])
                merges.append(f"{s[:i]} {s[i]}")
    return tokens, merges


def test_gguf_loads_by_path_with_the_numbers_of_the_same_weights(tmp_path):
    hf = tiny.hf_model("qwen2", layers=2, heads=4, d=32)
    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(hf, path)
    tok = tiny.tokenizer(bos=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = hp.load_model(str(path), tokenizer=tok)
    assert g.name == "tiny-qwen2.gguf" and str(tmp_path) not in g.name     # never a path on this machine
    assert g.hf_model is not hf and next(g.hf_model.parameters()).dtype == torch.float32
    a = hp.load_model(hf, tokenizer=tok)
    task = tiny.ioi(a, 4)
    for fn in (lambda m: hp.direct_effects(m, task).to_frame().direct_effect,
               lambda m: hp.self_repair(m, task, ["L0H1", "MLP0"], value="mean").contributions().delta_de):
        x, y = fn(a).to_numpy(), fn(g).to_numpy()
        assert np.abs(x - y).max() < 1e-6
    prov = hp.ablate(g, task, ["L0H1"], value="zero").provenance
    assert str(tmp_path) not in json.dumps(prov, default=str)


def test_gemma2_gguf_loads_with_the_numbers_of_the_same_weights(tmp_path):
    """A Gemma-2 GGUF (sandwich norms stored as 1 + w as llama.cpp writes them, tied embeddings, sliding
    window): the same direct effects, SOFTCAP row included, as the weights loaded as an object."""
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(0)
    cfg = tf.Gemma2Config(vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=4,
                          max_position_embeddings=64, bos_token_id=2, eos_token_id=1, pad_token_id=1,
                          initializer_range=0.2)   # transformers' GGUF defaults: soft-caps 30 / 50, scalar 256
    hf = tf.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(0.5 * torch.randn_like(p))
    path = tmp_path / "tiny-gemma2.gguf"
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_name("tiny-gemma2")
    w.add_context_length(64)
    w.add_block_count(2)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(1)
    w.add_key_length(16)
    w.add_value_length(16)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(4)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(tiny.VOCAB)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2, 2)
    for k, v in hf.state_dict().items():
        if k != "lm_head.weight":    # tied to the embedding
            x = v.detach().float() + (1.0 if "norm" in k else 0.0)
            w.add_tensor(names.get_name(k, try_suffixes=(".weight", ".bias")), x.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = tiny.tokenizer(bos=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = hp.load_model(str(path), tokenizer=tok)
    a = hp.load_model(hf, tokenizer=tok)
    assert g.family == "Gemma-2" and g.adapter.softcap == a.adapter.softcap == 30.0
    task = tiny.ioi(a, 4)
    x, y = hp.direct_effects(a, task).to_frame(), hp.direct_effects(g, task).to_frame()
    assert list(x.component) == list(y.component) and "SOFTCAP" in set(y.component)
    assert np.abs(x.direct_effect.to_numpy() - y.direct_effect.to_numpy()).max() < 1e-6


def test_gguf_errors(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    with pytest.raises(hp.InputError, match="does not exist"):
        hp.load_model(str(tmp_path / "missing.gguf"), tokenizer=tiny.tokenizer())
    # an architecture transformers cannot read
    bad = tmp_path / "odd.gguf"
    write_gguf(tiny.hf_model("qwen2", layers=1), bad, arch="rwkv6")
    with pytest.raises(hp.ArchitectureError, match="'rwkv6'.*cannot read"):
        hp.load_model(str(bad), tokenizer=tiny.tokenizer())
    # not a GGUF at all
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file")
    with pytest.raises(hp.InputError, match="not a readable GGUF"):
        hp.load_model(str(junk), tokenizer=tiny.tokenizer())
    # the optional package missing
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)
    good = tmp_path / "tiny.gguf"
    good.write_bytes(b"")
    with pytest.raises(hp.InputError, match=r"pip install 'hydra-probe\[gguf\]'"):
        hp.load_model(str(good), tokenizer=tiny.tokenizer())


def test_local_folders_are_named_by_their_own_name(tmp_path):
    hf = tiny.hf_model("gpt2")
    folder = tmp_path / "my-model"
    hf.save_pretrained(folder)
    tiny.tokenizer().save_pretrained(folder)
    m = hp.load_model(str(folder))
    assert m.name == "my-model"
    # a model object loaded from a folder keeps its configured name, without the path
    obj = tf.GPT2LMHeadModel.from_pretrained(folder)
    assert hp.load_model(obj, tokenizer=tiny.tokenizer()).name == "my-model"


def test_cli_report_on_a_gguf_file(tmp_path, capsys):
    """hydra-probe report --model file.gguf: weights and tokenizer read from the file; the report names the
    file, never its path."""
    from hydra_probe import cli

    tokens, merges = byte_level_vocab()
    hf = tiny.hf_model("qwen2", layers=2, heads=2, d=16, vocab=len(tokens))
    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(hf, path, tokens=tokens, merges=merges)
    out = tmp_path / "report"
    code = cli.main(["report", "--model", str(path), "--n-prompts", "6", "--top", "2",
                     "--components", "L0H0,L1H1,MLP0", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    text = (out / "results.json").read_text()
    assert "tiny-qwen2.gguf" in text and str(tmp_path) not in text
    assert cli.main(["ablate", "--model", str(tmp_path / "missing.gguf")]) == 2


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
