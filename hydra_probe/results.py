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


def _column_json(s: pd.Series) -> list[Any]:
    """One column's values as JSON-ready Python objects (floats with NaN as None, ints, bools; other
    columns through :func:`_jsonable`), converted per column instead of per cell."""
    kind = s.dtype.kind if isinstance(s.dtype, np.dtype) else ""
    if kind == "f":
        v = s.to_numpy(dtype=np.float64)
        out = v.tolist()
        if np.isnan(v).any():
            out = [None if x != x else x for x in out]
        return out
    if kind in ("i", "u", "b"):
        return s.to_numpy().tolist()
    return [_jsonable(x) for x in s.astype(object).tolist()]


def frame_to_json(df: pd.DataFrame) -> dict[str, Any]:
    """``{"columns", "data" (one list per row, NaN as null), "dtypes"}``: read back by :func:`frame_from_json`."""
    cols = [_column_json(df.iloc[:, i]) for i in range(df.shape[1])]
    data = [list(r) for r in zip(*cols)] if cols else [[] for _ in range(len(df))]
    return {"columns": list(map(str, df.columns)), "data": data, "dtypes": [str(t) for t in df.dtypes]}


def dumps_json(obj: Any, allow_nan: bool = False) -> str:
    """``obj`` (JSON-ready: dicts, lists, str, numbers, bools, None) as JSON text: nested dicts and lists
    indented by one space, a list of rows (lists of scalars, as in :func:`frame_to_json`'s ``data``) one row
    per line and a list of scalars on one line, each written by the json module's C encoder (``json.dumps``
    with ``indent`` runs in Python: tens of seconds for a report's frames). NaN or infinity raise ValueError
    unless ``allow_nan`` (then written as ``json.dumps`` does).
    ``json.loads`` reads back the same object as from ``json.dumps(obj, indent=1)``."""
    out: list[str] = []
    _dump(obj, 0, out, json.JSONEncoder(allow_nan=allow_nan).encode)
    return "".join(out)


def _scalar(x: Any) -> bool:
    return x is None or isinstance(x, (str, int, float))


def _dump(x: Any, depth: int, out: list[str], enc: Any) -> None:
    if isinstance(x, dict) and x:
        pad = "\n" + " " * (depth + 1)
        out.append("{")
        for i, (k, v) in enumerate(x.items()):
            out.append(("," if i else "") + pad + enc(str(k)) + ": ")
            _dump(v, depth + 1, out, enc)
        out.append("\n" + " " * depth + "}")
    elif isinstance(x, (list, tuple)) and x and not all(map(_scalar, x)):
        pad = "\n" + " " * (depth + 1)
        if all(isinstance(r, (list, tuple)) for r in x):  # rows: one per line
            out.append("[" + pad + ("," + pad).join(enc(r) for r in x) + "\n" + " " * depth + "]")
            return
        out.append("[")
        for i, v in enumerate(x):
            out.append(("," if i else "") + pad)
            _dump(v, depth + 1, out, enc)
        out.append("\n" + " " * depth + "]")
    else:
        out.append(enc(x))


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
        atomic_write_text(path, dumps_json(obj, allow_nan=True))
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


def concat_results(first: Result, second: Result, order: list[str]) -> Result:
    """``first`` and ``second`` (one kind: the same analysis, with the same arguments, of other components) as one
    result with ``first``'s provenance: each frame's rows (main and extras) concatenated and put in ``order`` of
    their ``component`` column (stable; components not in ``order`` last). Categorical columns stay
    categorical, over the labels used (sorted)."""
    if type(first) is not type(second):
        raise InputError(f"cannot join a {type(first).__name__} and a {type(second).__name__}.")
    rank = {c: i for i, c in enumerate(order)}

    def joined(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
        f = pd.concat([a, b], ignore_index=True)
        for col in a.columns:
            if isinstance(a[col].dtype, pd.CategoricalDtype):
                f[col] = pd.Categorical(f[col].astype(object))
        if "component" in f.columns:
            key = f["component"].astype(object).map(rank).fillna(len(rank)).to_numpy()
            f = f.iloc[np.argsort(key, kind="stable")].reset_index(drop=True)
        return f

    extras = {k: joined(v, second.extras[k]) if k in second.extras else v for k, v in first.extras.items()}
    return type(first)(joined(first._frame, second._frame), first.provenance, extras)


def load_result(path: str | os.PathLike) -> Result:
    """Load any saved result."""
    return Result.load(path)
