"""The hydra-probe command line: end to end on a tiny model folder (and the shipped model when present),
exit codes, one-line errors, --help."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tiny

import hydra_probe as hp
from hydra_probe import cli
from hydra_probe.zoo import DEFAULT_MODEL_DIR

FLAGS = ["--model", "--task", "--n-prompts", "--seed", "--value", "--corruption", "--metric", "--components",
         "--scale", "--device", "--out", "--overwrite"]
OUTPUTS = ["report.md", "report.html", "results.json", "tables/triangulation.csv", "tables/self_repair.csv",
           "tables/self_repair_contributions.csv", "tables/activation_patch_denoise.csv",
           "tables/activation_patch_noise.csv", "tables/direct_effects.csv", "tables/patch_vs_ablate.csv",
           "tables/hydra_slope.csv", "graph/compensation_graph.graphml", "graph/compensation_graph.gexf",
           "graph/compensation_graph.json", "graph/edges.csv"]
FIGURES = ["patch_vs_ablate", "evidence_map", "te_vs_de_lost", "heatmaps", "compensation_bars", "compensation_graph"]
OPTIONAL = {"attribution": ("tables/attribution_patch.csv", "attribution_vs_exact"),
            "path_patch": ("tables/path_patch.csv", None),
            "iterated_ablation": ("tables/iterated_ablation.csv", "iterated_ablation"),
            "paired_ablation": ("tables/paired_ablation.csv", None)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "tiny"
    tiny.hf_model("gpt2", layers=2, heads=2, d=16, initializer_range=0.3).save_pretrained(d)
    tiny.tokenizer().save_pretrained(d)
    return d


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def report(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "hydra_report"
    code = cli.main(["report", "--model", str(model_dir), "--n-prompts", "6", "--top", "2", "--out", str(out)])
    assert code == 0
    return out


def check_outputs(out: Path, results: dict) -> None:
    for f in OUTPUTS:
        assert (out / f).is_file(), f
    for name in FIGURES:
        for ext in ("png", "svg"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 1000, (name, ext)
    for key, (table, fig) in OPTIONAL.items():
        if key in results:
            assert (out / table).is_file(), table
            if fig:
                assert (out / "figures" / f"{fig}.png").is_file(), fig
    html = (out / "report.html").read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", html, flags=re.I)
    assert refs and all(r.startswith("data:") for r in refs)
    assert "<script" not in html.lower() and "<link" not in html.lower() and not re.search(r"url\((?!data:)", html)


def frame(obj: dict, key: str) -> pd.DataFrame:
    f = obj["results"][key]["frame"]
    return pd.DataFrame(f["data"], columns=f["columns"])


def test_report_end_to_end_on_a_model_folder(report, model_dir):
    obj = json.loads((report / "results.json").read_text())
    check_outputs(report, obj["results"])
    assert obj["config"]["components"] == "heads" and obj["config"]["value"] == "mean"
    assert obj["task"]["corruption"] == "swap" and obj["task"]["n"] == 6
    assert "hydra-probe report --model" in obj["rerun"]
    # the numbers are the API's
    m = hp.load_model(str(model_dir))
    task = hp.tasks.ioi(m, 6, corruption="swap", seed=0)
    sweeps = obj["config"]["exact_sweeps"]  # exact="auto" (the default): what AtP* could not rule out
    names = sweeps["ablation"]
    # the self-repair is "Why it repairs"' sweep: repair_mechanisms' exactly, self_repair's to float32 rounding
    sr = hp.repair_mechanisms(m, task, names).as_self_repair().to_frame()
    plain = hp.self_repair(m, task, names).to_frame()
    got = frame(obj, "self_repair")
    for col in ("total_effect", "de_lost", "self_repair", "clean_de"):
        np.testing.assert_array_equal(got[col].to_numpy(float), sr[col].to_numpy())
        np.testing.assert_allclose(got[col].to_numpy(float), plain[col].to_numpy(), rtol=1e-5, atol=2e-5)
    noise = hp.activation_patch(m, task, sweeps["noise"], "noise").to_frame()
    np.testing.assert_array_equal(frame(obj, "patch_noise")["patched_metric"].to_numpy(float),
                                  noise["patched_metric"].to_numpy())
    tri = pd.DataFrame(obj["tables"]["triangulation"]["data"], columns=obj["tables"]["triangulation"]["columns"])
    s = hp.repair_mechanisms(m, task, names).as_self_repair().summary().set_index("component")
    np.testing.assert_array_equal(tri.set_index("component").loc[s.index, "total_effect"].to_numpy(float),
                                  s["total_effect"].to_numpy())


def test_same_seed_gives_identical_results_json(report, model_dir, tmp_path, capsys):
    code, out, _ = run(["report", "--model", model_dir, "--n-prompts", 6, "--top", 2, "--out", tmp_path / "again",
                        "--no-figures"], capsys)
    assert code == 0
    a = json.loads((report / "results.json").read_text())
    b = json.loads((tmp_path / "again" / "results.json").read_text())
    assert a == b


def test_bad_input_exits_2_with_one_line_and_writes_nothing(model_dir, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"clean": "a b", "corrupted": "a c", "answer": " Mary", "alternative": " John"}\n')
    cases = [
        (["report", "--n-prompts", "0"], "positive integer"),
        (["report", "--model", model_dir, "--out", busy], "--overwrite"),
        (["report", "--model", model_dir, "--device", "cuda:7"], "device"),
        (["report", "--value", "median"], "invalid choice"),
        (["report", "--model", model_dir, "--task", tmp_path / "missing.jsonl"], "JSONL"),
        (["report", "--model", model_dir, "--task", jsonl, "--corruption", "abc"], "--corruption"),
        (["report", "--model", model_dir, "--metric", "prob"], "linear"),
        (["report", "--model", model_dir, "--components", "L9H9", "--out", tmp_path / "o1"], "L9H9"),
        (["ablate", "--model", model_dir, "--pair", "L0H0", "L0H0", "--out", tmp_path / "o2"], "overlaps"),
        (["report", "--model", tmp_path / "nope"], "no such folder"),
        (["report", "--frobnicate"], "unrecognized"),
        ([], "choose a command"),
    ]
    for argv, needle in cases:
        code, out, err = run(argv, capsys)
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (argv, err)
        assert needle in lines[0] and lines[0].startswith("hydra-probe: error:"), (argv, err)
        assert "Traceback" not in err + out
    assert [p.name for p in busy.iterdir()] == ["mine.txt"]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "t.jsonl"]  # no temporary folders left


def test_unexpected_errors_exit_1_and_leave_no_folder(model_dir, tmp_path, capsys, monkeypatch):
    import hydra_probe.report

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(hydra_probe.report, "triangulate", boom)
    code, out, err = run(["report", "--model", model_dir, "--n-prompts", 4, "--out", tmp_path / "r"], capsys)
    assert code == 1 and "boom" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_help_is_complete(capsys):
    for cmd in ("report", "ablate", "graph"):
        code, out, _ = run([cmd, "--help"], capsys)
        assert code == 0
        for flag in FLAGS:
            assert flag in out, (cmd, flag)
        assert "exit codes" in out
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and all(c in out for c in ("report", "ablate", "graph"))
    p = cli.build_parser()
    args = p.parse_args(["report"])
    assert args.model == "default" and args.out == "hydra_report/" and args.task == "ioi"


def test_ablate_single_set_and_paired_tables(model_dir, tmp_path, capsys):
    code, out, _ = run(["ablate", "--model", model_dir, "--n-prompts", 4, "--components", "L0H0,L1H0+L1H1"], capsys)
    assert code == 0
    assert "L0H0" in out and "L1H0+L1H1" in out and "lower bound" in out and "ablation mean" in out
    code, out, _ = run(["ablate", "--model", model_dir, "--n-prompts", 4, "--pair", "L0H0", "L1H1",
                        "--out", tmp_path / "pa"], capsys)
    assert code == 0 and "interaction" in out and "L1H1" in out
    assert (tmp_path / "pa" / "paired_ablation.json").is_file()
    back = hp.load_result(tmp_path / "pa" / "paired_ablation.json")
    assert set(back.to_frame()["first"]) == {"L0H0"}
    code, out, _ = run(["ablate", "--model", model_dir, "--n-prompts", 4, "--metric", "prob",
                        "--components", "L0H1"], capsys)
    assert code == 0 and "L0H1" in out and "metric prob" in out


def test_graph_writes_exports_and_drawing(model_dir, tmp_path, capsys):
    out_dir = tmp_path / "g"
    code, out, _ = run(["graph", "--model", model_dir, "--n-prompts", 4, "--verify", 2, "--out", out_dir], capsys)
    assert code == 0
    for f in ("compensation_graph.graphml", "compensation_graph.gexf", "compensation_graph.json", "edges.csv",
              "nodes.csv", "compensation_graph.png", "compensation_graph.svg", "self_repair.json"):
        assert (out_dir / f).is_file(), f
    G = hp.load_graph(out_dir / "compensation_graph.json")
    assert "NORM" in G and G.graph["value"] == "mean"


def test_console_script_is_installed_and_refuses_bad_input(tmp_path):
    exe = shutil.which("hydra-probe")
    argv = [exe] if exe else [sys.executable, "-m", "hydra_probe.cli"]
    p = subprocess.run(argv + ["report", "--n-prompts", "-3", "--out", str(tmp_path / "x")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "positive integer" in p.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.safetensors").exists(),
                    reason="the shipped model's weights (hydra_probe/zoo/default/model.safetensors) are not built yet")
def test_report_end_to_end_on_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "hydra_report"
    code, stdout, err = run(["report", "--n-prompts", 8, "--top", 2, "--out", out], capsys)
    assert code == 0, err
    obj = json.loads((out / "results.json").read_text())
    check_outputs(out, obj["results"])
    assert obj["model"]["name"] == "hydra_probe/default-ioi"
    m = hp.load_default_model()
    task = hp.tasks.ioi(m, 8, corruption="swap", seed=0)
    swept = obj["config"].get("exact_sweeps", {}).get("ablation") or "heads"  # exact="auto" (the default) ablates these
    sr = hp.repair_mechanisms(m, task, swept).as_self_repair().to_frame()  # the report's one sweep
    np.testing.assert_array_equal(frame(obj, "self_repair")["total_effect"].to_numpy(float),
                                  sr["total_effect"].to_numpy())
    np.testing.assert_allclose(frame(obj, "self_repair")["total_effect"].to_numpy(float),
                               hp.self_repair(m, task, swept).to_frame()["total_effect"].to_numpy(), rtol=1e-5,
                               atol=1e-4)
    den = hp.activation_patch(m, task, obj["config"]["exact_sweeps"]["denoise"], "denoise").to_frame()
    np.testing.assert_array_equal(frame(obj, "patch_denoise")["patched_metric"].to_numpy(float),
                                  den["patched_metric"].to_numpy())
