"""New tasks (gendered pronoun, greater-than) on every tokenizer kind, and the CLI's --task choices."""

from __future__ import annotations

import importlib
import re

import numpy as np
import pytest
import tiny
import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import hydra_probe as hp
from hydra_probe.cli import main
from hydra_probe.tasks.task import in_context_ids

# the task functions shadow their modules in hydra_probe.tasks (as ioi and induction do)
GT = importlib.import_module("hydra_probe.tasks.greater_than")
PR = importlib.import_module("hydra_probe.tasks.pronoun")

EXTRA = sorted(set(PR.VOCABULARY) | set(GT.VOCABULARY) | set(PR.FEMALE_NAMES) | set(PR.MALE_NAMES))
WORDS = sorted(set(tiny.WORDS) | set(EXTRA))


def word_tokenizer() -> tf.PreTrainedTokenizerFast:
    """Word-level, like tests/tiny.py, with the pronoun words too (years are whole words: unknown)."""
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]")


def bpe_tokenizer() -> tf.PreTrainedTokenizerFast:
    """Byte-level BPE in GPT-2's style: every word (with and without a leading space) one token, " 17" one token,
    and every two-digit string one token, so " 1732" is " 17" + "32" as in GPT-2. Whole pre-tokens found in the
    vocabulary are kept (``ignore_merges``); merges build the years."""
    vocab: dict[str, int] = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []

    def add(word: str, merge: bool = False) -> None:
        cur = word[0]
        for ch in word[1:]:
            if cur + ch not in vocab:
                vocab[cur + ch] = len(vocab)
            if merge and (cur, ch) not in merges:
                merges.append((cur, ch))
            cur += ch

    add("Ġ17", merge=True)
    for a in "0123456789":
        for b in "0123456789":
            add(a + b, merge=True)
    for w in WORDS:
        if re.match(r"\w", w):
            add(w)
            add("Ġ" + w)
    add("Ġ,")
    t = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def sp_tokenizer() -> tf.PreTrainedTokenizerFast:
    """tests/tiny.py's Llama-2-style tokenizer (dummy prefix, BOS) over the larger word list."""
    return tiny.sp_tokenizer(WORDS)


TOKENIZERS = {"word": (word_tokenizer, "neox"), "bpe": (bpe_tokenizer, "gpt2"), "sp": (sp_tokenizer, "llama")}


@pytest.fixture(scope="module")
def models_by_kind():
    out = {}
    for kind, (make, family) in TOKENIZERS.items():
        tok = make()
        out[kind] = hp.load_model(tiny.hf_model(family, vocab=len(tok), layers=2), tokenizer=tok)
    return out


def test_the_bpe_tokenizer_splits_years_like_gpt2():
    tok = bpe_tokenizer()
    assert tok.convert_ids_to_tokens(tok(" 1732")["input_ids"]) == ["Ġ17", "32"]
    assert tok.convert_ids_to_tokens(tok("When Mary got")["input_ids"]) == ["When", "ĠMary", "Ġgot"]


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_pronoun_builds_on_every_tokenizer(models_by_kind, kind):
    m = models_by_kind[kind]
    task = hp.tasks.pronoun(m, n_prompts=8, seed=1)
    assert len(task) == 8 and task.name == "pronoun" and task.corruption == "swap"
    she, he = (in_context_ids(m.tokenizer, p)[0] for p in (" she", " he"))
    for pair, c, k, a, b in zip(task.pairs, task.clean_ids, task.corrupted_ids, task.answer_ids, task.alternative_ids):
        name = next(n for n in PR.FEMALE_NAMES + PR.MALE_NAMES if re.search(rf"\b{n}\b", pair["clean"]))
        fem = name in PR.FEMALE_NAMES
        assert (int(a), int(b)) == ((she, he) if fem else (he, she))
        other = next(n for n in PR.FEMALE_NAMES + PR.MALE_NAMES if re.search(rf"\b{n}\b", pair["corrupted"]))
        assert (other in PR.FEMALE_NAMES) != fem                      # the swap flips the gender
        assert len(c) == len(k) and (c != k).sum() == 1                # one token differs: the name
    assert sum(p["answer"] == " she" for p in task.pairs) == 4        # balanced
    # the task runs through the effects (logit difference of the two pronouns)
    sr = hp.self_repair(m, task, ["L0H0", "MLP1"], value="mean")
    assert np.isfinite(sr.to_frame()["self_repair"]).all()


def test_pronoun_refuses_a_tokenizer_without_the_pronouns():
    m = tiny.model("gpt2")  # tests/tiny.py's vocabulary: IOI words only
    with pytest.raises(hp.TaskError, match="pronoun ' she' is not a single known token"):
        hp.tasks.pronoun(m, 8)
    with pytest.raises(hp.OptionError, match="unknown pronoun corruption"):
        hp.tasks.pronoun(m, 8, corruption="abc")


def test_pronoun_refuses_unknown_template_words(models_by_kind):
    with pytest.raises(hp.TaskError, match="does not know"):
        hp.tasks.pronoun(models_by_kind["word"], 4, templates=("{NAME} pondered the {PLACE} and",))


def test_greater_than_builds_on_byte_level_bpe(models_by_kind):
    m = models_by_kind["bpe"]
    tok = m.tokenizer
    task = hp.tasks.greater_than(m, n_prompts=12, seed=2)
    assert len(task) == 12 and task.meta["century"] == "17" and task.meta["years"] == list(range(100))
    for pair, c, k, a, b in zip(task.pairs, task.clean_ids, task.corrupted_ids, task.answer_ids, task.alternative_ids):
        yy = int(re.search(r"17(\d\d) to", pair["clean"]).group(1))
        assert 2 <= yy <= 98 and "1701 to" in pair["corrupted"]
        assert tok.convert_ids_to_tokens([int(b), int(a)]) == [f"{yy:02d}", f"{yy + 1:02d}"]
        assert tok.convert_ids_to_tokens(c.tolist())[-1] == "Ġ17" and len(c) == len(k)


def test_greater_than_metrics_on_hand_made_logits(models_by_kind):
    m = models_by_kind["bpe"]
    task = hp.tasks.greater_than(m, n_prompts=4, seed=0)
    lin, pdiff = task.meta["metric"], task.meta["prob_diff"]
    assert lin.linear and not pdiff.linear and lin.name == "greater_than_logit"
    years = GT._year_tokens(m.tokenizer, "17")
    V = m.adapter.vocab_size
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g)
    for i, yy in enumerate(int(re.search(r"17(\d\d) to", p["clean"]).group(1)) for p in task.pairs):
        after = [years[y] for y in range(yy + 1, 100)]
        upto = [years[y] for y in range(0, yy + 1)]
        want_lin = logits[i, after].mean() - logits[i, upto].mean()
        p = torch.softmax(logits[i], -1)
        want_pd = p[after].sum() - p[upto].sum()
        row = slice(i, i + 1)
        got_lin = lin(logits[row], task.answer_ids[row], task.alternative_ids[row])
        got_pd = pdiff(logits[row], task.answer_ids[row], task.alternative_ids[row])
        assert got_lin.item() == pytest.approx(want_lin.item(), abs=1e-5)
        assert got_pd.item() == pytest.approx(want_pd.item(), abs=1e-6)


def test_greater_than_linear_proxy_decomposes_exactly(models_by_kind):
    """Direct effects of every component plus the constant equal the proxy metric: the readout direction is right."""
    m = models_by_kind["bpe"]
    task = hp.tasks.greater_than(m, n_prompts=6, seed=1)
    de = hp.direct_effects(m, task, "all", metric=task.meta["metric"])
    total = de.to_frame().groupby("prompt")["direct_effect"].sum() + de.constant.set_index("prompt")["constant"]
    np.testing.assert_allclose(total.to_numpy(), de.constant["metric"].to_numpy(), atol=1e-4)
    sr = hp.self_repair(m, task, ["L0H1", "L1H2"], value="mean", metric=task.meta["metric"]).to_frame()
    assert sr["self_repair"].notna().all()
    ab = hp.ablate(m, task, ["L0H1"], value="mean", metric=task.meta["prob_diff"]).to_frame()
    assert ab["total_effect"].notna().all()


@pytest.mark.parametrize("kind", ["word", "sp"])
def test_greater_than_refuses_tokenizers_without_two_digit_years(models_by_kind, kind):
    with pytest.raises(hp.TaskError, match="does not split a year into a century token and a two-digit token"):
        hp.tasks.greater_than(models_by_kind[kind], 8)


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_induction_builds_on_every_tokenizer(models_by_kind, kind):
    task = hp.tasks.induction(models_by_kind[kind], n_prompts=4, seq_len=5)
    assert len(task) == 4


# ---------------------------------------------------------------------------- the CLI's --task choices
def test_cli_task_choices(tmp_path, capsys):
    for task in ("ioi", "induction"):
        assert main(["ablate", "--task", task, "--n-prompts", "4", "--components", "L0H1,L1H2", "--quiet"]) == 0
        out = capsys.readouterr().out
        assert f"task {task}" in out
    # the shipped model's word-level vocabulary lacks ' he' / ' she' and years: refused with exit code 2
    assert main(["ablate", "--task", "pronoun", "--n-prompts", "4", "--quiet"]) == 2
    assert "pronoun ' she' is not a single known token" in capsys.readouterr().err
    assert main(["ablate", "--task", "greater_than", "--n-prompts", "4", "--quiet"]) == 2
    assert "two-digit" in capsys.readouterr().err
    assert main(["ablate", "--task", "greater_than", "--metric", "logprob", "--quiet"]) == 2
    assert "its own metric" in capsys.readouterr().err
    assert main(["ablate", "--task", "pronoun", "--corruption", "abc", "--quiet"]) == 2
    assert "--corruption applies to --task ioi only" in capsys.readouterr().err
    assert main(["ablate", "--task", "nonsense", "--quiet"]) == 2
    assert "neither a task name" in capsys.readouterr().err


def test_cli_greater_than_and_pronoun_on_a_bpe_model_folder(tmp_path, capsys):
    tok = bpe_tokenizer()
    hf = tiny.hf_model("gpt2", vocab=len(tok), layers=2)
    folder = tmp_path / "m"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert main(["ablate", "--model", str(folder), "--task", "greater_than", "--n-prompts", "6",
                 "--components", "L0H1,MLP1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "task greater_than" in out and "metric greater_than_logit" in out
    assert main(["ablate", "--model", str(folder), "--task", "pronoun", "--n-prompts", "6", "--components", "L1H0",
                 "--quiet"]) == 0
    assert "task pronoun" in capsys.readouterr().out


def test_cli_text(tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("Then , Mary and John went to the store . John gave a ring to Mary\n"
                     "When Tom and Amy got a book at the park , Amy decided to give it to Tom\n"
                     "Kate found a key at the school\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["text", "--texts", str(texts), "--out", str(out), "--components", "L0H1,L1H2,MLP0",
                 "--top-fraction", "0.2", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["positions.csv", "runs.csv", "summary.csv", "summary.md",
                                                      "text_self_repair.json", "top_contributions.csv"]
    md = (out / "summary.md").read_text()
    assert "Self-repair on natural text" in md and "top 20 % of positions" in md and "Hydra slope" in md
    assert "Who compensates" in md
    res = hp.load_result(out / "text_self_repair.json")
    assert len(res.to_frame()) == 3 * res.provenance["n_positions"]
    assert "written to" in capsys.readouterr().out
    # refused: non-empty folder, bad fraction, undecodable bytes (line number), missing file
    assert main(["text", "--texts", str(texts), "--out", str(out), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["text", "--texts", str(texts), "--top-fraction", "0", "--out", str(tmp_path / "o2")]) == 2
    assert "(0, 1]" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Mary went to the store\n\x80 oops\n")
    assert main(["text", "--texts", str(bad), "--out", str(tmp_path / "o3")]) == 2
    assert "bad.txt:2: not valid UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()
    assert main(["text", "--texts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o4")]) == 2
    assert "does not exist" in capsys.readouterr().err
