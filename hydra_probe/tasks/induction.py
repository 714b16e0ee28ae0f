"""Induction on repeated random tokens: works on any model and tokenizer."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TaskError
from .task import Task, tokenizer_fingerprint


def induction(model: Any, n_prompts: int = 32, seq_len: int = 8, seed: int = 0) -> Task:
    """Prompts ``r_1..r_k r_1..r_{k-1}``: the answer is ``r_k`` (copied by induction).

    The corrupted prompt replaces the repeated half by fresh random tokens
    (no induction possible); the alternative is a random token absent from
    the prompt. A BOS token is put first when the tokenizer adds one.
    """
    if n_prompts < 1 or seq_len < 2:
        raise TaskError("induction needs n_prompts >= 1 and seq_len >= 2.")
    tok = model.tokenizer
    g = torch.Generator().manual_seed(seed)
    special = set(getattr(tok, "all_special_ids", []) or [])
    vocab = [i for i in range(min(model.adapter.vocab_size, len(tok))) if i not in special]
    if len(vocab) < 3 * seq_len:
        raise TaskError(f"the vocabulary has {len(vocab)} ordinary tokens; induction with seq_len={seq_len} needs {3 * seq_len}.")
    probe = tok("a")["input_ids"]
    bos = [probe[0]] if getattr(tok, "bos_token_id", None) is not None and probe and probe[0] == tok.bos_token_id else []
    vocab_t = torch.tensor(vocab)
    pairs, clean, corr, ans, alt = [], [], [], [], []
    for _ in range(n_prompts):
        perm = vocab_t[torch.randperm(len(vocab), generator=g)[: 3 * seq_len]]
        r, s, other = perm[:seq_len], perm[seq_len: 2 * seq_len - 1], perm[2 * seq_len]
        c = torch.tensor(bos + r.tolist() + r[:-1].tolist())
        k = torch.tensor(bos + r.tolist() + s.tolist())
        clean.append(c)
        corr.append(k)
        ans.append(int(r[-1]))
        alt.append(int(other))
        pairs.append({"clean": tok.decode(c), "corrupted": tok.decode(k),
                      "answer": tok.decode([int(r[-1])]), "alternative": tok.decode([int(other)])})
    return Task(pairs, "induction", "fresh-random-second-half", seed, clean, corr,
                torch.tensor(ans), torch.tensor(alt), getattr(model, "name", ""),
                {"seq_len": seq_len, "tokenizer": tokenizer_fingerprint(tok)})
