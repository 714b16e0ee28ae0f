"""triangulate(exact="auto"), the default (issue 14): AtP* and the direct effects decide which components are swept
exactly; the rest are marked estimated. Checked against the exhaustive run (exact="all") on the shipped model and
on a tiny model of every family: the same verdict for every component the exhaustive run does not call minor and
for its top 10, and the same numbers on every swept row."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pandas as pd
import pytest
import tiny
import torch

import hydra_probe as hp
from hydra_probe import cli
from hydra_probe.models.sites import Site
from hydra_probe.report import triangulation as tri
from hydra_probe.report.exact_check import largest_shortfall, widened

MINOR = "agree: minor"
MEASURED = ["total_effect", "de_lost", "self_repair", "restoration", "damage"]


def both(m, task, **kw):
    """(auto, exhaustive) reports and their tables indexed by component."""
    auto = hp.triangulate(m, task, exact="auto", progress=False, **kw)
    full = hp.triangulate(m, task, exact="all", progress=False, **kw)
    return auto, full, auto.to_frame().set_index("component"), full.to_frame().set_index("component")


#: The measured columns of each measurement exact="auto" sweeps or rules out.
COLUMNS = {"denoise": ["restoration"], "noise": ["damage"], "ablation": ["total_effect", "de_lost", "self_repair"]}


def made_in(a: pd.DataFrame, k: str) -> pd.Series:
    """Whether each row's ``measured`` lists measurement ``k``."""
    return a["measured"].map(lambda m: k in m.split(", "))


def check_against_exhaustive(auto, a: pd.DataFrame, f: pd.DataFrame, rtol: float) -> None:
    """The issue's claim, row by row, plus what estimated cells must look like. ``rtol``: the swept measurements'
    numbers against the exhaustive run's (the same computations, batched with other components)."""
    assert f["exact"].all() and (f["measured"] == "denoise, noise, ablation").all()
    assert sorted(a.index) == sorted(f.index)
    matter = f.index[f["verdict"] != MINOR]
    assert a.loc[matter, "measured"].ne("").all(), a.loc[matter, ["measured", "verdict"]]  # each one is swept
    matter = list(dict.fromkeys([*matter, *f.index[:10]]))  # and the exhaustive top 10 (swept, or minor there too)
    got, want = a.loc[matter, "verdict"], f.loc[matter, "verdict"]
    assert (got == want).all(), pd.concat([got.rename("auto"), want.rename("all")], axis=1)
    sweeps = auto.config["exact_sweeps"]
    assert set(sweeps) == set(COLUMNS) and all(sweeps[k] for k in COLUMNS)  # the top components: every one
    swept = a.index[a["measured"] != ""]
    assert set(swept) == set(auto.config["exact_components"]) == {c for v in sweeps.values() for c in v}
    assert set(a.index[a["exact"]]) == set.intersection(*(set(v) for v in sweeps.values()))
    assert set(sweeps["ablation"]) == set(auto.results["self_repair"].to_frame().component)
    assert set(sweeps["denoise"]) == set(auto.results["patch_denoise"].to_frame().component)
    assert set(sweeps["noise"]) == set(auto.results["patch_noise"].to_frame().component)
    for k, cols in COLUMNS.items():
        made = a.index[made_in(a, k)]
        assert set(made) == set(sweeps[k])
        # swept: the exhaustive run's measurements (the same functions on a subset of components)
        np.testing.assert_allclose(a.loc[made, cols].to_numpy(float), f.loc[made, cols].to_numpy(float),
                                   rtol=rtol, atol=rtol * abs(auto.baseline["gap"]))
        # not swept: blank, and below the threshold in the exhaustive run too unless the verdict says otherwise
        assert a.loc[a.index.difference(made), cols].isna().all().all()
    np.testing.assert_allclose(a["direct_effect"], f.loc[a.index, "direct_effect"], rtol=0, atol=0)
    # estimated rows: minor without a measurement, never a lower bound, the AtP* estimate as attribution
    est = a[a["measured"] == ""]
    assert (est["verdict"] == MINOR).all() and not est["exact"].any()
    not_ablated = a[~made_in(a, "ablation")]
    assert not not_ablated["lower_bound"].eq(True).any() and a["attribution"].notna().all()
    assert (not_ablated["compensators"] == "").all() and (not_ablated["backups"] == "").all()
    # the follow-ups saw only ablated components (path patching: the top ones, which are swept)
    assert set(auto.top_components()) <= set(swept)
    assert set(auto.results["path_patch"].to_frame()["sender"]) <= set(swept)
    if "iterated_ablation" in auto.results:
        assert auto.results["iterated_ablation"].summary()["ablated"].iloc[0] in set(sweeps["ablation"])
    if auto.graph is not None:
        assert {u for u, _ in auto.graph.edges} <= set(sweeps["ablation"])


# ---------------------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def shipped():
    m = hp.load_default_model()
    task = hp.tasks.ioi(m, 8, seed=0)
    return (m, task, *both(m, task, top=3, mechanisms=False, iterate=1))


def test_auto_gives_the_exhaustive_verdicts_on_the_shipped_model(shipped):
    m, _, auto, full, a, f = shipped
    check_against_exhaustive(auto, a, f, rtol=1e-5)  # float32
    assert 0 < a["exact"].sum() < len(a) / 2  # most heads are ruled out, so it saves work
    assert (f["verdict"] != MINOR).sum() >= 5  # masked, restoration only: the comparison has something to compare
    assert auto.config["exact"] == "auto" and full.config["exact"] == "all" and "exact_bound" not in full.config
    assert auto.results["attribution"].provenance["estimator"] == "atp*"
    assert auto.results["attribution_noise"].to_frame()["direction"].eq("noise").all()


def test_the_report_marks_estimated_rows_and_prints_the_bound(shipped, tmp_path):
    _, _, auto, full, a, _ = shipped
    out = auto.save(tmp_path / "auto", figures=False)
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    k, n = int(a["exact"].sum()), len(a)
    none = int(a["measured"].eq("").sum())
    bound = auto.config["exact_bound"]
    assert bound.startswith(f"{k} of {n} components swept exactly in every measurement and {n - none - k} in some")
    assert f"The other {none} are estimated in every measurement" in bound
    assert "0.05 of the gap" in bound and "exact='all'" in bound
    assert bound in md and any(bound in note for note in auto.notes)
    assert "(`exact='auto'`, the default)" in md and "<code>exact=&#x27;auto&#x27;</code>" in html
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| component | DE | TE"))
    rows = lines[start + 2:start + 2 + n]
    assert lines[start].endswith("| verdict | exact |") and not lines[start + 2 + n].startswith("|")
    for line in rows:
        c = line.split("|")[1].strip()
        cells = [x.strip() for x in line.strip("|").split("|")]
        assert cells[-1] == ("yes" if a.loc[c, "exact"] else a.loc[c, "measured"] or "estimated"), line
        if "ablation" not in a.loc[c, "measured"].split(", "):
            assert cells[2:7] == ["", "", "", "", ""], line  # TE .. lower bound left blank
        if not a.loc[c, "measured"]:
            assert cells[-2] == MINOR and cells[9:11] == ["", ""], line  # restoration and damage too
    assert html.count("<td>estimated</td>") == none
    assert f"{none} of the {int((a['verdict'] == MINOR).sum())} 'agree: minor' are estimated" in md
    assert "--exact auto" in md
    csv = pd.read_csv(out / "tables" / "triangulation.csv").set_index("component")
    assert (csv.loc[a.index, "exact"] == a["exact"]).all()
    assert (csv.loc[a.index, "measured"].fillna("") == a["measured"]).all()
    assert (out / "tables" / "attribution_patch_noise.csv").is_file()
    back = hp.TriangulationReport.load(out)
    assert (back.to_frame().set_index("component").loc[a.index, ["exact", "measured"]] == a[["exact", "measured"]]
            ).all().all()
    assert back.config["exact_bound"] == bound
    assert json.loads((out / "results.json").read_text())["config"]["exact"] == "auto"
    # the exhaustive report says how it was run, and has no estimated row
    out_all = full.save(tmp_path / "all", figures=False)
    md_all = (out_all / "report.md").read_text()
    assert "--exact all" in md_all and "estimated" not in md_all


# ---------------------------------------------------------------------------- a tiny model of every family
def quiet_heads(m: hp.HookedModel, factor: float = 0.01, loud: int = 0) -> hp.HookedModel:
    """Scale every head's slice of its layer's output projection by ``factor``, except head ``loud`` of each layer:
    a few heads carry the task, so a random model has components AtP* can rule out."""
    ad = m.adapter
    with torch.no_grad():
        for layer in range(m.n_layers):
            o, _ = ad.module_of(Site(layer, "z"))
            for h in range(m.n_heads):
                if h != loud:
                    cols = ad.head_slice(h)
                    (o.weight[:, cols] if isinstance(o, torch.nn.Linear) else o.weight[cols, :]).mul_(factor)
    return m


@pytest.mark.parametrize("family", tiny.FAMILIES + tiny.NEW_FAMILIES)
def test_auto_gives_the_exhaustive_verdicts_on_every_family(family):
    kw = dict(initializer_range=0.3) if family == "gpt2" else {}  # GPT-2's default 0.02 leaves a gap of ~1e-5
    m = quiet_heads(tiny.model64(family, layers=2, heads=4, **kw))
    task = hp.tasks.ioi(m, 6, corruption="abc", seed=0)
    auto, _, a, f = both(m, task, top=1, mechanisms=False, iterate=0)
    check_against_exhaustive(auto, a, f, rtol=1e-9)  # float64
    assert a["exact"].sum() < len(a), "AtP* ruled nothing out: the comparison would be trivial"


# ---------------------------------------------------------------------------- the plan, on hand-made estimates
def test_the_plan_rules_out_each_measurement_its_estimate_calls_small():
    """clean 8, corrupted -8: gap 16, verdict scale 8, threshold 0.1 -> cut 0.05: 0.8 of AtP* (0.05 x gap), 0.4 of
    DE (0.05 x scale). Each of A, B, C reaches the cut on one measure only; D and E are below it on all three."""
    comps = ["A", "B", "C", "D", "E"]
    den = [0.9, 0.1, -0.1, 0.7, 0.0]
    noi = [0.0, -0.85, 0.1, -0.7, 0.3]
    de = [0.1, 0.0, -0.45, 0.35, 0.39]

    def frame(est):
        return pd.DataFrame({"component": np.repeat(comps, 2), "prompt": [0, 1] * 5, "estimate": np.repeat(est, 2),
                             "clean_metric": 8.0, "corrupted_metric": -8.0})

    direct = pd.DataFrame({"component": comps, "direct_effect": de})
    plan, bound = tri._exact_plan(direct, frame(den), frame(noi), 0.1, top=1, value="zero")
    # A is the top one (0.9/16 ties C's 0.45/8; component order breaks the tie): every measurement; B's damage
    # and C's DE reach the cut in one measurement each
    assert plan == {"denoise": ["A"], "noise": ["A", "B"], "ablation": ["A", "C"]}
    assert bound.startswith("1 of 5 components swept exactly in every measurement and 2 in some "
                            "(1 patched (denoise), 2 patched (noise), 2 ablated)")
    assert "The other 2 are estimated in every measurement" in bound
    assert "zero ablation" in bound and "0.05 of the gap" in bound and "0.05 of the verdict scale" in bound
    plan, _ = tri._exact_plan(direct, frame([0.0] * 5), frame([0.0] * 5), 0.1, top=2)
    assert plan == {k: ["C", "E"] for k in tri.MEASUREMENTS}  # nothing reaches the cut but C's DE: the top 2
    plan, bound = tri._exact_plan(direct, frame(den), frame(noi), 0.1, top=5)
    assert plan == {k: comps for k in tri.MEASUREMENTS}
    assert bound.startswith("all 5 components swept exactly in every measurement")
    # the cut is half the threshold: at 0.2, D's AtP* (0.7/16 = 0.044) and C's DE (0.45/8 = 0.056) fall under 0.1
    plan, _ = tri._exact_plan(direct, frame(den), frame(noi), 0.2, top=1)
    assert plan == {k: ["A"] for k in tri.MEASUREMENTS}


def test_the_check_lowers_the_cut_by_what_atp_fell_short_on_the_swept_ones():
    """threshold 0.1: A (swept, exact 0.6) is estimated at 0.3, a shortfall of 0.5 (what the cut of half the
    threshold allows); C (swept, exact 0.08) is below the threshold and not read."""
    est = pd.Series({"A": 0.30, "B": 0.04, "C": 0.06, "D": 0.02, "E": -0.05})
    assert largest_shortfall(est, pd.Series({"A": 0.6, "C": 0.08}), 0.1) == (0.5, "A")
    assert largest_shortfall(est, pd.Series({"C": 0.08}), 0.1) == (0.0, None)  # nothing swept reaches it
    assert widened(est, ["A", "C"], 0.1, 0.5) == []  # the cut stays at 0.05
    assert widened(est, ["A", "C"], 0.1, 0.7) == ["B"]  # lowered to 0.03
    short, who = largest_shortfall(est, pd.Series({"A": 0.6, "E": 0.2}), 0.1)  # E: the wrong sign
    assert who == "E" and short == pytest.approx(1.25)
    assert widened(est, ["A", "E"], 0.1, short) == ["B", "C", "D"]  # every one left
    assert largest_shortfall(est, pd.Series({"F": 0.3}), 0.1) == (1.0, "F")  # no estimate: none of it captured


def test_auto_widens_where_atp_falls_short_on_the_swept_components(shipped, monkeypatch):
    """An estimator made worse on purpose (patching estimates at a fifth, ablation estimates of the wrong sign)
    rules out components that matter; the check on the swept ones sees the shortfall and sweeps them, so the
    report still gives the exhaustive run's verdicts."""
    m, task, _, full, _, f = shipped

    def scaled(fn, factor):
        def wrapped(*a, **k):
            r = fn(*a, **k)
            frame = r.to_frame()
            frame["estimate"] *= factor
            return type(r)(frame, r.provenance, r.extras)
        return wrapped

    monkeypatch.setattr(tri, "attribution_patch", scaled(tri.attribution_patch, 0.2))
    monkeypatch.setattr(tri, "attribution_ablate", scaled(tri.attribution_ablate, -1.0))
    plans = []
    plan_of = tri._exact_plan

    def plan(*a, **k):
        got = plan_of(*a, **k)
        plans.append({key: list(v) for key, v in got[0].items()})  # a copy: the report widens its own
        return got

    monkeypatch.setattr(tri, "_exact_plan", plan)
    auto = hp.triangulate(m, task, exact="auto", progress=False, top=3, mechanisms=False, iterate=1)
    a = auto.to_frame().set_index("component")
    check_against_exhaustive(auto, a, f, rtol=1e-5)
    # the plan alone would have left out measurements the exhaustive run's verdicts rest on
    first = plans[0]
    matter = f.index[f["verdict"] != MINOR]
    missed = {k: [c for c in matter if c not in first[k] and c in auto.config["exact_sweeps"][k]]
              for k in tri.MEASUREMENTS}
    assert any(missed.values()), missed
    check = auto.config["exact_check"]
    for k in tri.MEASUREMENTS:
        assert set(check[k]["added"]) == set(auto.config["exact_sweeps"][k]) - set(first[k])
        if check[k]["added"]:  # only where the shortfall exceeded what the cut allows
            assert check[k]["shortfall"] > 1 - tri.RULE_OUT
    assert check["denoise"]["shortfall"] > 0.75  # at most a fifth of some restoration captured
    assert "the cut was lowered" in auto.config["exact_bound"]


# ---------------------------------------------------------------------------- the default and bad input
def test_auto_is_the_default_everywhere():
    assert inspect.signature(hp.triangulate).parameters["exact"].default == "auto"
    assert cli.build_parser().parse_args(["report"]).exact == "auto"
    assert cli.build_parser().parse_args(["report", "--exact", "all"]).exact == "all"


@pytest.mark.parametrize("bad", ["some", "ALL", None, 1, ["auto"]])
def test_unknown_exact_is_refused_before_any_work(bad, monkeypatch):
    from hydra_probe.runner import Runner

    m = tiny.model("gpt2", layers=2, heads=2, d=16)
    task = hp.tasks.ioi(m, 4, seed=0)
    ran = []
    for name in ("prefix", "run", "gradients"):
        monkeypatch.setattr(Runner, name, lambda *a, _n=name, **k: ran.append(_n))
    with pytest.raises(hp.OptionError, match="exact must be 'auto'"):
        hp.triangulate(m, task, exact=bad)
    assert ran == []


def test_cli_refuses_an_unknown_exact(capsys):
    assert cli.main(["report", "--exact", "some"]) == 2
    assert "--exact" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["zero", "resample", "reference"])
def test_auto_reads_the_ablation_estimate_of_the_reports_own_value(value):
    """The ablation side is estimated with the report's ablation value (zeros, resampled prompts with the seed, or
    a reference task's mean), and auto still gives the exhaustive run's verdicts."""
    m = quiet_heads(tiny.model64("llama", layers=2, heads=4))
    task = hp.tasks.ioi(m, 6, corruption="abc", seed=0)
    v = hp.tasks.ioi(m, 6, corruption="abc", seed=5) if value == "reference" else value
    auto, _, a, f = both(m, task, top=1, mechanisms=False, iterate=0, value=v)
    check_against_exhaustive(auto, a, f, rtol=1e-9)
    prov = auto.results["attribution_ablation"].provenance
    assert prov["value"] == ("mean" if value == "reference" else value) and prov["estimator"] == "atp*"
    assert (prov.get("reference") == "ioi") == (value == "reference")
    assert f"its {'mean' if value == 'reference' else value} ablation's total effect" in auto.config["exact_bound"]


def test_claims_say_which_measurement_auto_did_not_make():
    """A top component that exact="auto" patched but did not ablate (or the reverse) gets a claim that says so,
    never an empty number."""
    from hydra_probe.report.prose import component_sentence

    row = pd.Series({"component": "L0H7", "verdict": "restoration only", "direct_effect": -0.33,
                     "direct_effect_lo": -0.76, "direct_effect_hi": 0.1, "total_effect": np.nan,
                     "total_effect_lo": np.nan, "total_effect_hi": np.nan, "de_lost": np.nan, "lower_bound": np.nan,
                     "self_repair": np.nan, "self_repair_lo": np.nan, "self_repair_hi": np.nan, "backed_up": False,
                     "backups": "", "compensators": "", "restoration": 0.19, "damage": np.nan, "attribution": 0.11})
    prov = {"value": "mean", "metric": "logit_diff", "corruption": "swap"}
    s = component_sentence(row, prov, None)
    assert "Its mean ablation was not run" in s and "restores 19%" in s and "noising was not run" in s
    assert "lowers" not in s and "nan" not in s.lower() and "  " not in s
    ablated = pd.Series({**row.to_dict(), "total_effect": 0.9, "total_effect_lo": 0.5, "total_effect_hi": 1.3,
                         "de_lost": -0.47, "lower_bound": False, "self_repair": -1.37, "self_repair_lo": -2.0,
                         "self_repair_hi": -0.5, "restoration": np.nan, "damage": 0.28})
    s = component_sentence(ablated, prov, None)
    assert "lowers `logit_diff` by 0.9" in s and "amplify the loss" in s
    assert "Denoising was not run" in s and "removes 28%" in s and "nan" not in s.lower()
