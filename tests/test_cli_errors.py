"""The command line's side of the error catalogue (analyses/error_catalogue.py, CLI_ENTRIES).

Each bad command line exits with code 2 and ONE line on stderr (no
traceback), names what was wrong, and leaves no output folder (an existing
one stays exactly as it was); the line is the one docs/errors.md shows. One
entry also runs as a real subprocess, and an interrupted report leaves
nothing behind.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_errors import CAT, DOC, _norm

from hydra_probe import cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "tiny"
    CAT.save_tiny_model(d)
    return d


def check_one_line(r, words):
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("hydra-probe: error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.mark.parametrize("entry", CAT.CLI_ENTRIES, ids=[e.key for e in CAT.CLI_ENTRIES])
def test_cli_catalogue_entry(entry, model_dir, tmp_path):
    r = CAT.run_cli(entry, tmp_path, model_dir)
    line = check_one_line(r, entry.words)
    # no output folder appeared, and whatever was there before is byte-for-byte unchanged
    assert r.files_after == r.files_before
    if entry.out is not None and entry.out not in r.files_before:
        assert not (tmp_path / entry.out).exists()
    assert not [f for f in r.files_after if ".partial" in f or f.endswith(".old")]
    assert not entry.portable or _norm(line) in _norm(DOC), "docs/errors.md is out of date: run analyses/error_catalogue.py"
    assert r.code == entry.code, line


def test_cli_bad_component_in_a_real_process(model_dir, tmp_path):
    """A real process: the model loads, then one line and exit 2 (no progress bars or warnings on stderr)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "hydra_probe.cli", "ablate", "--model", str(model_dir),
                        "--components", "MLP7", "--out", "out"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        "hydra-probe: error: component 'MLP7': layer 7 is out of range; this model has layers 0..1."]
    assert p.stdout == "" and list(tmp_path.iterdir()) == []


def test_cli_interrupted_report_leaves_nothing(model_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the report is being written: exit 1, one line, no report folder and no temporary folder;
    an existing report asked to be overwritten stays as it was."""
    import hydra_probe.report.render as render

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(render, "to_html", interrupted)  # the last file the report writes
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.md").write_text("the previous report")
    for out, extra in ((tmp_path / "new", []), (old, ["--overwrite"])):
        code = cli.main(["report", "--model", str(model_dir), "--n-prompts", "4", "--top", "1", "--no-figures",
                         "--quiet", "--out", str(out), *extra])
        _, err = capsys.readouterr()
        assert code == 1 and err.strip().splitlines() == ["hydra-probe: error: interrupted; nothing was written"]
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert [p.name for p in old.iterdir()] == ["report.md"] and (old / "report.md").read_text() == "the previous report"
