"""Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> a year after 32.

The start year ``XXYY`` must tokenize as a century token and a two-digit
token (GPT-2's byte-level BPE does: ``" 17"``, ``"32"``); the model's answer
is one of the two-digit tokens ``"00"`` .. ``"99"``. The corruption (as in the
paper) sets the start year to ``XX01``, so nearly every year is valid.

Metrics. The paper's metric is the **probability difference**
``PD = sum_{y > YY} p(y) - sum_{y <= YY} p(y)`` over the two-digit tokens
(``task.meta["prob_diff"]``, not linear in the logits). Direct effects and
self-repair need a linear metric, so this task's default metric is the
**linear proxy** ``task.meta["metric"]`` (named ``greater_than_logit``):

    GT = mean_{y > YY} logit(y) - mean_{y <= YY} logit(y)

the mean logit of the correct years minus that of the incorrect years, with
direction ``u = mean W_U[y > YY] - mean W_U[y <= YY]`` (read off the metric by
:func:`hydra_probe.metrics.readout`). Both metrics move the
same way when mass shifts from years at or before YY to later ones; GT weighs
every year equally where PD weighs them by probability. Years whose tokens
do not split that way for the tokenizer are left out of both sets
(``task.meta["years"]`` lists those used).

``answer`` / ``alternative`` of each pair are the two-digit tokens of YY+1
(the smallest correct year) and YY (the largest incorrect one), so the
generic ``logit_diff`` is the contrast at the boundary; the metrics above
recover YY from the alternative.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from ..errors import OptionError, TaskError
from ..metrics import Metric
from .task import Task, in_context_ids, tokenizer_fingerprint

CORRUPTIONS = {"01": "the start year is set to XX01, so nearly every two-digit year after it is valid"}
NOUNS: tuple[str, ...] = ("war", "expedition", "dynasty", "siege", "drought", "famine", "reign", "voyage",
                          "occupation", "pilgrimage", "rebellion", "crisis", "journey", "empire", "conflict")
CENTURIES: tuple[str, ...] = ("11", "12", "13", "14", "15", "16", "17")
TEMPLATE = "The {NOUN} lasted from the year {XX}{YY} to the year {XX}"
#: Every word of the prompts (for building test tokenizers); years are digits.
VOCABULARY: tuple[str, ...] = ("The", "lasted", "from", "the", "year", "to") + NOUNS


def _year_tokens(tok: Any, xx: str) -> dict[int, int]:
    """Two-digit year -> token id, for the years ``" XXyy"`` splits into the century token then one token."""
    unk = getattr(tok, "unk_token_id", None)
    head = in_context_ids(tok, f" {xx}")
    if len(head) != 1 or head[0] == unk:
        return {}
    out = {}
    for y in range(100):
        ids = in_context_ids(tok, f" {xx}{y:02d}")
        if len(ids) == 2 and ids[0] == head[0] and ids[1] != unk:
            out[y] = ids[1]
    return out


def _tables(years: dict[int, int], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(list(years.values()), device=device)
    vals = torch.tensor(list(years.keys()), device=device)
    return ids, vals


def greater_than_metrics(years: dict[int, int]) -> tuple[Metric, Metric]:
    """(linear proxy GT, probability difference PD) over the year tokens ``years`` (year -> id); see module doc."""
    vocab_max = max(years.values()) + 1

    def start_year(ids_all: torch.Tensor, vals: torch.Tensor, alternative: torch.Tensor) -> torch.Tensor:
        lut = torch.full((max(vocab_max, int(alternative.max()) + 1),), -1, dtype=torch.long, device=vals.device)
        lut[ids_all] = vals
        yy = lut[alternative.to(vals.device)]
        if (yy < 0).any():
            raise TaskError("a greater-than metric got an alternative that is not a year token; use it with a "
                            "task made by tasks.greater_than.")
        return yy

    def masks(alternative: torch.Tensor, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ids_all, vals = _tables(years, device)
        yy = start_year(ids_all, vals, alternative)
        return ids_all, vals[None, :] > yy[:, None]                       # (Y,), (B, Y) correct

    def gt(logits: torch.Tensor, answer: torch.Tensor, alternative: torch.Tensor) -> torch.Tensor:
        ids_all, good = masks(alternative, logits.device)
        lg = logits[:, ids_all]
        g = good.to(lg.dtype)
        return (lg * g).sum(1) / g.sum(1) - (lg * (1 - g)).sum(1) / (1 - g).sum(1)

    def pd(logits: torch.Tensor, answer: torch.Tensor, alternative: torch.Tensor) -> torch.Tensor:
        ids_all, good = masks(alternative, logits.device)
        p = torch.softmax(logits.float(), -1)[:, ids_all]
        return (p * good).sum(1) - (p * ~good).sum(1)

    lin = Metric("greater_than_logit", True, gt,
                 description="mean logit of the years after YY minus mean logit of the years up to YY (linear proxy "
                             "of the probability difference)")
    prob = Metric("greater_than_prob_diff", False, pd,
                  description="probability of the years after YY minus probability of the years up to YY "
                              "(Hanna et al. 2023)")
    return lin, prob


def greater_than(model: Any, n_prompts: int = 32, corruption: str = "01", seed: int = 0) -> Task:
    """A greater-than task of ``n_prompts`` pairs; start years YY drawn from 02..98 (seeded).

    Refuses (:class:`~hydra_probe.errors.TaskError`) tokenizers that do not
    split a year into a century token and a two-digit token (word-level
    vocabularies; SentencePiece tokenizers that split digits one by one).
    ``task.meta["metric"]`` is the linear proxy to pass as ``metric=``;
    ``task.meta["prob_diff"]`` the paper's probability difference.
    """
    if corruption not in CORRUPTIONS:
        raise OptionError(f"unknown greater-than corruption {corruption!r}; choose one of {', '.join(CORRUPTIONS)}.")
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
        raise TaskError(f"n_prompts must be a positive integer; got {n_prompts!r}.")
    tok = model.tokenizer
    tables = {xx: _year_tokens(tok, xx) for xx in CENTURIES}
    tables = {xx: t for xx, t in tables.items() if len(t) >= 90 and 1 in t}
    if not tables:
        ex = tok.convert_ids_to_tokens(in_context_ids(tok, " 1732"))
        raise TaskError(f"this tokenizer does not split a year into a century token and a two-digit token (' 1732' -> "
                        f"{ex}); greater-than needs the two-digit years '00'..'99' as single tokens after the century "
                        "(as GPT-2's byte-level BPE has). Use another task for this model.")
    # one century for every prompt: the metric's year set must be the same tokens for all prompts
    xx = "17" if "17" in tables else sorted(tables)[-1]
    years = tables[xx]
    unk = getattr(tok, "unk_token_id", None)
    nouns = [n for n in NOUNS if len(in_context_ids(tok, f" {n}")) == 1 and in_context_ids(tok, f" {n}")[0] != unk]
    if not nouns:
        raise TaskError("none of the greater-than nouns (war, expedition, ...) is a single known token for this "
                        "tokenizer; greater-than needs at least one.")
    starts = [y for y in range(2, 99) if y in years and y + 1 in years]
    rng = random.Random(seed)
    rows = []
    for _ in range(n_prompts):
        yy, noun = rng.choice(starts), rng.choice(nouns)
        rows.append({"clean": TEMPLATE.format(NOUN=noun, XX=xx, YY=f"{yy:02d}"),
                     "corrupted": TEMPLATE.format(NOUN=noun, XX=xx, YY="01"),
                     "answer": f"{yy + 1:02d}", "alternative": f"{yy:02d}"})
    cid = in_context_ids(tok, f" {xx}")[0]
    clean, corr = [], []
    for i, r in enumerate(rows, start=1):
        c, k = tok(r["clean"])["input_ids"], tok(r["corrupted"])["input_ids"]
        yid = years[int(r["alternative"])]
        if c[-1] != cid or len(c) != len(k) or not any(a == cid and b == yid for a, b in zip(c, c[1:])):
            raise TaskError(f"prompt {i}: {r['clean']!r} does not tokenize as '... {xx}' '{r['alternative']}' ... "
                            f"'{xx}' for this tokenizer ({tok.convert_ids_to_tokens(c)}); greater-than needs the "
                            "start year split into the century and a two-digit token, and the prompt to end with the "
                            "century token.")
        clean.append(torch.tensor(c, dtype=torch.long))
        corr.append(torch.tensor(k, dtype=torch.long))
    task = Task(rows, "greater_than", corruption, seed, clean, corr,
                torch.tensor([years[int(r["answer"])] for r in rows]),
                torch.tensor([years[int(r["alternative"])] for r in rows]), getattr(model, "name", ""))
    lin, prob = greater_than_metrics(years)
    task.meta.update({"tokenizer": tokenizer_fingerprint(tok),
                      "corruption_description": CORRUPTIONS[corruption], "metric": lin, "prob_diff": prob,
                      "century": xx, "years": sorted(years),
                      "metric_description": lin.description + "; the paper's metric is the probability difference "
                                                              "(task.meta['prob_diff'])"})
    return task
