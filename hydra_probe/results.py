"""Result objects: tidy DataFrames with their provenance, saved as JSON.

Every result has ``to_frame()`` (one row per component x prompt unless
said), ``summary()`` (per-component means with confidence intervals),
``provenance`` (model, task, corruption, ablation value, direction, metric,
scale policy, n, seed, package version) and ``save(path)`` / ``load(path)``
(JSON; never pickle). Results never compute measurements; they hold them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ._version import __version__
from .errors import InputError
from .io import atomic_write_text

_KINDS: dict[str, type[Result]] = {}


def package_version() -> str:
    return __version__


def provenance(model: Any, task: Any, *, metric: Any, value: Any = None, direction: str | None = None,
               scale: str | None = None, seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """The provenance dict every result carries."""
    ref = None
    if value is not None and not isinstance(value, str):
        ref, value = getattr(value, "name", "reference"), "mean"
    p = {
        "model": getattr(model, "name", str(model)),
        "dtype": str(getattr(getattr(model, "adapter", None), "dtype", "")).replace("torch.", ""),
        "task": task.name,
        "corruption": task.corruption,
        "value": value,
        "direction": direction,
        "metric": getattr(metric, "name", str(metric)),
        "scale": scale,
        "n": len(task),
        "seed": seed,
        "task_seed": task.seed,
        "version": package_version(),
    }
    rtol = getattr(model, "closure_rtol", None)
    if rtol is not None:  # the dtype's stated closure tolerance (decompositions accumulate in float64)
        p["closure_rtol"] = rtol
    if ref is not None:
        p["reference"] = ref
    p.update(extra)
    return p


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return None if math.isnan(f) else f
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def frame_to_json(df: pd.DataFrame) -> dict[str, Any]:
    return {"columns": list(map(str, df.columns)), "data": _jsonable(df.astype(object).values.tolist()),
            "dtypes": [str(t) for t in df.dtypes]}


def frame_from_json(obj: dict[str, Any]) -> pd.DataFrame:
    df = pd.DataFrame(obj["data"], columns=obj["columns"])
    for c, t in zip(obj["columns"], obj.get("dtypes", [])):
        if t.startswith(("float", "int", "bool")):
            df[c] = df[c].astype("float64" if t.startswith("float") else t)
        elif t == "category":  # categorical labels (sorted categories) read back as they were written
            df[c] = df[c].astype("category")
    return df


class Result:
    """Base class: a main frame, optional extra frames, and provenance."""

    kind: ClassVar[str] = "result"

    def __init__(self, frame: pd.DataFrame, provenance: dict[str, Any],
                 extras: dict[str, pd.DataFrame] | None = None) -> None:
        self._frame = frame.reset_index(drop=True)
        self.provenance = dict(provenance)
        self.extras = dict(extras or {})

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        _KINDS[cls.kind] = cls

    def to_frame(self) -> pd.DataFrame:
        """The tidy per-prompt frame (a copy)."""
        return self._frame.copy()

    def summary(self) -> pd.DataFrame:
        """Per-component means with t intervals (95 %)."""
        from .stats import summarise

        key = self._frame.columns[0]
        vals = [c for c in self._frame.columns if self._frame[c].dtype.kind == "f"]
        return summarise(self._frame, key, vals)

    def __repr__(self) -> str:
        p = self.provenance
        return (f"{type(self).__name__}(model={p.get('model')!r}, task={p.get('task')!r}, n={p.get('n')}, "
                f"rows={len(self._frame)})")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result as one JSON file (atomically); returns the path."""
        path = Path(path)
        if path.suffix != ".json":
            path = path.with_suffix(".json") if path.suffix == "" else path
        obj = {"kind": self.kind, "provenance": _jsonable(self.provenance), "frame": frame_to_json(self._frame),
               "extras": {k: frame_to_json(v) for k, v in self.extras.items()}}
        atomic_write_text(path, json.dumps(obj, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Result:
        """Read a result written by :meth:`save` (any kind when called on ``Result``)."""
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError: malformed JSON (with its line) or bytes that are not UTF-8
            raise InputError(f"cannot read a saved result from {path} ({e}); give a .json file written by "
                             "a result's save().") from None
        if not isinstance(obj, dict) or "frame" not in obj or "provenance" not in obj:
            raise InputError(f"cannot read a saved result from {path} (it holds JSON, but not a saved result); "
                             "give a .json file written by a result's save().")
        kind = _KINDS.get(obj.get("kind", ""), cls)
        if cls is not Result and not issubclass(kind, cls):
            raise InputError(f"{path} holds a {obj.get('kind')!r} result, not a {cls.kind!r} one.")
        out = kind.__new__(kind)
        Result.__init__(out, frame_from_json(obj["frame"]), obj["provenance"],
                        {k: frame_from_json(v) for k, v in obj.get("extras", {}).items()})
        return out


def load_result(path: str | os.PathLike) -> Result:
    """Load any saved result."""
    return Result.load(path)
