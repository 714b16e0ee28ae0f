"""The triangulation report API: triangulate() collects result objects, save() writes every file."""

from __future__ import annotations

import json
import re

import matplotlib
import numpy as np
import pandas as pd
import pytest
import tiny

import hydra_probe as hp
from hydra_probe.claims import classify
from hydra_probe.report import VERDICTS, TriangulationReport
from hydra_probe.report import triangulation as tri_mod

FILES = ["report.md", "report.html", "results.json", "tables/triangulation.csv", "tables/self_repair.csv",
         "tables/direct_effects.csv", "tables/activation_patch_denoise.csv", "tables/activation_patch_noise.csv",
         "tables/self_repair_contributions.csv", "tables/patch_vs_ablate.csv", "tables/hydra_slope.csv"]
FIGURES = ["patch_vs_ablate", "evidence_map", "te_vs_de_lost", "heatmaps", "compensation_bars"]


@pytest.fixture(scope="module")
def setup():
    m = tiny.model("gpt2", layers=2, heads=2, d=16, initializer_range=0.3)
    task = hp.tasks.ioi(m, 6, corruption="swap", seed=0)
    rep = hp.triangulate(m, task, top=2, progress=False)
    return m, task, rep


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
    _, _, rep = setup
    out = tmp_path_factory.mktemp("rep") / "report"
    rep.save(out)
    return out


def test_table_has_one_row_per_component_and_documented_columns(setup):
    m, _, rep = setup
    t = rep.to_frame()
    assert sorted(t["component"]) == sorted(c.name for c in m.components("heads"))
    for col in ("direct_effect", "total_effect", "self_repair", "fraction_repaired", "lower_bound", "compensators",
                "restoration", "damage", "attribution", "verdict", "de_lost", "te_norm"):
        assert col in t.columns, col
    assert set(t["verdict"]) <= set(VERDICTS)
    assert t["importance"].is_monotonic_decreasing
    assert isinstance(rep, TriangulationReport) and "ioi" in repr(rep)


def test_report_holds_result_objects_whose_numbers_equal_the_api(setup):
    m, task, rep = setup
    # the default exact="auto" measures each head of this tiny random model where AtP* cannot rule it out (the
    # comparison with the exhaustive run is tests/test_exact_auto.py); the API is called on what the report swept
    assert rep.config["exact"] == "auto" and rep.to_frame()["measured"].ne("").all()
    heads = rep.config["exact_sweeps"]["ablation"]
    # with "Why it repairs" on, the self-repair is that section's sweep: exactly repair_mechanisms' (eager attention),
    # and self_repair's to float32 rounding
    sr = hp.repair_mechanisms(m, task, heads).as_self_repair()
    pd.testing.assert_frame_equal(rep.results["self_repair"].to_frame(), sr.to_frame())
    pd.testing.assert_frame_equal(rep.results["self_repair"].to_frame(), hp.self_repair(m, task, heads).to_frame(),
                                  check_exact=False, rtol=1e-5, atol=2e-5)
    den = hp.activation_patch(m, task, rep.config["exact_sweeps"]["denoise"], "denoise")
    s = den.summary().set_index("component")["score"]
    t = rep.to_frame().set_index("component")
    np.testing.assert_allclose(t.loc[s.index, "restoration"], s, rtol=0, atol=0)
    te = sr.summary().set_index("component")["total_effect"]
    np.testing.assert_allclose(t.loc[te.index, "total_effect"], te, rtol=0, atol=0)
    top = sr.summary(top_fraction=0.25).set_index("component")
    np.testing.assert_allclose(t.loc[top.index, "self_repair_top"], top["self_repair"], rtol=0, atol=0)
    for key in ("direct_effects", "self_repair", "patch_denoise", "patch_noise"):
        p = rep.results[key].provenance
        assert p["task"] == "ioi" and p["corruption"] == "swap" and p["n"] == 6 and p["metric"] == "logit_diff"


def test_every_section_ran(setup):
    _, _, rep = setup
    for key in ("direct_effects", "self_repair", "patch_denoise", "patch_noise", "attribution", "path_patch"):
        assert key in rep.results, key
    assert "iterated_ablation" in rep.results or any("iterated ablation" in n for n in rep.notes)
    assert "paired_ablation" in rep.results or any("paired ablation" in n for n in rep.notes)
    assert rep.graph is not None and "NORM" in rep.graph
    assert np.isfinite(rep.hydra["slope"])


def test_table_verdicts_are_the_verdict_module_applied_to_the_table(setup):
    """The report's verdicts are claims.classify on its own table (the rule itself is tested on hand-made
    frames in test_verdicts.py)."""
    _, _, rep = setup
    t = rep.to_frame()
    want = classify(t, rep.config["threshold"], rep.baseline["verdict_scale"])
    assert list(t["verdict"]) == list(want["verdict"])


def test_save_writes_every_file_and_results_json_equals_the_objects(setup, saved):
    _, _, rep = setup
    for f in FILES:
        assert (saved / f).is_file(), f
    for name in FIGURES:
        for ext in ("png", "svg"):
            assert (saved / "figures" / f"{name}.{ext}").stat().st_size > 1000, name
    for ext in ("graphml", "gexf", "json"):
        assert (saved / "graph" / f"compensation_graph.{ext}").is_file()
    obj = json.loads((saved / "results.json").read_text())
    assert obj["version"] == hp.__version__
    assert obj["config"]["value"] == "mean" and obj["config"]["seed"] == 0
    assert obj["provenance"]["corruption"] == "swap"
    assert len(obj["task"]["pairs"]) == 6
    res = obj["results"]["self_repair"]
    f = pd.DataFrame(res["frame"]["data"], columns=res["frame"]["columns"])
    np.testing.assert_array_equal(f["total_effect"].to_numpy(float),
                                  rep.results["self_repair"].to_frame()["total_effect"].to_numpy())
    csv = pd.read_csv(saved / "tables" / "triangulation.csv")
    np.testing.assert_allclose(csv["total_effect"], rep.to_frame()["total_effect"], rtol=1e-12)


def test_load_round_trips_the_report(setup, saved):
    _, _, rep = setup
    back = TriangulationReport.load(saved)
    a, b = rep.to_frame(), back.to_frame()
    pd.testing.assert_frame_equal(a.drop(columns=["lower_bound"]), b.drop(columns=["lower_bound"]),
                                  check_dtype=False)
    assert back.graph.number_of_edges() == rep.graph.number_of_edges()
    assert back.summary() == rep.summary()


def test_html_is_self_contained(saved):
    html = (saved / "report.html").read_text()
    srcs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", html, flags=re.I)
    assert srcs and all(s.startswith("data:") for s in srcs), [s[:40] for s in srcs if not s.startswith("data:")]
    assert "<script" not in html.lower() and "<link" not in html.lower() and "@import" not in html
    assert not re.search(r"url\((?!data:)", html)
    assert html.count("data:image/png;base64,") >= len(FIGURES)


def test_markdown_states_claims_with_their_conditions(saved):
    md = (saved / "report.md").read_text()
    for section in ("Key findings", "Triangulation table", "Patch clean A vs ablate A", "Hydra effect",
                    "Layer x head maps", "compensation graph", "Paired-ablation confirmations", "Iterated ablation",
                    "Provenance", "Re-run"):
        assert section in md, section
    assert "ablation value `mean`" in md and "corruption `swap`" in md and "metric `logit_diff`" in md
    assert "verdict: B -> \"masked by self-repair\"" in md and "scale = |clean| kept between" in md
    assert "verdict scale (TE, DE lost)" in md
    assert "figures/heatmaps.png" in md


def test_refuses_a_non_empty_folder_and_leaves_it_untouched(setup, tmp_path):
    _, _, rep = setup
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(hp.OutputError, match="overwrite"):
        rep.save(out, figures=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no temporary folder left
    rep.save(out, overwrite=True, figures=False)
    assert (out / "results.json").is_file() and not (out / "keep.txt").exists()


def test_bad_arguments_fail_before_any_work(setup):
    m, task, _ = setup
    with pytest.raises(hp.MetricError, match="linear"):
        hp.triangulate(m, task, metric="prob")
    with pytest.raises(hp.OptionError, match="top"):
        hp.triangulate(m, task, top=0)
    with pytest.raises(hp.OptionError, match="threshold"):
        hp.triangulate(m, task, threshold=2)
    with pytest.raises(hp.ComponentError):
        hp.triangulate(m, task, components="resid")
    with pytest.raises(hp.OptionError):
        hp.triangulate(m, task, value="median")


def test_figures_leave_global_matplotlib_state_alone(setup, tmp_path):
    _, _, rep = setup
    before = dict(matplotlib.rcParams)
    backend = matplotlib.get_backend()
    from hydra_probe.report import figures as F

    fig = F.heatmaps(rep.to_frame())
    F.save_figure(fig, tmp_path, "h")
    after = dict(matplotlib.rcParams)
    assert {k for k in before if before[k] != after[k] and k != "backend"} == set()
    assert matplotlib.get_backend() == backend


def test_progress_messages_name_each_step():
    import io

    buf = io.StringIO()
    steps = tri_mod.Steps(total=2, enabled=True, stream=buf)
    with steps.step("a", "direct effects"):
        pass
    with steps.step("b", "self-repair"):
        pass
    text = buf.getvalue()
    assert "[1/2] direct effects ..." in text and "[2/2] self-repair:" in text and set(steps.timings) == {"a", "b"}
    quiet = io.StringIO()
    with tri_mod.Steps(total=1, enabled=None, stream=quiet).step("a", "x"):  # not a terminal: silent
        pass
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_whole_report_on_other_families(family, tmp_path):
    """The main job on a Llama-2-style model (dummy-prefix tokenizer with BOS, grouped-query attention, RMSNorm)
    and on a parallel-residual GPT-NeoX: every section runs and the self-repair rows close."""
    if family == "llama":
        tok = tiny.sp_tokenizer()
        m = hp.load_model(tiny.hf_model("llama", layers=2, vocab=len(tok.get_vocab())), tokenizer=tok)
    else:
        m = tiny.model("neox", layers=2)
    task = hp.tasks.ioi(m, 6, corruption="abc", seed=0)
    rep = hp.triangulate(m, task, top=2, progress=False)
    for key in ("direct_effects", "self_repair", "patch_denoise", "patch_noise", "attribution", "path_patch"):
        assert key in rep.results, (key, rep.notes)
    sr = rep.results["self_repair"]
    rows = sr.contributions().groupby(["component", "prompt"]).delta_de.sum()
    want = sr.to_frame().set_index(["component", "prompt"]).self_repair
    assert (rows - want.loc[rows.index]).abs().max() < 1e-4
    rep.save(tmp_path / "rep")
    assert (tmp_path / "rep" / "report.html").exists()


def test_adding_a_section_is_one_function_and_one_list_entry(setup, tmp_path, monkeypatch):
    from hydra_probe.report import document

    def why_it_repairs(d, ctx):
        d.h(2, "Why it repairs")
        d.p(f"{len(ctx.table)} components, top {ctx.top[0]}.")

    monkeypatch.setattr(document, "SECTIONS", [*document.SECTIONS[:-1], why_it_repairs, document.SECTIONS[-1]])
    _, _, rep = setup
    out = rep.save(tmp_path / "r", figures=False)
    md = (out / "report.md").read_text()
    assert "## Why it repairs" in md and md.index("## Why it repairs") < md.index("## Provenance")
    assert "<h2>Why it repairs</h2>" in (out / "report.html").read_text()


def _imports(root):
    """{module: modules it imports}, module-level and inside functions, for every module of the package."""
    import ast
    import pathlib

    mods = {}
    for p in pathlib.Path(root).rglob("*.py"):
        parts = list(p.relative_to(pathlib.Path(root).parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    edges = {}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        out = set()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + [node.module or ""]
                                ).strip(".") if node.level else node.module or ""
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                out |= set(subs) if len(subs) == len(node.names) else {base, *subs}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
        edges[m] = {t for t in out if t in mods and t != m}
    return edges


def test_report_and_claims_import_no_cycle_and_not_the_package_root():
    import networkx as nx

    import hydra_probe

    edges = _imports(__import__("pathlib").Path(hydra_probe.__file__).parent)
    G = nx.DiGraph([(a, b) for a, bs in edges.items() for b in bs])
    cycles = list(nx.simple_cycles(G))
    assert not [c for c in cycles if any(m.startswith(("hydra_probe.report", "hydra_probe.claims")) for m in c)], cycles
    for m, targets in edges.items():
        if m.startswith(("hydra_probe.report", "hydra_probe.claims", "hydra_probe.formatting", "hydra_probe.stats")):
            assert "hydra_probe" not in targets, m
    # the verdicts sit below the report: claims never imports report
    assert not any(t.startswith("hydra_probe.report") for m, ts in edges.items() if m.startswith("hydra_probe.claims")
                   for t in ts)


def test_whole_attention_layers_report_without_the_mechanisms_section(tmp_path):
    """components='layers' (ATTN{l}): "Why it repairs" splits heads and MLPs, so it is skipped with a note, and the
    rest of the report (default exact='auto', mechanisms on) runs and saves."""
    m = tiny.model64("llama", layers=2, heads=4)
    task = hp.tasks.ioi(m, 6, corruption="abc", seed=0)
    rep = hp.triangulate(m, task, components="layers", top=1, iterate=1, progress=False)
    assert sorted(rep.to_frame()["component"]) == ["ATTN0", "ATTN1"]
    assert "repair_mechanisms" not in rep.results
    assert any(n.startswith("why it repairs: skipped; no head or MLP") for n in rep.notes), rep.notes
    out = rep.save(tmp_path / "r", figures=False)
    assert "why it repairs: skipped" in (out / "report.md").read_text()
