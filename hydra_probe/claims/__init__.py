"""Claims from measurements: the per-component verdicts (``verdicts``).

Sits between statistics and the report in the data flow: it reads plain
frames of already-computed summaries and never runs a model, so both the
report and other claim builders (e.g. ``compare_conditions``) reuse it.
"""

from .verdicts import SCALE_RULE, VERDICT_RULE, VERDICTS, classify, verdict_scale, verdict_table

__all__ = ["SCALE_RULE", "VERDICTS", "VERDICT_RULE", "classify", "verdict_scale", "verdict_table"]
