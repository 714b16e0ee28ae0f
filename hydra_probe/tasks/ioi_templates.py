"""Word lists and templates for indirect-object-identification prompts.

In the style of Wang et al. (2022): a sentence introduces two names (A, B),
one of them (the subject S) is repeated, and the answer is the other one, the
indirect object (IO). ``{IO}`` and ``{S}`` are filled so that the first
mention order is BABA (``S ... IO ... S``) or ABBA (``IO ... S ... S``).

The shipped model was trained on ``TRAIN_NAMES`` in these templates; its
held-out evaluation uses ``HELDOUT_NAMES``. Every entry is written without a
leading space; prompts put a single space before each word.
"""

from __future__ import annotations

TRAIN_NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Paul", "Anna",
    "Kate", "Mark", "Lisa", "David", "Sarah", "Michael", "Laura", "Peter", "Emma", "Jack",
    "Alice", "Bob", "Jane", "Steve", "Rose", "Carl", "Ruth", "Frank", "Helen", "George",
    "Grace", "Henry", "Julia", "Adam", "Claire", "Ben", "Diana", "Sam", "Lucy", "Joe",
    "Karen", "Eric", "Nancy", "Brian", "Susan", "Kevin", "Linda", "Scott", "Emily", "Ryan",
    "Jim", "Kim", "Ted", "Ann", "Roy", "Eva", "Ian", "Joy", "Ray", "Liz",
    "Fred", "Beth", "Greg", "Jill", "Neil", "Nina", "Phil", "Rita", "Carlos", "Judy",
    "Jacob", "Olivia", "Daniel", "Sophia", "Thomas", "Megan", "Simon", "Leah", "Oscar", "Ella",
)

HELDOUT_NAMES: tuple[str, ...] = (
    "Jessica", "Matt", "Rachel", "Andrew", "Sophie", "Chris", "Anne", "Robert", "Jennifer", "Tony",
    "Alex", "Kelly", "Jason", "Maria", "Richard", "Victoria", "Luke", "Hannah", "Tim", "Sandra",
)

PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
    "park", "market", "library", "church", "beach", "museum", "cafe", "airport",
)

OBJECTS: tuple[str, ...] = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack",
    "book", "letter", "ticket", "flower", "key", "bag", "hat", "phone",
)

# {A} {B} are the first two mentions; {S} is the repeated subject. The answer is
# the name that is not {S}. BABA: A=S, B=IO. ABBA: A=IO, B=S.
TEMPLATES: tuple[str, ...] = (
    "Then, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {A} and {B} had a lot of fun at the {PLACE}. {S} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "While {A} and {B} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "After {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {S} gave it to",
    "Afterwards, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "The {PLACE} was quiet when {A} and {B} arrived. {S} handed a {OBJECT} to",
)

# Filler sentences mentioning one or two names without an IOI structure. The
# last three make a name predictable only by copying it from earlier in the
# sequence (never by the IOI rule), so the model learns to copy any name,
# held-out ones included.
FILLER_TEMPLATES: tuple[str, ...] = (
    "{A} went to the {PLACE}. Then, {A} found a {OBJECT}.",
    "{A} and {B} like the {PLACE}. {A} and {B} went to the {PLACE}.",
    "{A} saw {B} at the {PLACE}. {A} saw {B} at the {PLACE}.",
    "{A} went to the {PLACE} with a {OBJECT}.",
    "The {OBJECT} was in the {PLACE}.",
    "{A} and {B} like the {PLACE}.",
    "{A} found a {OBJECT} at the {PLACE}.",
    "{A} saw {B} at the {PLACE}.",
    "It was a long day at the {PLACE}.",
)
