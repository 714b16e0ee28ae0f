"""The fast JSON writing of results and reports equals the plain per-cell conversion and ``json.dumps``."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from hydra_probe.results import Result, _jsonable, dumps_json, frame_from_json, frame_to_json


def _plain(df: pd.DataFrame) -> dict:
    """The per-cell reference: every cell through ``_jsonable``."""
    return {"columns": list(map(str, df.columns)), "data": _jsonable(df.astype(object).values.tolist()),
            "dtypes": [str(t) for t in df.dtypes]}


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 50
    f = pd.DataFrame({
        "component": [f"L{i % 3}H{i % 5}" for i in range(n)],
        "prompt": np.arange(n, dtype=np.int64),
        "value": rng.normal(size=n),
        "small": rng.normal(size=n).astype(np.float32),
        "flag": rng.random(n) > 0.5,
        "term": pd.Categorical(rng.choice(["pattern", "values", "norm"], n)),
        "note": [None if i % 7 == 0 else f"x{i}" for i in range(n)],
    })
    f.loc[::4, "value"] = np.nan
    f.loc[3, "small"] = np.nan
    return f


def test_frame_to_json_equals_the_per_cell_conversion():
    f = _frame()
    assert frame_to_json(f) == _plain(f)
    empty = f.iloc[:0]
    assert frame_to_json(empty) == _plain(empty)
    assert frame_to_json(pd.DataFrame(index=range(3))) == _plain(pd.DataFrame(index=range(3)))
    back = frame_from_json(json.loads(dumps_json(frame_to_json(f))))
    pd.testing.assert_frame_equal(back.drop(columns="small"), f.drop(columns="small"), check_dtype=False)


@pytest.mark.parametrize("obj", [
    {"a": [1, 2.5, None, "x", True], "b": {"c": [[1, None, "y"], [2.0, False, "z"]], "d": {}}, "e": []},
    [{"k": 1}, [1, 2], [[3]], "s"],
    {"rows": [[1, [2, 3]], [4, {"x": 5}]], "unicode": "é ∑ \n\"q\""},
    3.25, "text", None, [],
])
def test_dumps_json_reads_back_as_json_dumps(obj):
    text = dumps_json(obj)
    assert json.loads(text) == json.loads(json.dumps(obj, indent=1))


def test_dumps_json_writes_one_row_per_line():
    f = _frame()
    text = dumps_json({"frame": frame_to_json(f)})
    rows = [line.strip().rstrip(",") for line in text.splitlines()]
    rows = [r for r in rows if r.startswith("[") and r.endswith("]")]
    assert [json.loads(r) for r in rows] == frame_to_json(f)["data"]


def test_dumps_json_refuses_nan_and_infinity_unless_allowed():
    with pytest.raises(ValueError):
        dumps_json({"x": [[1.0, math.inf]]})
    with pytest.raises(ValueError):
        dumps_json({"x": math.nan})
    assert "Infinity" in dumps_json({"x": [[1.0, math.inf]]}, allow_nan=True)


def test_result_save_load_roundtrip(tmp_path):
    f = _frame().drop(columns=["note", "term"])
    r = Result(f, {"model": "m", "n": 3, "x": np.float64(0.5), "nan": float("nan")}, {"extra": f.head(3)})
    p = r.save(tmp_path / "r.json")
    back = Result.load(p)
    pd.testing.assert_frame_equal(back.to_frame(), r.to_frame(), check_dtype=False)
    pd.testing.assert_frame_equal(back.extras["extra"], f.head(3), check_dtype=False)
    assert back.provenance["x"] == 0.5 and back.provenance["nan"] is None
