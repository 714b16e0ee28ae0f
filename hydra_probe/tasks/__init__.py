"""Tasks: IOI, gendered pronoun, greater-than, induction, and a user's own prompt pairs."""

from .greater_than import greater_than, greater_than_metrics
from .induction import induction
from .ioi import CORRUPTIONS, ioi
from .pronoun import pronoun
from .task import Task, from_jsonl, from_pairs

__all__ = ["CORRUPTIONS", "Task", "from_jsonl", "from_pairs", "greater_than", "greater_than_metrics", "induction",
           "ioi", "pronoun"]
