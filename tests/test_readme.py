"""The README's worked example runs as written (on the shipped model)."""

import contextlib
import io
import re
from pathlib import Path

import pytest

from hydra_probe.zoo import DEFAULT_MODEL_DIR

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.safetensors").exists(), reason="the shipped model is missing")
def test_worked_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "my_report" / "report.html").exists()
    assert "interaction" in out.getvalue()
