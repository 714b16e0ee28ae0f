"""Gendered pronoun prediction (Mathwin et al. 2023 style): "When Mary got to the store," -> " she".

A name of known gender is followed by a context where a subject pronoun
comes next. Answer: the pronoun that agrees with the name; alternative: the
other one; the metric's default is their logit difference at the last token.
The ``swap`` corruption replaces the name by one of the other gender, so the
correct pronoun flips (like IOI's ``swap``). Half the prompts use a female
name, half a male one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ..errors import OptionError, TaskError
from .ioi import _single_token_names
from .task import Task, from_pairs, in_context_ids

CORRUPTIONS = {"swap": "the name is replaced by a name of the other gender, so the correct pronoun flips"}

FEMALE_NAMES: tuple[str, ...] = (
    "Mary", "Amy", "Anna", "Kate", "Lisa", "Sarah", "Laura", "Emma", "Alice", "Jane", "Rose", "Ruth", "Helen",
    "Grace", "Julia", "Claire", "Diana", "Lucy", "Karen", "Nancy", "Susan", "Linda", "Emily", "Ann", "Eva", "Liz",
    "Beth", "Jill", "Nina", "Rita", "Judy", "Olivia", "Sophia", "Megan", "Leah", "Ella", "Jessica", "Rachel",
    "Sophie", "Anne", "Jennifer", "Kelly", "Maria", "Victoria", "Hannah", "Sandra",
)
MALE_NAMES: tuple[str, ...] = (
    "John", "Tom", "James", "Dan", "Martin", "Paul", "Mark", "David", "Michael", "Peter", "Jack", "Bob", "Steve",
    "Carl", "Frank", "George", "Henry", "Adam", "Ben", "Sam", "Joe", "Eric", "Brian", "Kevin", "Scott", "Ryan",
    "Jim", "Ted", "Roy", "Ian", "Ray", "Fred", "Greg", "Neil", "Phil", "Carlos", "Jacob", "Daniel", "Thomas",
    "Simon", "Oscar", "Matt", "Andrew", "Robert", "Tony", "Jason", "Richard", "Luke", "Tim",
)
PRONOUNS = {"female": " she", "male": " he"}
PLACES: tuple[str, ...] = ("store", "park", "school", "office", "station", "market", "library", "beach")
# {NAME} is the name; the next token is a subject pronoun.
TEMPLATES: tuple[str, ...] = (
    "When {NAME} got to the {PLACE},",
    "{NAME} went to the {PLACE} because",
    "After {NAME} left the {PLACE},",
    "{NAME} was at the {PLACE} and said that",
)
#: Every word the prompts and answers use (for building test tokenizers).
VOCABULARY: tuple[str, ...] = tuple(sorted(
    {w for t in TEMPLATES for w in t.replace(",", " , ").replace("{NAME}", " ").replace("{PLACE}", " ").split()}
    | set(PLACES) | {"he", "she", ","}))


def pronoun(model: Any, n_prompts: int = 32, corruption: str = "swap", seed: int = 0,
            templates: Sequence[str] = TEMPLATES) -> Task:
    """A gendered-pronoun task of ``n_prompts`` pairs (half female names, half male).

    Names are those of ``FEMALE_NAMES`` / ``MALE_NAMES`` that are single tokens
    for the model's tokenizer; the pronouns ``" she"`` and ``" he"`` must be
    single known tokens, and every prompt word must be known (no unknown
    token), else :class:`~hydra_probe.errors.TaskError` says which.
    """
    if corruption not in CORRUPTIONS:
        raise OptionError(f"unknown pronoun corruption {corruption!r}; choose one of {', '.join(CORRUPTIONS)}.")
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
        raise TaskError(f"n_prompts must be a positive integer; got {n_prompts!r}.")
    tok = model.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    for p in PRONOUNS.values():
        ids = in_context_ids(tok, p)
        if len(ids) != 1 or ids[0] == unk:
            raise TaskError(f"the pronoun {p!r} is not a single known token for this tokenizer ({len(ids)} token(s)"
                            f"{', unknown' if unk in ids else ''}); the pronoun task needs ' he' and ' she' as single "
                            "tokens. Use another task or a model whose vocabulary has them.")
    female = _single_token_names(tok, FEMALE_NAMES)
    male = _single_token_names(tok, MALE_NAMES)
    if len(female) < 2 or len(male) < 2:
        raise TaskError(f"only {len(female)} female and {len(male)} male names are single tokens for this tokenizer; "
                        "the pronoun task needs at least 2 of each.")
    rng = random.Random(seed)
    k = max(1, min(len(templates), n_prompts // 2))
    rows = []
    for i in range(n_prompts):
        tpl = templates[i % k]
        fem = (i // k) % 2 == 0
        name, other = (rng.choice(female), rng.choice(male)) if fem else (rng.choice(male), rng.choice(female))
        place = rng.choice(PLACES)
        rows.append({"clean": tpl.format(NAME=name, PLACE=place), "corrupted": tpl.format(NAME=other, PLACE=place),
                     "answer": PRONOUNS["female" if fem else "male"],
                     "alternative": PRONOUNS["male" if fem else "female"]})
    if unk is not None:
        for r in rows:
            ids = tok(r["clean"])["input_ids"]
            if unk in ids:
                toks = tok.convert_ids_to_tokens(ids)
                raise TaskError(f"the pronoun prompt {r['clean']!r} has words this tokenizer does not know (unknown "
                                f"token at position {toks.index(tok.unk_token)}); use a model whose vocabulary covers "
                                f"the templates, or pass templates=[...] with known words.")
    task = from_pairs(model, rows, name="pronoun", corruption=corruption, seed=seed)
    task.meta["corruption_description"] = CORRUPTIONS[corruption]
    return task
