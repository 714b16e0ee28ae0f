"""Tasks: prompt pairs (clean, corrupted) with an answer and an alternative token.

The metric is read at each prompt's last token. Prompts of different token
lengths are grouped by length (never padded), so every position is real.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import TaskError

FIELDS = ("clean", "corrupted", "answer", "alternative")


@dataclass
class Task:
    """A tokenized task bound to one model's tokenizer.

    Attributes:
        pairs: list of ``{"clean", "corrupted", "answer", "alternative"}`` dicts.
        name: task name recorded in provenance (``"ioi"``, ``"induction"``, ...).
        corruption: how the corrupted prompts were made (recorded in provenance).
        seed: the seed the task was drawn with (or None).
        clean_ids, corrupted_ids: per prompt, 1-D token id tensors.
        answer_ids, alternative_ids: (n,) token ids.
    """

    pairs: list[dict[str, str]]
    name: str
    corruption: str
    seed: int | None
    clean_ids: list[torch.Tensor]
    corrupted_ids: list[torch.Tensor]
    answer_ids: torch.Tensor
    alternative_ids: torch.Tensor
    model_name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, n={len(self)}, corruption={self.corruption!r}, seed={self.seed})"

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.clean_ids]

    def groups(self) -> list[list[int]]:
        """Prompt indices grouped by token length (each group runs as one batch)."""
        by: dict[int, list[int]] = {}
        for i, n in enumerate(self.lengths):
            by.setdefault(n, []).append(i)
        return [by[k] for k in sorted(by)]

    def batch(self, idx: Sequence[int], which: str = "clean") -> torch.Tensor:
        """Stacked ids (len(idx), T) of equal-length prompts."""
        src = self.clean_ids if which == "clean" else self.corrupted_ids
        return torch.stack([src[i] for i in idx])

    def subset(self, idx: Sequence[int]) -> Task:
        """A task with the prompts ``idx`` only."""
        idx = list(idx)
        return Task([self.pairs[i] for i in idx], self.name, self.corruption, self.seed,
                    [self.clean_ids[i] for i in idx], [self.corrupted_ids[i] for i in idx],
                    self.answer_ids[idx], self.alternative_ids[idx], self.model_name, dict(self.meta))

    def to_jsonl(self, path: str | os.PathLike) -> None:
        """Write the pairs, one JSON object a line (atomically)."""
        from ..io import atomic_write_text

        atomic_write_text(Path(path), "".join(json.dumps(p) + "\n" for p in self.pairs))

    def provenance(self) -> dict[str, Any]:
        return {"task": self.name, "corruption": self.corruption, "n": len(self), "seed": self.seed}


_CONTEXT = "and"


def in_context_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as it reads after a word inside a prompt.

    ``" Mary"`` is tokenized after a context word and the context's ids are
    removed, so the ids are those the model sees (and predicts) mid-sentence.
    This matters for SentencePiece tokenizers with a dummy prefix (Llama-2,
    Mistral): alone, ``" Mary"`` becomes two tokens ``["▁", "▁Mary"]``; in a
    prompt it is the single token ``"▁Mary"``. Falls back to tokenizing
    ``text`` alone when the context does not split off cleanly.
    """
    pre = tokenizer(_CONTEXT, add_special_tokens=False)["input_ids"]
    both = tokenizer(_CONTEXT + text, add_special_tokens=False)["input_ids"]
    if len(both) > len(pre) and both[:len(pre)] == pre:
        return list(both[len(pre):])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _single_token(tokenizer: Any, text: str, what: str, row: int) -> int:
    ids = in_context_ids(tokenizer, text)
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) != 1:
        raise TaskError(
            f"row {row}: the {what} {text!r} is {len(ids)} tokens for this tokenizer; answers must be single "
            "tokens as written (with the leading space, e.g. ' Mary'). Choose another word."
        )
    if unk is not None and ids[0] == unk:
        raise TaskError(f"row {row}: the {what} {text!r} is not in the vocabulary (it maps to the unknown token); "
                        "choose a word the tokenizer knows.")
    return int(ids[0])


def from_pairs(model: Any, rows: Iterable[Mapping[str, Any]], *, name: str = "custom",
               corruption: str = "custom", seed: int | None = None) -> Task:
    """Build a task from rows of ``{"clean", "corrupted", "answer", "alternative"}`` strings.

    Prompts are tokenized with the tokenizer's special tokens (a BOS token is
    added where the tokenizer adds one); answers without, as they read after a
    word inside a prompt (see :func:`in_context_ids`). Clean and corrupted
    prompts of one pair must have the same token length.
    """
    tok = model.tokenizer
    rows = list(rows)
    if not rows:
        raise TaskError("the task is empty; give at least one row of {clean, corrupted, answer, alternative}.")
    pairs, clean, corr, ans, alt = [], [], [], [], []
    for r, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise TaskError(f"row {r} is a {type(row).__name__}, not an object with keys {', '.join(FIELDS)}.")
        lack = [k for k in FIELDS if not isinstance(row.get(k), str) or not row.get(k)]
        if lack:
            raise TaskError(f"row {r} lacks non-empty string field(s) {', '.join(lack)}; each row needs {', '.join(FIELDS)}.")
        c = tok(row["clean"])["input_ids"]
        k = tok(row["corrupted"])["input_ids"]
        if len(c) != len(k):
            raise TaskError(
                f"row {r}: clean and corrupted prompts have different token lengths ({len(c)} vs {len(k)}); "
                "patching needs position-aligned pairs. Rephrase the corrupted prompt to the same length."
            )
        if len(c) < 2:
            raise TaskError(f"row {r}: the clean prompt is {len(c)} token(s); give at least two.")
        a = _single_token(tok, row["answer"], "answer", r)
        b = _single_token(tok, row["alternative"], "alternative", r)
        if a == b:
            raise TaskError(f"row {r}: answer and alternative are the same token {row['answer']!r}; the metric "
                            "compares two different tokens, so choose another alternative.")
        pairs.append({k2: row[k2] for k2 in FIELDS})
        clean.append(torch.tensor(c, dtype=torch.long))
        corr.append(torch.tensor(k, dtype=torch.long))
        ans.append(a)
        alt.append(b)
    return Task(pairs, name, corruption, seed, clean, corr, torch.tensor(ans), torch.tensor(alt),
                getattr(model, "name", ""), {"tokenizer": tokenizer_fingerprint(tok)})


def from_jsonl(model: Any, path: str | os.PathLike, *, name: str | None = None) -> Task:
    """Read a task from a JSONL file (one pair an object); malformed lines are reported by number."""
    p = Path(path)
    if not p.exists():
        raise TaskError(f"task file {str(p)!r} does not exist; give a JSONL file of {{clean, corrupted, answer, alternative}} rows.")
    rows = []
    from ..io import read_text

    for i, line in enumerate(read_text(p, TaskError, "task file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{p}:{i}: malformed JSON ({e.msg}); each line must be one JSON object.") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{p}:{i}: a line must be a JSON object with keys {', '.join(FIELDS)}.")
        lack = [k for k in FIELDS if not isinstance(obj.get(k), str)]
        if lack:
            raise TaskError(f"{p}:{i}: missing or non-string field(s) {', '.join(lack)}; each line needs "
                            f"{', '.join(FIELDS)} as strings.")
        rows.append(obj)
    if not rows:
        raise TaskError(f"task file {p} holds no rows.")
    return from_pairs(model, rows, name=name or p.stem, corruption="custom")


_FINGERPRINTS: Any = None
_PROBE = "When Mary and John went to the store, John gave a drink to Mary. 0123 !?"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary and of how it tokenizes a probe text (special tokens included).

    Two tokenizers with the same fingerprint give the same ids for the same text; a task records the
    fingerprint of the tokenizer it was built with, and analyses refuse a model whose tokenizer differs.
    """
    import hashlib
    import weakref

    global _FINGERPRINTS
    if _FINGERPRINTS is None:
        _FINGERPRINTS = weakref.WeakKeyDictionary()
    try:
        size = len(tokenizer)
    except TypeError:
        size = -1
    try:
        n, fp = _FINGERPRINTS[tokenizer]
        if n == size:
            return fp
    except (KeyError, TypeError):
        pass
    try:
        vocab = sorted(tokenizer.get_vocab().items())
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: hash the probe only
        vocab = []
    probe = list(tokenizer(_PROBE)["input_ids"])
    fp = hashlib.sha256(json.dumps([vocab, probe], ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    try:
        _FINGERPRINTS[tokenizer] = (size, fp)
    except TypeError:
        pass
    return fp
