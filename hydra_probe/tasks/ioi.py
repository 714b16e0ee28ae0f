"""Indirect object identification prompts (Wang et al. 2022 style)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ..errors import OptionError, TaskError
from . import ioi_templates as T
from .task import Task, from_pairs, in_context_ids

CORRUPTIONS = {
    "swap": "the repeated subject (S2) is replaced by the indirect object, so the correct answer flips",
    "abc": "the repeated subject (S2) is replaced by a third name, so no name is repeated",
}


def _single_token_names(tokenizer: Any, names: Sequence[str]) -> list[str]:
    """Names that are one token (with a leading space), decode back to themselves, and are distinct."""
    out, seen = [], set()
    unk = getattr(tokenizer, "unk_token_id", None)
    for n in names:
        ids = in_context_ids(tokenizer, " " + n)
        if len(ids) == 1 and ids[0] != unk and ids[0] not in seen and tokenizer.decode(ids).strip() == n:
            out.append(n)
            seen.add(ids[0])
    return out


def ioi_rows(n_prompts: int, names: Sequence[str], corruption: str, seed: int,
             templates: Sequence[str] = T.TEMPLATES) -> list[dict[str, str]]:
    """Draw ``n_prompts`` IOI rows (half BABA, half ABBA) from ``templates``."""
    rng = random.Random(seed)
    # Use as many templates as keep >= 2 prompts per template (resample needs donors of equal length).
    k = max(1, min(len(templates), n_prompts // 2))
    used = list(templates[:k])
    rows = []
    for i in range(n_prompts):
        tpl = used[i % k]
        io, s, c = rng.sample(list(names), 3)
        baba = (i // k) % 2 == 0
        a, b = (s, io) if baba else (io, s)
        fill = dict(PLACE=rng.choice(T.PLACES), OBJECT=rng.choice(T.OBJECTS))
        clean = tpl.format(A=a, B=b, S=s, **fill)
        s2 = io if corruption == "swap" else c
        corrupted = tpl.format(A=a, B=b, S=s2, **fill)
        rows.append({"clean": clean, "corrupted": corrupted, "answer": " " + io, "alternative": " " + s})
    return rows


def ioi(model: Any, n_prompts: int = 32, corruption: str = "swap", seed: int = 0,
        names: Sequence[str] | str | None = None) -> Task:
    """An IOI task of ``n_prompts`` prompt pairs.

    Answer = the indirect object, alternative = the subject; the metric's
    default is their logit difference at the last token. ``corruption``:
    ``"swap"`` or ``"abc"`` (see ``CORRUPTIONS``). ``names``: a list, or
    ``"heldout"`` / ``"train"`` for the shipped model's name splits; default:
    every listed name that is a single token for the model's tokenizer.
    """
    if corruption not in CORRUPTIONS:
        raise OptionError(f"unknown IOI corruption {corruption!r}; choose one of {', '.join(CORRUPTIONS)}.")
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
        raise TaskError(f"n_prompts must be a positive integer; got {n_prompts!r}. Ask for at least one prompt "
                        "(e.g. n_prompts=32, or --n-prompts 32 on the command line).")
    if names is None:
        pool: Sequence[str] = T.TRAIN_NAMES + T.HELDOUT_NAMES
    elif names == "heldout":
        pool = T.HELDOUT_NAMES
    elif names == "train":
        pool = T.TRAIN_NAMES
    else:
        pool = list(names)  # type: ignore[arg-type]
    pool = _single_token_names(model.tokenizer, pool)
    if len(pool) < 3:
        raise TaskError(
            f"only {len(pool)} of the IOI names are single tokens for this tokenizer; IOI needs at least 3. "
            "Pass names=[...] with single-token names, or build the task with tasks.from_pairs."
        )
    rows = ioi_rows(n_prompts, pool, corruption, seed)
    task = from_pairs(model, rows, name="ioi", corruption=corruption, seed=seed)
    task.meta["corruption_description"] = CORRUPTIONS[corruption]
    # what remakes the same clean prompts with another corruption (compare_conditions)
    task.meta["names"] = list(pool)
    task.meta["n_prompts"] = n_prompts
    return task
