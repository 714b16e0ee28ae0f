"""compare_conditions: every cell equals the single-condition analyses run on their own, the summary names
the factor that changes a verdict, and bad input fails before any forward pass."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tiny
import torch

import hydra_probe as hp
from hydra_probe.claims.conditions import compare_conditions, compare_tasks
from hydra_probe.claims.verdicts import classify, verdict_scale, verdict_table
from hydra_probe.runner import Runner

COMPS = ["L0H1", "L1H2", "MLP1"]


def single_cell(model, task, comps, value, metric, seed=0, threshold=0.1):
    """The single-condition analyses, run on their own, assembled like the report does; None if unpatchable."""
    m = hp.METRICS[metric]
    try:
        den = hp.activation_patch(model, task, comps, "denoise", metric=metric, progress=False)
    except hp.MetricError:
        return None
    noi = hp.activation_patch(model, task, comps, "noise", metric=metric, progress=False)
    g = den.to_frame().drop_duplicates("prompt")
    base = {"clean_metric": g.clean_metric.mean(), "corrupted_metric": g.corrupted_metric.mean()}
    base["gap"] = base["clean_metric"] - base["corrupted_metric"]
    if m.linear:
        sr = hp.self_repair(model, task, comps, value=value, metric=metric, seed=seed, progress=False)
        de = hp.direct_effects(model, task, comps, metric=metric)
        meta = de.to_frame().drop_duplicates("component")[["component", "layer", "head", "kind"]]
        t = verdict_table(components=meta, direct=de.summary(), self_repair=sr.summary(),
                          self_repair_top=sr.summary(top_fraction=0.25), contributions=sr.contribution_summary(),
                          denoise=den.summary(), noise=noi.summary(), baseline=base, threshold=threshold)
    else:
        ab = hp.ablate(model, task, comps, value=value, metric=metric, seed=seed, progress=False).summary()
        t = ab[["component", "total_effect", "total_effect_lo", "total_effect_hi"]].copy()
        for k in ("de_lost", "de_lost_lo", "de_lost_hi", "self_repair"):
            t[k] = np.nan
        t["lower_bound"] = False
        for res, name in ((den, "restoration"), (noi, "damage")):
            t[name] = t.component.map(res.summary().set_index("component")["score"])
        t["verdict"] = classify(t, threshold, verdict_scale(base["clean_metric"], base["corrupted_metric"]))["verdict"]
    return t.set_index("component")


def assert_cells_equal(model, task_of, cmp, comps, cells):
    f = cmp.to_frame()
    for c, v, m in cells:
        exp = single_cell(model, task_of(c), comps, v, m)
        got = f[(f.corruption == c) & (f.value == v) & (f.metric == m)].set_index("component").loc[comps]
        cols = ["total_effect", "total_effect_lo", "total_effect_hi", "de_lost", "self_repair"]
        if exp is None:  # the corruption does not move this metric: the single analysis refuses, the cell says so
            assert got.restoration.isna().all() and got.note.str.contains("unchanged").all()
        else:
            exp = exp.loc[comps]
            cols += ["restoration", "damage"]
            assert (got.verdict == exp.verdict).all(), (c, v, m, got.verdict.tolist(), exp.verdict.tolist())
        for k in cols:
            # float32 forwards stacked differently agree to rounding, not bit for bit (scores divide by the gap)
            np.testing.assert_allclose(got[k].to_numpy(float), exp[k].to_numpy(float), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{k} at {c}/{v}/{m}")
        assert got.linear.all() == hp.METRICS[m].linear
        assert got.de_lost.isna().all() != hp.METRICS[m].linear


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_every_cell_equals_the_single_condition_analysis(family):
    model = tiny.model(family, layers=2, initializer_range=0.5)  # large weights: corruptions move the metrics
    task = hp.tasks.ioi(model, n_prompts=6, corruption="swap", seed=1)
    cmp = compare_conditions(model, task, COMPS, progress=False)
    f = cmp.to_frame()
    assert len(f) == len(COMPS) * 2 * 3 * 2
    assert list(f.columns[:5]) == ["component", "family", "corruption", "value", "metric"]
    cells = ([("swap", "zero", "logit_diff"), ("swap", "mean", "logprob"), ("abc", "resample", "logit_diff"),
              ("abc", "mean", "logprob")] if family == "gpt2"
             else [("abc", "zero", "logit_diff"), ("swap", "resample", "logprob")])
    assert_cells_equal(model, lambda c: hp.tasks.ioi(model, n_prompts=6, corruption=c, seed=1), cmp, COMPS, cells)
    # the per-prompt frames are those of the single analyses
    pp = cmp.per_prompt("ablation")
    one = pp[(pp.value == "mean") & (pp.metric == "logit_diff")].set_index(["component", "prompt"])
    sr = hp.self_repair(model, task, COMPS, value="mean", progress=False).to_frame().set_index(["component", "prompt"])
    np.testing.assert_allclose(one.loc[sr.index, "self_repair"], sr.self_repair, rtol=1e-5, atol=1e-5)
    assert set(cmp.per_prompt("patching").direction) == {"denoise", "noise"}


def test_a_second_two_column_metric_equals_its_single_analysis():
    """A second metric that reads the answer's logit alone ("logit", beside the runner's "logit_diff") is read
    from the sweep's final residuals through the two unembedding columns: its cells are its single analyses'."""
    model = tiny.model("llama", layers=2, initializer_range=0.5)
    task = hp.tasks.ioi(model, n_prompts=6, corruption="swap", seed=1)
    cmp = compare_conditions(model, task, COMPS, corruptions=("swap",), values=("mean", "zero"),
                             metrics=("logit_diff", "logit"), progress=False)
    assert_cells_equal(model, lambda c: hp.tasks.ioi(model, n_prompts=6, corruption=c, seed=1), cmp, COMPS,
                       [("swap", "mean", "logit"), ("swap", "zero", "logit")])


def test_shipped_model_cells_and_the_verdict_of_the_report():
    model = hp.load_default_model()
    comps = ["L1H5", "L2H1", "L3H5"]
    task = hp.tasks.ioi(model, n_prompts=8, corruption="abc", seed=2, names="heldout")
    cmp = compare_conditions(model, task, comps, corruptions=("abc", "swap"), values=("mean", "zero"),
                             progress=False)
    assert_cells_equal(model, lambda c: hp.tasks.ioi(model, n_prompts=8, corruption=c, seed=2, names="heldout"),
                       cmp, comps, [("abc", "mean", "logit_diff"), ("swap", "zero", "logprob")])
    s = cmp.summary()
    assert list(s.component) == comps and (s.n_conditions == 8).all()
    assert cmp.reference == {"family": "ioi", "corruption": "abc", "value": "mean", "metric": "logit_diff"}
    assert len(cmp.sentences()) == 3 and all(x.startswith(c) for x, c in zip(cmp.sentences(), comps))
    assert cmp.grid().shape == (3, 8)


# ---------------------------------------------------------------------- a hand-set model with a known answer
def constant_heads_model():
    """One layer, two heads whose outputs are constant: zero ablation removes them, mean/resample ablation
    changes nothing (see tests/test_handset.py for the closed form). The last token of the corrupted prompt
    embeds to [2, -2, -4, 4], which flips the logit difference from 2 to -2 (gap 4)."""
    from test_handset import handset_model

    m = handset_model()
    w1 = m.tokenizer("w1", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        m.hf_model.transformer.wte.weight[w1] = torch.tensor([2.0, -2.0, -4.0, 4.0])
    rows = [{"clean": f"Then , {a} and {b} w0", "corrupted": f"Then , {a} and {b} w1", "answer": " Mary",
             "alternative": " John"} for a, b in (("Tom", "Amy"), ("Sid", "Bob"), ("Dan", "Ben"), ("Amy", "Sid"))]
    return m, hp.tasks.from_pairs(m, rows, name="handset")


def test_handset_verdict_changes_with_the_ablation_value_and_the_summary_names_it():
    m, task = constant_heads_model()
    cmp = compare_conditions(m, task, ["L0H0", "L0H1"], corruptions=("custom",), values=("zero", "mean", "resample"),
                             metrics=("logit_diff",), progress=False)
    f = cmp.to_frame().set_index(["component", "value"])
    s = 1 / np.sqrt(2.125)
    assert f.loc[("L0H0", "zero"), "total_effect"] == pytest.approx(2 - s, abs=1e-6)
    assert f.loc[("L0H0", "zero"), "de_lost"] == pytest.approx(1.5, abs=1e-6)
    assert f.loc[("L0H0", "zero"), "gap"] == pytest.approx(4.0, abs=1e-6)
    assert f.loc[("L0H0", "zero"), "verdict_scale"] == pytest.approx(2.0, abs=1e-6)  # |clean| in [gap/2, gap]
    assert f.loc[("L0H0", "zero"), "verdict"] == "necessity only"  # TE/scale = 0.66, nothing to patch
    assert f.loc[("L0H1", "zero"), "verdict"] == "necessity only"  # TE/scale = (2 - 3/sqrt(3.125)) / 2 = 0.15
    for c in ("L0H0", "L0H1"):
        for v in ("mean", "resample"):
            assert abs(f.loc[(c, v), "total_effect"]) < 1e-6 and f.loc[(c, v), "verdict"] == "agree: minor"
    summ = cmp.summary().set_index("component")
    for c in ("L0H0", "L0H1"):
        assert summ.loc[c, "disagree"] and summ.loc[c, "factors"] == "value"
        assert summ.loc[c, "holds"] == 1 and summ.loc[c, "n_conditions"] == 3
    assert "value: zero → necessity only; mean → agree: minor; resample → agree: minor" in summ.loc["L0H0", "changes"]
    assert cmp.sentences(["L0H0"]) == ['L0H0: "necessity only" in 1 of 3 conditions; always with value zero; never with '
                                       'value mean or resample; otherwise agree: minor (2); changed by value.']


def test_no_disagreement_is_not_flagged_and_families_are_a_factor():
    m, task = constant_heads_model()
    other = task.subset([0, 1])
    cmp = compare_tasks(m, {"first": task, "second": other}, components=["L0H0"], corruptions=("custom",),
                        values=("mean",), metrics=("logit_diff",), progress=False)
    s = cmp.summary().iloc[0]
    assert not s.disagree and s.factors == "" and s.holds == 2
    assert set(cmp.to_frame().family) == {"first", "second"}
    assert "under every condition" in cmp.sentences()[0]


def test_prompt_families_each_equal_their_own_comparison():
    model = tiny.model("gpt2", layers=2, initializer_range=0.5)
    t = hp.tasks.ioi(model, n_prompts=8, corruption="swap", seed=3)
    fams = {"first_half": t.subset(range(4)), "second_half": t.subset(range(4, 8))}
    # zero ablation: a half has a single prompt of some lengths, where a mean would be degenerate (refused)
    both = compare_tasks(model, fams, components=["L1H0"], values=("zero",), progress=False).to_frame()
    for name, task in fams.items():
        alone = compare_conditions(model, task, ["L1H0"], values=("zero",), progress=False).to_frame()
        got = both[both.family == name].drop(columns="family").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, alone.drop(columns="family"), check_exact=False, rtol=1e-9)


def test_save_and_load_keep_the_summary(tmp_path):
    m, task = constant_heads_model()
    cmp = compare_conditions(m, task, ["L0H0"], corruptions=("custom",), values=("zero", "mean"),
                             metrics=("logit_diff", "logprob"), progress=False)
    assert cmp.to_frame().query("metric == 'logprob'").note.str.contains("not linear").all()
    back = hp.load_result(cmp.save(tmp_path / "c.json"))
    pd.testing.assert_frame_equal(back.summary(), cmp.summary())
    assert json.loads((tmp_path / "c.json").read_text())["kind"] == "conditions"


# ---------------------------------------------------------------------- bad input, before any work
@pytest.fixture
def no_forward(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a forward pass ran before the arguments were checked")
    monkeypatch.setattr(Runner, "prefix", refuse)
    monkeypatch.setattr(Runner, "run", refuse)


@pytest.mark.parametrize("kw, err, words", [
    (dict(corruptions=("swap", "shuffle")), hp.OptionError, "unknown corruption 'shuffle'"),
    (dict(values=("zero", "median")), hp.OptionError, "unknown ablation value 'median'"),
    (dict(metrics=("logit_diff", "bleu")), hp.MetricError, "unknown metric 'bleu'"),
    (dict(corruptions=()), hp.OptionError, "corruptions is empty"),
    (dict(values=[]), hp.OptionError, "ablation values is empty"),
    (dict(metrics=()), hp.OptionError, "metrics is empty"),
    (dict(values=("mean", "mean")), hp.OptionError, "twice"),
    (dict(threshold=2.0), hp.OptionError, "threshold"),
])
def test_bad_lists_fail_before_any_work(no_forward, kw, err, words):
    model = tiny.model("gpt2", layers=2)
    task = hp.tasks.ioi(model, n_prompts=4)
    with pytest.raises(err, match=words):
        compare_conditions(model, task, ["L0H1"], **kw)


def test_a_jsonl_task_has_only_its_own_corruption(no_forward, tmp_path):
    model = tiny.model("gpt2", layers=2)
    path = tmp_path / "pairs.jsonl"
    hp.tasks.ioi(model, n_prompts=4).to_jsonl(path)
    task = hp.tasks.from_jsonl(model, path)
    with pytest.raises(hp.TaskError, match=r"cannot make the corruption 'swap', 'abc': it has only 'custom'"):
        compare_conditions(model, task, ["L0H1"])
    with pytest.raises(hp.OptionError, match="prompt families"):
        compare_tasks(model, {})


# ---------------------------------------------------------------------- the report's section and the command line
def test_report_section_agrees_with_the_triangulation_table(tmp_path):
    from hydra_probe.report.document import build_doc
    from hydra_probe.report.render import to_markdown

    model = hp.load_default_model()
    comps = ["L1H5", "L2H1", "L3H5", "L0H2"]
    task = hp.tasks.ioi(model, n_prompts=6, seed=4, names="heldout")
    rep = hp.triangulate(model, task, components=comps, top=2, iterate=0, progress=False)
    table = rep.to_frame().set_index("component")
    backups = table.reset_index()[["component", "confirmed_backups", "iterated_cost", "iterated_backups"]]
    cmp = compare_conditions(model, task, comps, corruptions=("swap", "abc"), values=("mean", "zero"),
                             backups=backups.assign(value="mean", metric="logit_diff"), progress=False)
    # the reference condition is the report's own, and its verdicts are the report's
    ref = cmp.to_frame().query("corruption == 'swap' and value == 'mean' and metric == 'logit_diff'")
    assert dict(zip(ref.component, ref.verdict)) == dict(table.loc[comps, "verdict"])
    # restoration on the rows the report patched exactly (exact="auto": the others are estimated, left blank)
    swept = [c for c in comps if "denoise" in table.loc[c, "measured"].split(", ")]
    assert len(swept) >= 2 and table.loc[[c for c in comps if c not in swept], "restoration"].isna().all()
    np.testing.assert_allclose(ref.set_index("component").loc[swept, "restoration"], table.loc[swept, "restoration"],
                               rtol=1e-9)
    rep.results["conditions"] = cmp
    md = to_markdown(build_doc(rep, {}))
    assert "## Does the claim survive another counterfactual?" in md
    assert "Under which choices does each claim hold?" in md and "differs from the triangulation" not in md
    for c in rep.top_components():
        assert f"- {c}: \"" in md
    back = hp.TriangulationReport.load(rep.save(tmp_path / "rep", figures=False))
    assert isinstance(back.results["conditions"], hp.ConditionComparison)
    pd.testing.assert_frame_equal(back.results["conditions"].summary(), cmp.summary())


def test_cli_conditions_writes_a_folder_and_refuses_bad_lists(tmp_path, capsys):
    from hydra_probe.cli import main

    out = tmp_path / "cond"
    assert main(["conditions", "--n-prompts", "4", "--components", "L1H5,L2H1", "--conditions", "abc,zero,logprob",
                 "--out", str(out), "--no-figures", "--quiet"]) == 0
    f = pd.read_csv(out / "conditions.csv")
    assert set(f.corruption) == {"swap", "abc"} and set(f.value) == {"mean", "zero"}
    assert set(f.metric) == {"logit_diff", "logprob"} and len(f) == 2 * 8
    assert (out / "conditions.md").read_text().count("Does the claim survive another counterfactual?") == 1
    assert "L1H5" in capsys.readouterr().out
    assert main(["conditions", "--conditions", "abc,median", "--out", str(tmp_path / "x")]) == 2
    assert "'median' is neither a corruption" in capsys.readouterr().err
    path = tmp_path / "pairs.jsonl"
    hp.tasks.ioi(hp.load_default_model(), n_prompts=4).to_jsonl(path)
    assert main(["report", "--task", str(path), "--conditions", "swap", "--out", str(tmp_path / "r")]) == 2
    assert "cannot make the corruption 'swap'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "r").exists()


def test_clean_runs_are_shared_by_corruptions_and_metrics(monkeypatch):
    from hydra_probe.models.adapter import Adapter

    model = tiny.model("gpt2", layers=2, initializer_range=0.5)
    task = hp.tasks.ioi(model, n_prompts=6, corruption="swap", seed=1)
    calls = []
    real = Adapter.prefix
    monkeypatch.setattr(Adapter, "prefix", lambda self, ids, *a, **k: calls.append(ids) or real(self, ids, *a, **k))
    compare_conditions(model, task, ["L1H0"], metrics=("logit_diff", "logit", "logprob"), progress=False)
    clean = {tuple(map(tuple, t.tolist())) for t in (task.batch(g) for g in task.groups())}
    ran = [tuple(map(tuple, c.tolist())) for c in calls]
    # one unedited forward per length group of clean prompts, and of each corruption's corrupted prompts
    assert sorted(ran.count(c) for c in clean) == [1] * len(clean)
    assert len(ran) == 3 * len(task.groups())
