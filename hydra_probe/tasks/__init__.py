"""Tasks: IOI, induction, and a user's own prompt pairs."""

from .induction import induction
from .ioi import CORRUPTIONS, ioi
from .task import Task, from_jsonl, from_pairs

__all__ = ["CORRUPTIONS", "Task", "from_jsonl", "from_pairs", "induction", "ioi"]
