"""Numbers as text, for tables and sentences (the report and the CLI share these)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: 3 significant digits; NaN/None as an empty cell; bools as yes/no."""
    if x is None:
        return ""
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        f = float(x)
        if math.isnan(f):
            return ""
        if f == 0:
            return "0"
        if abs(f) >= 1e5 or abs(f) < 1e-3:
            return f"{f:.2e}"
        return f"{f:.0f}" if abs(f) >= 10 ** digits else f"{f:.{digits}g}"
    return str(x)


def ci(m: Any, lo: Any, hi: Any) -> str:
    """``m [lo, hi]`` (just ``m`` when the interval is missing)."""
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return fmt(m)
    return f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]"


def pct(x: Any) -> str:
    """A share as a whole percentage (``0.126`` -> ``13%``); NaN/None as an empty cell."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    v = round(100 * float(x))
    return f"{v + 0:.0f}%"  # + 0 turns -0 into 0


__all__ = ["ci", "fmt", "pct"]
