"""Tiny random-weight models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

import hydra_probe as hp
from hydra_probe.tasks import ioi_templates as T

FAMILIES = ("gpt2", "neox", "llama", "mistral", "qwen2", "gemma")
# issue 12: sandwich / post norms, soft-capping, q/k norms, sliding windows, fused projections
NEW_FAMILIES = ("gemma2", "gemma3", "qwen3", "olmo2", "olmo3", "phi3", "starcoder2")

WORDS = sorted({w for t in T.TEMPLATES for w in re.findall(r"\w+|[^\w\s]", re.sub(r"\{\w+\}", " ", t))}
               | set(T.TRAIN_NAMES) | set(T.HELDOUT_NAMES) | set(T.PLACES) | set(T.OBJECTS)
               | {f"w{i}" for i in range(60)})


def tokenizer(bos: bool = False) -> tf.PreTrainedTokenizerFast:
    """Word-level tokenizer over IOI words and w0..w59; ``bos`` adds a BOS token like Llama's."""
    vocab = {"[UNK]": 0, "[PAD]": 1, "[BOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = dict(unk_token="[UNK]", pad_token="[PAD]")
    if bos:
        t.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
        kw["bos_token"] = "[BOS]"
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, **kw)


VOCAB = len(WORDS) + 3


def sp_tokenizer(vocabulary: Sequence[str] = WORDS) -> tf.PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer over ``vocabulary`` (default: the IOI words): SentencePiece word pieces ("▁Mary"),
    a dummy-prefix normalizer that puts "▁" before every text, and a BOS token. Like Llama-2's, it tokenizes
    " Mary" *alone* as two tokens ["▁", "▁Mary"] while inside a prompt the name is the single token "▁Mary"."""
    words = [w for w in vocabulary if re.match(r"\w", w)]
    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "▁": 3, **{"▁" + w: i + 4 for i, w in enumerate(words)}}
    for w in vocabulary:
        if not re.match(r"\w", w):
            vocab[w] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
                                               pre_tokenizers.Punctuation()])
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>")


def read_mary_minus_john(unembed: torch.Tensor, tok: tf.PreTrainedTokenizerFast) -> None:
    """Hand-set models with d_model 4: random unembedding rows, except " Mary" reads residual dim 2 and " John"
    dim 3, so the logit difference Mary - John is x[2] - x[3] after the final norm (in place, under no_grad)."""
    unembed.normal_()
    a, b = tok(" Mary", add_special_tokens=False).input_ids[0], tok(" John", add_special_tokens=False).input_ids[0]
    unembed[a] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    unembed[b] = torch.tensor([0.0, 0.0, 0.0, 1.0])


def hf_model(family: str, seed: int = 0, layers: int = 3, heads: int = 4, d: int = 32, vocab: int = VOCAB,
             **kw) -> torch.nn.Module:
    """A random-weight causal LM of ``family`` (eval mode)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=2, eos_token_id=1, pad_token_id=1)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_layer=layers, n_head=heads, n_embd=d, n_positions=64, **common, **kw)
        m = tf.GPT2LMHeadModel(cfg)
    elif family in NEW_FAMILIES:
        m = _new_family(family, layers, heads, d, common, kw)
    elif family == "neox":
        cfg = tf.GPTNeoXConfig(num_hidden_layers=layers, num_attention_heads=heads, hidden_size=d,
                               intermediate_size=2 * d, max_position_embeddings=64, **common, **kw)
        m = tf.GPTNeoXForCausalLM(cfg)
    else:
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM)}[family]
        extra = dict(num_key_value_heads=max(1, heads // 2), hidden_size=d, intermediate_size=2 * d,
                     max_position_embeddings=64)
        if family == "gemma":
            extra.update(head_dim=d // heads * 2 // 2, num_key_value_heads=1)
        extra.update(kw)
        m = cls[1](cls[0](num_hidden_layers=layers, num_attention_heads=heads, **common, **extra))
    # make biases and norm weights non-trivial so decompositions are tested for real
    # (the new families' norms get larger noise, so that a wrong norm formula shows)
    noise = 0.5 if family in NEW_FAMILIES else 0.1
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(noise * torch.randn_like(p))
    return m.eval()


def _new_family(family: str, layers: int, heads: int, d: int, common: dict, kw: dict) -> torch.nn.Module:
    """Tiny configs of the issue-12 families, float32 (cast with ``.double()`` for exact tests).

    Defaults: grouped-query attention with one key/value head per four query heads where the head count
    allows (Gemma, Phi-3), head_dim != d_model / heads (Gemma), sliding windows shorter than the prompts
    (Gemma-2/3, OLMo-3, alternate layers), Gemma-2's final logit soft-cap and attention soft-cap at 1 (small, so
    that both bend the numbers of a random model; weights drawn with std 0.2), q/k norms (Gemma-3, Qwen3, OLMo-2).
    """
    kv = max(1, heads // 4)
    base = dict(num_hidden_layers=layers, num_attention_heads=heads, hidden_size=d, intermediate_size=2 * d,
                max_position_embeddings=64, initializer_range=0.2, **common)
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if family == "gemma2":
        cfg = tf.Gemma2Config(**base, num_key_value_heads=kv, head_dim=16, sliding_window=4, layer_types=types,
                              final_logit_softcapping=1.0, attn_logit_softcapping=1.0, query_pre_attn_scalar=16)
        cls = tf.Gemma2ForCausalLM
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(**base, num_key_value_heads=kv, head_dim=16, sliding_window=4,
                                  layer_types=types, query_pre_attn_scalar=16)
        cls = tf.Gemma3ForCausalLM
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**base, num_key_value_heads=max(1, heads // 2), head_dim=8)
        cls = tf.Qwen3ForCausalLM
    elif family == "olmo2":
        cfg = tf.Olmo2Config(**base, num_key_value_heads=max(1, heads // 2))
        cls = tf.Olmo2ForCausalLM
    elif family == "olmo3":
        cfg = tf.Olmo3Config(**base, num_key_value_heads=max(1, heads // 2), sliding_window=4, layer_types=types)
        cls = tf.Olmo3ForCausalLM
    elif family == "phi3":
        cfg = tf.Phi3Config(**base, num_key_value_heads=kv)
        cls = tf.Phi3ForCausalLM
    else:
        cfg = tf.Starcoder2Config(**base, num_key_value_heads=max(1, heads // 2), norm_epsilon=1e-5)
        cls = tf.Starcoder2ForCausalLM
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cls(cfg)


def model(family: str, seed: int = 0, **kw) -> hp.HookedModel:
    """The HookedModel of a tiny ``family`` model; llama-like families get a BOS-adding tokenizer."""
    bos = family in ("llama", "mistral", "gemma") or family in NEW_FAMILIES
    return hp.load_model(hf_model(family, seed, **kw), tokenizer=tokenizer(bos=bos))


def model64(family: str, seed: int = 0, **kw) -> hp.HookedModel:
    """Like :func:`model`, in float64 (for closures to 1e-5 and below)."""
    return hp.load_model(hf_model(family, seed, **kw).double(), tokenizer=tokenizer(bos=True))


def ioi(m: hp.HookedModel, n: int = 8, seed: int = 0, corruption: str = "abc") -> hp.Task:
    return hp.tasks.ioi(m, n_prompts=n, corruption=corruption, seed=seed)
