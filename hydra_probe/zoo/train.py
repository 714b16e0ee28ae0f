"""Train the shipped default model: a small word-level GPT-2 that solves IOI.

Run::

    python -m hydra_probe.zoo.train --out hydra_probe/zoo/default --seed 0

What it does
------------
* **Tokenizer.** A word-level ``tokenizers`` model (``WordLevel`` +
  ``Whitespace`` pre-tokenizer, so "," and "." are their own tokens) whose
  vocabulary is the special tokens ``[UNK] [PAD] [EOS]`` plus every word and
  punctuation mark of :mod:`hydra_probe.tasks.ioi_templates`. It is saved as a
  ``PreTrainedTokenizerFast`` (no BOS is ever added; ``" Mary"`` is one token).
* **Data.** Generated on the fly. Each training sequence packs a few
  sentences (the first one at position 0, like evaluation prompts): IOI
  sentences built from ``TEMPLATES`` with ``TRAIN_NAMES`` only, completed with
  the indirect object and a period ("... John gave a ring to Mary."), and
  filler sentences from ``FILLER_TEMPLATES`` that use *all* names (train and
  held-out), drawn from a small per-sequence pool so that names recur. Held-out
  names thus get trained embeddings, and practise being copied, but never occur
  in an IOI sentence. The loss is the ordinary next-token loss; the position
  that predicts the IO name is up-weighted (``--io-weight``) and can optionally
  get a soft target (``--io-smoothing``).
* **Head dropout.** Every layer's ``z`` (the concatenated head outputs, the
  input of the attention output projection) has whole heads zeroed,
  independently per sequence and head, with probability ``--head-dropout`` (in
  a ``--head-dropout-seq-frac`` share of the sequences). The surviving heads
  are *not* rescaled: training sees exactly what a zero ablation looks like,
  which rewards downstream heads that step in when an upstream head is missing
  (the Hydra / self-repair effect).
* **MLP dropout.** A whole MLP output is zeroed per sequence with
  probability ``--mlp-dropout``. Without it (and with narrow heads) the MLPs
  end up writing almost all of the answer and attention heads have next to no
  direct effect; with it, name-mover heads carry the logit difference. Both
  dropouts are edits of the sites ``z`` and ``mlp_out``, placed by the model
  adapter (module paths come from the architecture table) and removed before
  saving.
* **Self-check.** On IOI prompts built from ``HELDOUT_NAMES`` the script
  measures, through the package's own API (a task from
  ``hydra_probe.tasks.from_pairs``, ``direct_effects``, ``self_repair``),
  accuracy and logit difference, per-head direct effects (DE) at the last
  position, and mean-ablates the head with the largest mean DE to get the
  total effect (TE), the direct effect lost (DEL), their ratio and the
  downstream heads whose DE rises. Everything goes to ``training.json``.
  ``--check-only`` reruns it on a saved model.

The run is deterministic given ``--seed`` and ``--threads`` (the thread
count changes the float reduction order and hence the trajectory; the shipped
model is seed 0 on 2 threads, about 6-7 minutes on 2 idle CPU cores, about
16 minutes on one). Other seeds and thread counts give other weights but, in
the runs recorded in ``training.json`` "attempts", models meeting the same bars.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from hydra_probe.effects import direct_effects, self_repair
from hydra_probe.errors import TaskError
from hydra_probe.models import HookedModel
from hydra_probe.models.adapter import Adapter
from hydra_probe.models.sites import Site
from hydra_probe.tasks import from_pairs
from hydra_probe.tasks.ioi_templates import (
    FILLER_TEMPLATES,
    HELDOUT_NAMES,
    OBJECTS,
    PLACES,
    TEMPLATES,
    TRAIN_NAMES,
)

SPECIAL_TOKENS: tuple[str, ...] = ("[UNK]", "[PAD]", "[EOS]")
ALL_NAMES: tuple[str, ...] = TRAIN_NAMES + HELDOUT_NAMES
PLACEHOLDERS: tuple[str, ...] = ("{A}", "{B}", "{S}", "{PLACE}", "{OBJECT}")


# --------------------------------------------------------------------------- #
# Recipe
# --------------------------------------------------------------------------- #
@dataclass
class Recipe:
    """All hyperparameters of one training run (stored in ``training.json``).

    The defaults are the recipe of the shipped model (see the ``attempts`` list
    in ``default/training.json`` for what else was tried).
    """

    n_layer: int = 4
    n_head: int = 8
    d_model: int = 128
    mlp_ratio: float = 1.0  # MLP width = int(mlp_ratio * d_model)
    n_positions: int = 64
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    head_dropout: float = 0.2
    head_dropout_seq_frac: float = 0.5
    mlp_dropout: float = 0.6
    ioi_frac: float = 0.5
    max_sentences: int = 8
    filler_pool: int = 3
    io_weight: float = 5.0
    io_smoothing: float = 0.0
    seed: int = 0
    # Results depend on the thread count (float reduction order), not only on the
    # seed: the shipped model is seed 0 on 2 threads.
    threads: int = 2
    eval_every: int = 250


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=None)
def _pre_tokenizer() -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Whitespace()


def _words(text: str) -> list[str]:
    """Split ``text`` exactly like the tokenizer's ``Whitespace`` pre-tokenizer."""
    return [w for w, _ in _pre_tokenizer().pre_tokenize_str(text)]


def build_vocab() -> dict[str, int]:
    """Return the word-level vocabulary (token -> id) in a deterministic order.

    Special tokens first, then template/filler words and punctuation in order
    of first appearance, then names (train, held-out), places and objects.
    """
    vocab: dict[str, int] = {}

    def add(word: str) -> None:
        if word not in vocab:
            vocab[word] = len(vocab)

    for tok in SPECIAL_TOKENS:
        add(tok)
    for template in TEMPLATES + FILLER_TEMPLATES:
        stripped = template
        for ph in PLACEHOLDERS:
            stripped = stripped.replace(ph, " ")
        for w in _words(stripped):
            add(w)
    add(".")  # every IOI training sentence ends with "<IO>."
    for group in (TRAIN_NAMES, HELDOUT_NAMES, PLACES, OBJECTS):
        for w in group:
            words = _words(w)
            if len(words) != 1:
                raise TaskError(f"word list entry {w!r} is not a single token of the training tokenizer")
            add(words[0])
    return vocab


def build_tokenizer(vocab: dict[str, int], max_length: int = 64) -> Any:
    """Wrap a ``WordLevel`` tokenizer for ``vocab`` as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece decoding joins tokens with spaces and (cleanup=True) removes the
    # space before "," and ".", so decode() gives natural-looking sentences.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    core.add_special_tokens(list(SPECIAL_TOKENS))
    # No post-processor: nothing (no BOS/EOS) is added around encodings.
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="[EOS]",
        model_max_length=max_length,
    )


def check_tokenizer(tok: Any) -> dict[str, Any]:
    """Check the properties the analysis code relies on; return a summary.

    Raises ``ValueError`` if a clean prompt does not tokenize word by word,
    contains an unknown word, does not decode back to itself, gets a BOS/EOS
    added, or if any name is not a single token whose id is the same alone
    (``" Name"``) and inside a prompt.
    """
    def fail(msg: str) -> None:
        raise TaskError(f"tokenizer check failed: {msg}")

    prompt = "Then, Mary and John went to the store. John gave a ring to"
    ids = tok(prompt, add_special_tokens=True).input_ids
    if ids != [tok.convert_tokens_to_ids(w) for w in _words(prompt)]:
        fail(f"{prompt!r} -> {tok.convert_ids_to_tokens(ids)}")
    rng = random.Random(0)
    for template in TEMPLATES:
        ex = ioi_example(rng, HELDOUT_NAMES, template)
        ex_ids = tok(ex["prompt"], add_special_tokens=True).input_ids
        if tok.unk_token_id in ex_ids or len(ex_ids) != len(_words(ex["prompt"])):
            fail(f"{ex['prompt']!r} -> {tok.convert_ids_to_tokens(ex_ids)}")
        if tok.decode(ex_ids) != ex["prompt"]:
            fail(f"decode({ex['prompt']!r}) = {tok.decode(ex_ids)!r}")
    for name in ALL_NAMES:
        one = tok(" " + name, add_special_tokens=False).input_ids
        if len(one) != 1 or one[0] == tok.unk_token_id:
            fail(f"{name!r} -> {one}")
        inside = tok(f"Then, {name} and John", add_special_tokens=False).input_ids
        if inside[2] != one[0]:
            fail(f"{name!r}: {one} alone but {inside} in a prompt")
    return {
        "vocab_size": len(tok),
        "example_prompt": prompt,
        "example_ids": ids,
        "example_decoded": tok.decode(ids),
        "adds_bos": False,
    }


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def fill(template: str, a: str, b: str, s: str, place: str, obj: str) -> str:
    """Fill an IOI or filler template."""
    return template.format(A=a, B=b, S=s, PLACE=place, OBJECT=obj)


def ioi_example(rng: random.Random, names: Sequence[str], template: str | None = None,
                order: str | None = None) -> dict[str, str]:
    """Sample one IOI prompt; return dict with prompt, io, s, template, order."""
    template = template if template is not None else rng.choice(TEMPLATES)
    order = order if order is not None else rng.choice(("BABA", "ABBA"))
    io, s = rng.sample(list(names), 2)
    a, b = (s, io) if order == "BABA" else (io, s)
    prompt = fill(template, a, b, s, rng.choice(PLACES), rng.choice(OBJECTS))
    return {"prompt": prompt, "io": io, "s": s, "template": template, "order": order}


class SequenceSampler:
    """Generate token-id training sequences with the IO-predicting positions.

    A sequence packs up to ``max_sentences`` sentences (each IOI with
    probability ``ioi_frac``, else filler) into ``n_positions`` tokens and
    ends with ``[EOS]``; the first sentence always starts at position 0, as
    evaluation prompts do. Word->id lookup is done directly (identical to the
    tokenizer, which is context free at word level).
    """

    def __init__(self, vocab: dict[str, int], recipe: Recipe, rng: random.Random) -> None:
        self.vocab = vocab
        self.r = recipe
        self.rng = rng
        self.eos = vocab["[EOS]"]
        self.pad = vocab["[PAD]"]

    def _ids(self, text: str) -> list[int]:
        return [self.vocab[w] for w in _words(text)]

    def sentence(self, pool: Sequence[str]) -> tuple[list[int], tuple[int, int] | None]:
        """Return (ids, (index-in-ids of the IO name, id of S)), or (ids, None) for filler.

        Filler sentences take their names from ``pool`` (see :meth:`sequence`).
        """
        rng = self.rng
        if rng.random() < self.r.ioi_frac:
            ex = ioi_example(rng, TRAIN_NAMES)
            ids = self._ids(ex["prompt"] + " " + ex["io"] + ".")
            return ids, (len(ids) - 2, self.vocab[ex["s"]])
        a, b = rng.sample(list(pool), 2)
        text = fill(rng.choice(FILLER_TEMPLATES), a, b, a, rng.choice(PLACES), rng.choice(OBJECTS))
        return self._ids(text), None

    def sequence(self) -> tuple[list[int], list[tuple[int, int]]]:
        """Return (ids, [(position whose *next* token is an IO name, id of S)]).

        Sentences are packed until the next one would not fit (or
        ``max_sentences`` is reached), so batches carry little padding. If
        ``filler_pool >= 2``, the filler sentences of one sequence draw their
        names from a pool of 2..``filler_pool`` names (from *all* names), so
        names recur within a sequence and the model practises detecting and
        copying repeated names for held-out names too (``{A} saw`` -> the
        other pool name). ``filler_pool = 0`` samples names independently.
        """
        rng = self.rng
        k = rng.randint(2, self.r.filler_pool) if self.r.filler_pool >= 2 else len(ALL_NAMES)
        pool = rng.sample(ALL_NAMES, k)
        ids: list[int] = []
        io_pred: list[tuple[int, int]] = []
        for _ in range(self.r.max_sentences):
            sent, io_info = self.sentence(pool)
            if len(ids) + len(sent) + 1 > self.r.n_positions:
                break
            if io_info is not None:
                io_pred.append((len(ids) + io_info[0] - 1, io_info[1]))
            ids.extend(sent)
        ids.append(self.eos)
        return ids, io_pred

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return right-padded ``input_ids``, ``labels`` (-100 = ignore), loss weights
        and ``s_targets`` (the S id at positions that predict an IO name, else -100).

        ``weights`` and ``s_targets`` are aligned with the shifted targets
        (``labels[:, 1:]``).
        """
        seqs = [self.sequence() for _ in range(size)]
        length = max(len(s) for s, _ in seqs)
        input_ids = torch.full((size, length), self.pad, dtype=torch.long)
        labels = torch.full((size, length), -100, dtype=torch.long)
        weights = torch.zeros((size, length - 1))
        s_targets = torch.full((size, length - 1), -100, dtype=torch.long)
        for i, (ids, io_pred) in enumerate(seqs):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.tensor(ids)
            weights[i, : len(ids) - 1] = 1.0
            for p, s_id in io_pred:
                weights[i, p] = self.r.io_weight
                s_targets[i, p] = s_id
        return input_ids, labels, weights, s_targets


# --------------------------------------------------------------------------- #
# Head and MLP dropout (edits placed by the model adapter)
# --------------------------------------------------------------------------- #
def dropout_edits(model: Any, adapter: Any, recipe: Recipe,
                  generator: torch.Generator) -> dict[Site, Callable[[torch.Tensor], torch.Tensor]]:
    """Per-sequence head and MLP dropout as edits of the adapter's ``z`` and ``mlp_out`` sites.

    Head dropout: in training mode, for each layer a random fraction
    ``head_dropout_seq_frac`` of the sequences in a batch gets head dropout;
    in those, each head's slice of ``z`` (batch, pos, heads * head_dim) is
    zeroed with probability ``head_dropout`` for the whole sequence. MLP
    dropout: each layer's MLP output is zeroed (all positions) with
    probability ``mlp_dropout`` independently per sequence and layer. No
    rescaling. In eval mode (or with probability 0) nothing is drawn and
    nothing changes. The adapter finds the modules through the architecture
    table; :meth:`Adapter.hooks` adds the hooks and removes them on exit.
    """
    n_head, head_dim = adapter.n_heads, adapter.head_dim
    p_head, seq_frac, p_mlp = recipe.head_dropout, recipe.head_dropout_seq_frac, recipe.mlp_dropout

    def drop_heads(z: torch.Tensor) -> torch.Tensor:
        if not model.training or p_head <= 0:
            return z
        bsz, seq, width = z.shape
        drop = torch.rand((bsz, n_head), generator=generator) < p_head
        drop &= (torch.rand((bsz, 1), generator=generator) < seq_frac)
        keep = (~drop).to(z.dtype)[:, None, :, None]
        return (z.view(bsz, seq, n_head, head_dim) * keep).view(bsz, seq, width)

    def drop_mlp(out: torch.Tensor) -> torch.Tensor:
        if not model.training or p_mlp <= 0:
            return out
        keep = (torch.rand((out.shape[0], 1, 1), generator=generator) >= p_mlp).to(out.dtype)
        return out * keep

    edits: dict[Site, Callable[[torch.Tensor], torch.Tensor]] = {}
    for layer in range(adapter.n_layers):
        edits[Site(layer, "z")] = drop_heads
        edits[Site(layer, "mlp_out")] = drop_mlp
    return edits


# --------------------------------------------------------------------------- #
# Self-check: accuracy, direct effects, mean ablation of the top head
# --------------------------------------------------------------------------- #
def build_eval_prompts(names: Sequence[str], n_per_cell: int, seed: int = 12345) -> list[dict[str, str]]:
    """``n_per_cell`` prompts for every (template, order) pair, from ``names``."""
    rng = random.Random(seed)
    return [
        ioi_example(rng, names, template, order)
        for template in TEMPLATES
        for order in ("BABA", "ABBA")
        for _ in range(n_per_cell)
    ]


def _group_prompts(tok: Any, prompts: Sequence[dict[str, str]]) -> list[dict[str, torch.Tensor]]:
    """Tokenize prompts grouped by template (equal lengths, so no padding)."""
    groups: dict[str, list[dict[str, str]]] = {}
    for p in prompts:
        groups.setdefault(p["template"], []).append(p)

    def first_id(word: str) -> int:
        return tok(" " + word, add_special_tokens=False).input_ids[0]

    out = []
    for items in groups.values():
        out.append({
            "ids": torch.tensor([tok(p["prompt"], add_special_tokens=False).input_ids for p in items]),
            "io": torch.tensor([first_id(p["io"]) for p in items]),
            "s": torch.tensor([first_id(p["s"]) for p in items]),
        })
    return out


def _logit_diff(logits: torch.Tensor, io: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """logit[IO] - logit[S] per row of last-position ``logits`` (batch, vocab)."""
    return logits.gather(1, io[:, None])[:, 0] - logits.gather(1, s[:, None])[:, 0]


@torch.no_grad()
def quick_eval(model: Any, tok: Any, names: Sequence[str], n_per_cell: int = 4) -> dict[str, float]:
    """Accuracy and mean logit difference on a small IOI prompt set (plain forwards, for the
    training curve; the self-check measures through the package's API)."""
    was_training = model.training
    model.eval()
    lds = []
    for g in _group_prompts(tok, build_eval_prompts(names, n_per_cell)):
        lds.append(_logit_diff(model(input_ids=g["ids"]).logits[:, -1], g["io"], g["s"]))
    model.train(was_training)
    ld = torch.cat(lds)
    return {"accuracy": float((ld > 0).float().mean()), "mean_logit_diff": float(ld.mean())}


def eval_task(hooked: Any, names: Sequence[str], n_per_cell: int) -> tuple[Any, list[bool]]:
    """The self-check's IOI prompts as a hydra_probe task, and per prompt whether it is BABA.

    Only clean runs are read (direct effects, mean ablation), so the
    corrupted prompt of each pair is the clean one.
    """
    prompts = build_eval_prompts(names, n_per_cell)
    rows = [{"clean": p["prompt"], "corrupted": p["prompt"], "answer": " " + p["io"],
             "alternative": " " + p["s"]} for p in prompts]
    task = from_pairs(hooked, rows, name="ioi_selfcheck", corruption="none (clean runs only)")
    return task, [p["order"] == "BABA" for p in prompts]


def self_check(model: Any, tok: Any, names: Sequence[str] = HELDOUT_NAMES,
               n_per_cell: int = 13) -> dict[str, Any]:
    """Accuracy, per-head direct effects and mean ablation of the top-DE head.

    Measured with the package's own API on ``n_per_cell`` IOI prompts per
    (template, order) built from ``names`` (208 by default):
    :func:`hydra_probe.effects.direct_effects` over every head and MLP, then
    :func:`hydra_probe.effects.self_repair` of the head with the largest mean
    direct effect, mean-ablated (per-position mean over the prompts of equal
    length) at the frozen (clean) final-norm scale. Returns TE (mean drop of
    the logit difference), DEL (mean direct effect lost), their ratio, the
    final norm's share of the self-repair and every downstream head's and
    MLP's change of direct effect.
    """
    model.eval()
    hooked = HookedModel(model, tok, name="hydra_probe.zoo.train self-check")
    n_layer, n_head = hooked.n_layers, hooked.n_heads
    task, baba_list = eval_task(hooked, names, n_per_cell)
    baba = torch.tensor(baba_list)

    de = direct_effects(hooked, task, components="all", scale="frozen")
    frame = de.to_frame()
    ld = torch.tensor(de.constant["metric"].to_numpy())
    mean_by = frame.groupby("component", sort=False)["direct_effect"].mean()
    mean_de = torch.tensor([[float(mean_by[f"L{layer}H{head}"]) for head in range(n_head)]
                            for layer in range(n_layer)])
    mlp_de = torch.tensor([float(mean_by[f"MLP{layer}"]) for layer in range(n_layer)])
    top_layer, top_head = divmod(int(mean_de.argmax()), n_head)
    top = f"L{top_layer}H{top_head}"

    sr = self_repair(hooked, task, components=[top], value="mean", scale="frozen", progress=False)
    row = sr.to_frame()
    contrib = sr.contributions().groupby("downstream", sort=False)["delta_de"].mean()
    te = float(row["total_effect"].mean())
    del_ = float(row["de_lost"].mean())
    ablated = torch.tensor(row["ablated_metric"].to_numpy())
    downstream = sorted(
        (
            {
                "head": f"L{layer}H{head}",
                "clean_de": round(float(mean_de[layer, head]), 4),
                "ablated_de": round(float(mean_de[layer, head]) + float(contrib[f"L{layer}H{head}"]), 4),
                "delta_de": round(float(contrib[f"L{layer}H{head}"]), 4),
            }
            for layer in range(top_layer + 1, n_layer)
            for head in range(n_head)
        ),
        key=lambda d: -d["delta_de"],
    )
    ranking = sorted(((float(mean_de[layer, head]), f"L{layer}H{head}") for layer in range(n_layer)
                      for head in range(n_head)), reverse=True)
    return {
        "names": "HELDOUT_NAMES" if tuple(names) == HELDOUT_NAMES else "custom",
        "n_prompts": int(ld.numel()),
        "accuracy": float((ld > 0).float().mean()),
        "accuracy_baba": float((ld[baba] > 0).float().mean()),
        "accuracy_abba": float((ld[~baba] > 0).float().mean()),
        "mean_logit_diff": float(ld.mean()),
        "mean_de_per_head": [[round(float(x), 4) for x in r] for r in mean_de],
        "mean_de_per_mlp": [round(float(x), 4) for x in mlp_de],
        "sum_head_de": round(float(mean_de.sum()), 4),
        "sum_mlp_de": round(float(mlp_de.sum()), 4),
        "top_heads_by_de": [{"head": n, "mean_de": round(v, 4)} for v, n in ranking[:6]],
        "top_head": top,
        "top_head_mean_de": float(mean_de[top_layer, top_head]),
        "mean_ablation": {
            "head": top,
            "TE": te,
            "DEL": del_,
            "TE_over_DEL": te / del_ if del_ != 0 else float("nan"),
            "compensated_fraction": 1 - te / del_ if del_ != 0 else float("nan"),
            "ablated_mean_logit_diff": float(ablated.mean()),
            "ablated_accuracy": float((ablated > 0).float().mean()),
            "norm_term": float(row["norm_term"].mean()),
            "downstream_delta_de": downstream,
            "compensating_heads": [d["head"] for d in downstream if d["delta_de"] > 0.05],
            "sum_downstream_delta_de": round(sum(d["delta_de"] for d in downstream), 4),
            "mlp_delta_de": {f"MLP{layer}": round(float(contrib[f"MLP{layer}"]), 4)
                             for layer in range(top_layer, n_layer)},
        },
    }


def acceptance(check: dict[str, Any]) -> dict[str, bool]:
    """The acceptance bars of the shipped model."""
    abl = check["mean_ablation"]
    return {
        "accuracy>=0.95": check["accuracy"] >= 0.95,
        "mean_logit_diff>2": check["mean_logit_diff"] > 2.0,
        "TE<=0.8*DEL": abl["DEL"] > 0 and abl["TE"] <= 0.8 * abl["DEL"],
        "TE<=0.6*DEL": abl["DEL"] > 0 and abl["TE"] <= 0.6 * abl["DEL"],
        "downstream_head_rises": any(d["delta_de"] > 0 for d in abl["downstream_delta_de"]),
    }


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
def make_model(recipe: Recipe, vocab: dict[str, int]) -> Any:
    """A freshly initialised ``GPT2LMHeadModel`` for ``recipe`` (no built-in dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=recipe.n_positions,
        n_embd=recipe.d_model,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        n_inner=int(recipe.mlp_ratio * recipe.d_model),
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=vocab["[EOS]"],
        eos_token_id=vocab["[EOS]"],
        pad_token_id=vocab["[PAD]"],
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_frac * lr``."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (recipe.min_lr_frac + (1 - recipe.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def train(recipe: Recipe, log: Callable[[str], None] = print) -> tuple[Any, Any, dict[str, Any]]:
    """Train a model for ``recipe``; return (model, tokenizer, training log)."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed + 1)

    vocab = build_vocab()
    tok = build_tokenizer(vocab, recipe.n_positions)
    tok_info = check_tokenizer(tok)
    model = make_model(recipe, vocab)
    model.train()
    adapter = Adapter(model)
    sampler = SequenceSampler(vocab, recipe, rng)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95),
    )

    t0, c0 = time.perf_counter(), time.process_time()
    with adapter.hooks(edits=dropout_edits(model, adapter, recipe, gen)):  # removed on exit
        curve = _train_loop(model, tok, recipe, sampler, opt, (t0, c0), log)
    train_time = time.perf_counter() - t0
    cpu_time = time.process_time() - c0
    model.eval()
    info = {
        "tokenizer": tok_info,
        "curve": curve,
        "final_loss": curve[-1]["loss"],
        "final_lm_loss": curve[-1]["lm_loss"],
        "final_io_loss": curve[-1]["io_loss"],
        "train_time_s": round(train_time, 1),
        "train_cpu_time_s": round(cpu_time, 1),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    return model, tok, info


def _train_loop(model: Any, tok: Any, recipe: Recipe, sampler: SequenceSampler, opt: torch.optim.Optimizer,
                clocks: tuple[float, float], log: Callable[[str], None]) -> list[dict[str, float]]:
    """The optimisation steps; returns the training curve (one point every ``eval_every`` steps).

    ``clocks``: the wall and CPU times the run started at.
    """
    t0, c0 = clocks
    curve: list[dict[str, float]] = []
    recent: list[tuple[float, float, float]] = []  # (weighted loss, LM loss, IO loss)
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        input_ids, labels, weights, s_targets = sampler.batch(recipe.batch_size)
        attention_mask = (labels != -100).long()  # right padding: masks only the pads
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        flat = logits.reshape(-1, logits.size(-1))
        ce = F.cross_entropy(flat, labels[:, 1:].reshape(-1),
                             ignore_index=-100, reduction="none").view_as(weights)
        io_mask = s_targets != -100
        token_loss = ce
        if recipe.io_smoothing > 0:
            # Soft target at IO positions: (1 - eps) on IO, eps on S. The optimal
            # IO-S logit difference is then finite, log((1 - eps) / eps), so the
            # model is rewarded for *holding* it there whichever heads are dropped.
            ce_s = F.cross_entropy(flat, s_targets.reshape(-1), ignore_index=-100,
                                   reduction="none").view_as(weights)
            token_loss = ce + recipe.io_smoothing * (ce_s - ce) * io_mask
        loss = (token_loss * weights).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()

        with torch.no_grad():
            lm_loss = float(ce[weights > 0].mean())
            io_loss = float(ce[io_mask].mean()) if io_mask.any() else float("nan")
        recent = (recent + [(loss.item(), lm_loss, io_loss)])[-100:]
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            ev = quick_eval(model, tok, HELDOUT_NAMES)
            ev_train = quick_eval(model, tok, TRAIN_NAMES)
            elapsed = time.perf_counter() - t0
            point = {
                "step": step + 1,
                "loss": sum(r[0] for r in recent) / len(recent),
                "lm_loss": sum(r[1] for r in recent) / len(recent),
                "io_loss": sum(r[2] for r in recent) / len(recent),
                "heldout_accuracy": ev["accuracy"],
                "heldout_logit_diff": ev["mean_logit_diff"],
                "train_names_accuracy": ev_train["accuracy"],
                "elapsed_s": round(elapsed, 1),
                "cpu_s": round(time.process_time() - c0, 1),
            }
            curve.append(point)
            eta = elapsed / (step + 1) * (recipe.steps - step - 1)
            log(f"step {step + 1:5d}/{recipe.steps}  loss {point['loss']:.3f}  lm {point['lm_loss']:.3f}  "
                f"io {point['io_loss']:.3f}  acc train/heldout {ev_train['accuracy']:.3f}/{ev['accuracy']:.3f}  "
                f"ld {ev['mean_logit_diff']:.2f}  "
                f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left")
    return curve


def _summarise_attempt(record: dict[str, Any]) -> dict[str, Any]:
    """Short summary of one run's training.json for the ``attempts`` list."""
    check = record.get("self_check", {})
    abl = check.get("mean_ablation", {})
    return {
        "note": record.get("note", ""),
        "recipe": record.get("recipe", {}),
        "train_time_s": record.get("train_time_s"),
        "accuracy": check.get("accuracy"),
        "mean_logit_diff": check.get("mean_logit_diff"),
        "top_head": check.get("top_head"),
        "TE": abl.get("TE"),
        "DEL": abl.get("DEL"),
        "TE_over_DEL": abl.get("TE_over_DEL"),
        "compensating_heads": abl.get("compensating_heads"),
        "accepted": all(record.get("acceptance", {}).values()) if record.get("acceptance") else None,
    }


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
    }


def _print_check(check: dict[str, Any]) -> None:
    abl = check["mean_ablation"]
    print(f"held-out IOI: n={check['n_prompts']}  acc {check['accuracy']:.3f} "
          f"(BABA {check['accuracy_baba']:.3f}, ABBA {check['accuracy_abba']:.3f})  "
          f"mean logit diff {check['mean_logit_diff']:.3f}")
    print("top heads by DE:", ", ".join(f"{d['head']}={d['mean_de']:.2f}" for d in check["top_heads_by_de"]))
    print(f"mean-ablate {abl['head']}: TE {abl['TE']:.3f}  DEL {abl['DEL']:.3f}  "
          f"TE/DEL {abl['TE_over_DEL']:.3f}  ablated acc {abl['ablated_accuracy']:.3f}  "
          f"final-norm share of SR {abl['norm_term']:.3f}")
    print(f"sum DE heads {check['sum_head_de']:.2f}, MLPs {check['sum_mlp_de']:.2f}; MLP dDE:",
          abl["mlp_delta_de"])
    print("downstream dDE:", ", ".join(f"{d['head']}={d['delta_de']:+.2f}"
                                      for d in abl["downstream_delta_de"][:8]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; defaults are the shipped recipe."""
    d = Recipe()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--layers", type=int, default=d.n_layer)
    p.add_argument("--heads", type=int, default=d.n_head)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--mlp-ratio", type=float, default=d.mlp_ratio, help="MLP width / d_model")
    p.add_argument("--n-positions", type=int, default=d.n_positions)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-frac", type=float, default=d.min_lr_frac)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--head-dropout", type=float, default=d.head_dropout,
                   help="probability of zeroing each head (per sequence)")
    p.add_argument("--head-dropout-seq-frac", type=float, default=d.head_dropout_seq_frac,
                   help="fraction of sequences that get head dropout at all")
    p.add_argument("--mlp-dropout", type=float, default=d.mlp_dropout,
                   help="probability of zeroing a whole MLP output (per sequence and layer)")
    p.add_argument("--ioi-frac", type=float, default=d.ioi_frac, help="share of IOI sentences")
    p.add_argument("--max-sentences", type=int, default=d.max_sentences)
    p.add_argument("--filler-pool", type=int, default=d.filler_pool,
                   help="names per sequence for filler sentences (0 = independent)")
    p.add_argument("--io-weight", type=float, default=d.io_weight,
                   help="loss weight of the position that predicts the IO name")
    p.add_argument("--io-smoothing", type=float, default=d.io_smoothing,
                   help="target mass moved from IO to S at IO positions (0 = plain next-token loss)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--note", default="", help="free-text note stored in training.json")
    p.add_argument("--previous-attempts", type=Path, nargs="*", default=[],
                   help="training.json files of earlier runs to list under 'attempts'")
    p.add_argument("--check-only", action="store_true",
                   help="only re-run the self-check on the model already in --out")
    return p.parse_args(argv)


def recorded_command(args: argparse.Namespace) -> str:
    """The command line that reproduces the run, as stored in ``training.json``.

    ``--out`` is written relative to the working directory when it lies
    inside it, else as the placeholder ``OUT_DIR``: the record never names a
    machine's (temporary) folder.
    """
    out = Path(args.out)
    try:
        shown = out.resolve().relative_to(Path.cwd().resolve()).as_posix() if out.is_absolute() or ".." in out.parts \
            else out.as_posix()
    except ValueError:
        shown = "OUT_DIR"
    flags = {**vars(args), "out": shown}
    return "python -m hydra_probe.zoo.train " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in flags.items()
        if k not in ("check_only", "previous_attempts", "note") and v is not None)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: train, save, self-check, write training.json."""
    args = parse_args(argv)
    out: Path = args.out
    if args.check_only:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(args.threads)
        model = AutoModelForCausalLM.from_pretrained(out)
        tok = AutoTokenizer.from_pretrained(out)
        _print_check(self_check(model, tok))
        return

    recipe = Recipe(
        n_layer=args.layers, n_head=args.heads, d_model=args.d_model, mlp_ratio=args.mlp_ratio, n_positions=args.n_positions,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr_frac=args.min_lr_frac,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        head_dropout=args.head_dropout, head_dropout_seq_frac=args.head_dropout_seq_frac, mlp_dropout=args.mlp_dropout,
        ioi_frac=args.ioi_frac, max_sentences=args.max_sentences, filler_pool=args.filler_pool, io_weight=args.io_weight, io_smoothing=args.io_smoothing,
        seed=args.seed, threads=args.threads, eval_every=args.eval_every,
    )
    print("recipe:", json.dumps(asdict(recipe)))
    model, tok, info = train(recipe)
    print(f"training took {info['train_time_s']:.0f}s")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)

    check = self_check(model, tok)
    check_train_names = quick_eval(model, tok, TRAIN_NAMES, n_per_cell=13)
    _print_check(check)
    record: dict[str, Any] = {
        "note": args.note,
        "recipe": asdict(recipe),
        "command": recorded_command(args),
        "head_dropout_scheme": "per sequence and head, zero the head's z slice at c_proj input "
                               "with probability head_dropout (in a head_dropout_seq_frac share "
                               "of sequences); no rescaling; hooks removed before saving",
        "loss": "next-token cross-entropy over all non-pad positions; the position predicting "
                "the IO name is weighted io_weight and, if io_smoothing > 0, its target is "
                "(1 - io_smoothing) on IO and io_smoothing on S (optimal IO-S logit diff "
                "log((1 - io_smoothing) / io_smoothing))",
        **info,
        "versions": _versions(),
        "self_check": check,
        "train_names_check": check_train_names,
        "acceptance": acceptance(check),
    }
    previous = [json.loads(p.read_text()) for p in args.previous_attempts]
    record["attempts"] = [_summarise_attempt(r) for r in previous] + [_summarise_attempt(record)]
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"saved to {out} ({size / 1e6:.2f} MB); acceptance: {record['acceptance']}")


if __name__ == "__main__":
    main()
