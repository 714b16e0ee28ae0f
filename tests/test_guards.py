"""No silent wrong numbers (issue 18): every public call checks its arguments before any forward pass.

Each refusal is asserted for its class, the key words of its message, no forward pass before it, no file
left behind and the model unchanged; each answerable case against an independent computation with plain
torch hooks on the Hugging Face module (GPT-2 module paths, test-only). The catalogue entries of the same
cases (analyses/error_catalogue.py) are checked by tests/test_errors.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import tiny
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_errors import CAT, files_under, forward_counter, hooks_of

import hydra_probe as hp
from hydra_probe.checks import read_only
from hydra_probe.metrics import Metric

_M: dict[str, tuple] = {}


def small():
    """A 3-layer, 2-head tiny GPT-2 and an 8-prompt IOI task (lengths 15, 15, 15, 15, 17, 17, 19, 19)."""
    if "m" not in _M:
        m = tiny.model("gpt2", layers=3, heads=2, d=16)
        _M["m"] = (m, tiny.ioi(m, 8))
    return _M["m"]


def refused(cls, fn, *words):
    """``fn()`` raises ``cls`` with ``words`` in one line, before any forward pass, leaving hooks as they were."""
    m, _ = small()
    before = hooks_of(m.hf_model)
    with forward_counter() as calls, pytest.raises(cls) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    assert "\n" not in msg
    assert calls == [], f"{len(calls)} module calls before the error"
    assert hooks_of(m.hf_model) == before
    return msg


# ============================================================================ an independent reference
def _z(hf, layer):
    return hf.transformer.h[layer].attn.c_proj


def _mlp(hf, layer):
    return hf.transformer.h[layer].mlp


def capture(hf, ids, layer, kind):
    """(T, width) activation of one prompt: the heads' z (input of c_proj) or the MLP's output."""
    out = {}
    if kind == "z":
        h = _z(hf, layer).register_forward_pre_hook(lambda mod, a: out.__setitem__("x", a[0][0].detach().clone()))
    else:
        h = _mlp(hf, layer).register_forward_hook(lambda mod, a, o: out.__setitem__("x", o[0].detach().clone()))
    try:
        with torch.no_grad():
            hf(ids[None])
    finally:
        h.remove()
    return out["x"]


def per_position_mean(hf, task, layer, kind):
    caps = [capture(hf, ids, layer, kind) for ids in task.clean_ids]
    T = max(len(c) for c in caps)
    return [torch.stack([c[t] for c in caps if len(c) > t]).mean(0) for t in range(T)]


def site(m, name):
    """(layer, kind, columns) of a head or MLP."""
    c = m.components(name)[0]
    if c.kind == "head":
        return c.layer, "z", slice(c.head * m.head_dim, (c.head + 1) * m.head_dim)
    return c.layer, "mlp", slice(None)


def metric_with(m, ids, a, b, edits):
    """logit(a) - logit(b) at the last position of one prompt with ``edits`` = [(name, positions, means or None)]."""
    hf, handles = m.hf_model, []
    T = len(ids)
    for name, pos, mean in edits:
        layer, kind, cols = site(m, name)
        ps = range(T) if pos is None else sorted({p % T for p in pos})

        def f(x, cols=cols, ps=ps, mean=mean):
            x = x.clone()
            for p in ps:
                x[0, p, cols] = 0 if mean is None else mean[p][cols]
            return x

        if kind == "z":
            handles.append(_z(hf, layer).register_forward_pre_hook(lambda mod, a, f=f: (f(a[0]),)))
        else:
            handles.append(_mlp(hf, layer).register_forward_hook(lambda mod, a, o, f=f: f(o)))
    try:
        with torch.no_grad():
            lg = hf(ids[None]).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return float(lg[a] - lg[b])


def reference_te(m, task, names, positions, ref=None):
    """Per prompt: clean - ablated metric with ``names`` mean-ablated together at ``positions``."""
    ref = task if ref is None else ref
    means = {n: per_position_mean(m.hf_model, ref, *site(m, n)[:2]) for n in names}
    out = []
    for ids, a, b in zip(task.clean_ids, task.answer_ids, task.alternative_ids):
        clean = metric_with(m, ids, a, b, [])
        out.append(clean - metric_with(m, ids, a, b, [(n, positions, means[n]) for n in names]))
    return torch.tensor(out, dtype=torch.float64)


# ============================================================================ positions and reference tasks (issue 11)
TOL = 2e-6  # float32 forwards batched differently; the effects themselves are 1e-5 .. 1e-2 on this tiny model
POS = [1, 3, -1]  # -1 is position 14, 16 or 18 by prompt length: every mean there has two or more prompts


def test_ablate_with_positions_matches_hooks():
    m, task = small()
    f = hp.ablate(m, task, ["L1H0", "MLP0"], value="mean", positions=POS).to_frame()
    for name in ("L1H0", "MLP0"):
        got = torch.tensor(f[f.component == name].total_effect.to_numpy())
        assert (got - reference_te(m, task, [name], POS)).abs().max() < TOL, name
    assert hp.ablate(m, task, ["L1H0"], positions=POS).provenance["positions"] == POS


def test_self_repair_with_positions_matches_hooks_and_closes():
    m, task = small()
    sr = hp.self_repair(m, task, ["L1H1", "L0H0+MLP1"], value="mean", positions=[0, 2, 5])
    f = sr.to_frame()
    got = torch.tensor(f[f.component == "L1H1"].total_effect.to_numpy())
    assert (got - reference_te(m, task, ["L1H1"], [0, 2, 5])).abs().max() < TOL
    got = torch.tensor(f[f.component == "L0H0+MLP1"].total_effect.to_numpy())
    assert (got - reference_te(m, task, ["L0H0", "MLP1"], [0, 2, 5])).abs().max() < TOL
    # the last position is untouched and nothing upstream of L1H1 changed, so it keeps its direct effect there
    assert f[f.component == "L1H1"].de_lost.abs().max() < 1e-9
    con = sr.contributions().groupby(["component", "prompt"], sort=False).delta_de.sum()
    assert (con.to_numpy() - f.set_index(["component", "prompt"]).self_repair.loc[con.index].to_numpy()).max() < 1e-6


def test_paired_and_iterated_with_positions_match_hooks():
    m, task = small()
    pa = hp.paired_ablation(m, task, [("L1H0", "MLP2")], value="mean", positions=POS).to_frame()
    assert (torch.tensor(pa.te_both.to_numpy()) - reference_te(m, task, ["L1H0", "MLP2"], POS)).abs().max() < TOL
    assert (torch.tensor(pa.te_first.to_numpy()) - reference_te(m, task, ["L1H0"], POS)).abs().max() < TOL
    it = hp.iterated_ablation(m, task, "L1H0", ["MLP2", "L2H1"], value="mean", positions=POS).to_frame()
    for step, names in enumerate([["L1H0"], ["L1H0", "MLP2"], ["L1H0", "MLP2", "L2H1"]]):
        got = torch.tensor(it[it.step == step].total_effect.to_numpy())
        assert (got - reference_te(m, task, names, POS)).abs().max() < TOL, step


def test_reference_task_is_the_mean_source():
    m, task = small()
    ref = tiny.ioi(m, 8, seed=5)
    assert ref.pairs != task.pairs
    f = hp.ablate(m, task, ["L2H1", "MLP1"], value=ref).to_frame()
    for name in ("L2H1", "MLP1"):
        got = torch.tensor(f[f.component == name].total_effect.to_numpy())
        assert (got - reference_te(m, task, [name], None, ref=ref)).abs().max() < TOL, name
    # and it differs from the task's own mean (the reference really is used)
    own = hp.ablate(m, task, ["L2H1"], value="mean").to_frame().total_effect.to_numpy()
    assert abs(own - f[f.component == "L2H1"].total_effect.to_numpy()).max() > 10 * TOL


# ============================================================================ duplicates and overlaps
def test_duplicates_are_refused():
    m, task = small()
    refused(hp.ComponentError, lambda: hp.ablate(m, task, ["L1H0", "L1H0", "L1H0"]), "L1H0", "more than once")
    refused(hp.ComponentError, lambda: hp.self_repair(m, task, ["mlps", "MLP1"]), "MLP1", "more than once")
    refused(hp.ComponentError, lambda: hp.direct_effects(m, task, ["heads", "L0H0"]), "L0H0", "more than once")
    refused(hp.ComponentError, lambda: hp.self_repair(m, task, ["L0H0+MLP1", ["MLP1", "L0H0"]]),
            "more than once")
    refused(hp.ComponentError, lambda: hp.paired_ablation(m, task, [("L0H0", "MLP1"), ("L0H0", "MLP1")]),
            "(L0H0, MLP1)", "more than once")
    refused(hp.ComponentError, lambda: hp.path_patch(m, task, ["L0H0", "L0H0"], "logits"), "more than once")
    refused(hp.ComponentError, lambda: hp.iterated_ablation(m, task, "L0H0", ["MLP1", "MLP1"]),
            "MLP1", "overlaps compensator MLP1")


def test_overlapping_groups_are_refused_with_the_overlap_named():
    m, task = small()
    refused(hp.ComponentError, lambda: hp.paired_ablation(m, task, [("ATTN1", "L1H0")]), "ATTN1 contains L1H0")
    refused(hp.ComponentError, lambda: hp.interaction_parts(m, task, [("L1H1", "ATTN1")]), "ATTN1 contains L1H1")
    refused(hp.ComponentError, lambda: hp.path_patch(m, task, "ATTN1+L1H1", "logits"), "ATTN1 contains L1H1")
    refused(hp.ComponentError, lambda: hp.self_repair(m, task, ["L0H0+L0H0"]), "L0H0 appears twice")
    refused(hp.ComponentError, lambda: hp.iterated_ablation(m, task, "ATTN1", ["L1H0"]), "ATTN1 contains L1H0")
    refused(hp.ComponentError, lambda: hp.iterated_ablation(m, task, "L1H0", ["MLP0", "ATTN1"]),
            "ATTN1 contains L1H0")


def test_overlaps_in_the_newer_analyses():
    m, task = small()
    refused(hp.ComponentError, lambda: hp.repair_mechanisms(m, task, ["ATTN0+L0H1"]), "ATTN0 contains L0H1")
    refused(hp.ComponentError, lambda: hp.neuron_contributions(m, task, "L0H0+L0H0", "MLP2"), "L0H0 appears twice")
    refused(hp.ComponentError, lambda: hp.repair_mechanisms(m, task, ["L0H0", "L0H0"]), "more than once")
    refused(hp.TaskError, lambda: hp.ablate(m, {"a": task}, ["L0H0"]), "expected a hydra_probe Task")


def test_separate_overlapping_ablations_are_two_claims():
    """["ATTN1", "L1H0"] ablates each on its own: allowed, and each equals its own call."""
    m, task = small()
    both = hp.ablate(m, task, ["ATTN1", "L1H0"], value="zero").to_frame()
    for name in ("ATTN1", "L1H0"):
        alone = hp.ablate(m, task, [name], value="zero").to_frame()
        assert abs(both[both.component == name].total_effect.to_numpy() - alone.total_effect.to_numpy()).max() < 1e-6


def test_reversed_pairs_are_distinct_claims():
    m, task = small()
    r = hp.interaction_parts(m, task, [("L0H1", "L2H0"), ("L2H0", "L0H1")], value="zero").to_frame()
    a, b = r[r["first"] == "L0H1"], r[r["first"] == "L2H0"]
    assert abs(a.interaction.to_numpy() - b.interaction.to_numpy()).max() < 1e-9
    assert abs(a.edge.to_numpy() - b.reverse.to_numpy()).max() < 1e-9


# ============================================================================ argument types and ranges
@pytest.mark.parametrize("positions,words", [([], ("positions=[]",)), (2.5, ("float", "2.5")),
                                             ({1, 2}, ("set",)), ([1.0], ("1.0", "not an int")),
                                             (True, ("bool",)), ([0, 40], ("40", "0..14")), ("first", ("'last'",))])
def test_bad_positions(positions, words):
    m, task = small()
    for fn in (hp.ablate, hp.self_repair, hp.activation_patch):
        refused(hp.OptionError, lambda fn=fn: fn(m, task, ["L0H0"], positions=positions), *words)
    refused(hp.OptionError, lambda: hp.paired_ablation(m, task, [("L0H0", "MLP1")], positions=positions), *words)


def test_degenerate_means_are_refused_and_answerable_ones_run():
    m, task = small()
    one = task.subset([0])
    refused(hp.TaskError, lambda: hp.self_repair(m, one, ["L0H0"], value="mean"), "degenerate", "only one prompt")
    refused(hp.TaskError, lambda: hp.ablate(m, task, ["L0H0"], value=task.subset([task.lengths.index(19)])), "degenerate",
            "reference task")
    lone = task.subset([0, 1, 3, 4])  # lengths 15, 19, 15, 15: positions 15..18 have a single prompt
    refused(hp.TaskError, lambda: hp.ablate(m, lone, ["L0H0"]), "degenerate at position(s) 15, 16, 17, 18")
    refused(hp.TaskError, lambda: hp.ablate(m, lone, ["L0H0"], positions="last"), "18")
    # positions every prompt reaches are answerable: the right number
    f = hp.ablate(m, lone, ["L1H0"], positions=[2, 7]).to_frame()
    assert (torch.tensor(f.total_effect.to_numpy()) - reference_te(m, lone, ["L1H0"], [2, 7])).abs().max() < TOL


def test_pairs_targets_and_compensators_of_the_wrong_type():
    m, task = small()
    refused(hp.ComponentError, lambda: hp.paired_ablation(m, task, [("heads", "L1H0")]), "selector", "one component")
    refused(hp.ComponentError, lambda: hp.paired_ablation(m, task, [("L0H0", "mlps")]), "selector")
    refused(hp.ComponentError, lambda: hp.paired_ablation(m, task, "L0H0"), "list of (first, second)")
    refused(hp.ComponentError, lambda: hp.paired_ablation(m, task, [{"L0H0", "L1H0"}]), "two components")
    refused(hp.ComponentError, lambda: hp.paired_ablation(m, task, 7), "list of (first, second)")
    refused(hp.ComponentError, lambda: hp.iterated_ablation(m, task, "L0H0", [3]), "int", "3")
    refused(hp.ComponentError, lambda: hp.iterated_ablation(m, task, "L0H0", [None]), "NoneType")
    refused(hp.ComponentError, lambda: hp.iterated_ablation(m, task, 3, ["L1H0"]), "int")
    refused(hp.ComponentError, lambda: hp.iterated_ablation(m, task, "heads", ["L1H0"]), "selector")
    refused(hp.ComponentError, lambda: hp.iterated_ablation(m, task, "L0H0", 5), "compensators", "int")


@pytest.mark.parametrize("seed", [-1, 2**32, 2**70, 1.5, "one", True, None])
def test_seeds_that_do_not_fit_the_generator(seed):
    m, task = small()
    refused(hp.OptionError, lambda: hp.ablate(m, task, ["L0H0"], value="resample", seed=seed), "seed")


def test_prompts_beyond_the_context_are_refused():
    m, task = small()
    words = " ".join(f"w{i % 60}" for i in range(69))
    long = hp.tasks.from_pairs(m, [{"clean": words + " Mary", "corrupted": words + " John", "answer": " Mary",
                                    "alternative": " John"}] * 2)
    refused(hp.TaskError, lambda: hp.self_repair(m, long, ["L0H0"]), "70 tokens", "context of 64")


def test_options_refused_before_the_report_runs():
    m, task = small()
    refused(hp.OptionError, lambda: hp.triangulate(m, task, graph_top_k=0), "graph_top_k")
    refused(hp.OptionError, lambda: hp.triangulate(m, task, top=0), "top")
    refused(hp.OptionError, lambda: hp.triangulate(m, task, iterate=-1), "iterate")
    refused(hp.OptionError, lambda: hp.triangulate(m, task, graph_threshold=float("nan")), "graph_threshold")
    refused(hp.OptionError, lambda: hp.ablate(m, task, ["L0H0"], progress="yes"), "progress")


# ============================================================================ foreign tasks and hooks
def test_task_from_another_tokenizer_is_refused():
    m, task = small()
    other = hp.load_model(tiny.hf_model("gpt2", layers=3, heads=2, d=16), tokenizer=tiny.tokenizer(bos=True))
    with forward_counter() as calls, pytest.raises(hp.TaskError, match="another tokenizer"):
        hp.ablate(other, task, ["L0H0"])
    assert calls == []
    ind = hp.tasks.induction(m, n_prompts=4, seq_len=5)  # tasks built without from_pairs record it too
    with pytest.raises(hp.TaskError, match="another tokenizer"):
        hp.ablate(other, ind, ["L0H0"], value="zero")
    # the same tokenizer on another model (another checkpoint) is fine
    twin = hp.load_model(tiny.hf_model("gpt2", seed=1, layers=3, heads=2, d=16), tokenizer=tiny.tokenizer())
    assert len(hp.ablate(twin, task, ["L0H0"]).to_frame()) == len(task)


@pytest.mark.parametrize("where", ["final_norm", "unembed", "block", "o_proj", "mlp", "root"])
def test_foreign_hooks_are_refused_with_their_names(where):
    m, task = small()
    hf = m.hf_model
    mod, name = {"final_norm": (hf.transformer.ln_f, "transformer.ln_f"), "unembed": (hf.lm_head, "lm_head"),
                 "block": (hf.transformer.h[1], "transformer.h.1"),
                 "o_proj": (hf.transformer.h[0].attn.c_proj, "transformer.h.0.attn.c_proj"),
                 "mlp": (hf.transformer.h[2].mlp, "transformer.h.2.mlp"), "root": (hf, "<model>")}[where]

    def shift(module, args, output):
        return output + 1 if torch.is_tensor(output) else output

    h = mod.register_forward_hook(shift)
    try:
        msg = refused(hp.ForeignHookError, lambda: hp.self_repair(m, task, ["L0H0"]), name, "forward hook", "shift")
        assert msg.count("shift") == 1
        refused(hp.ForeignHookError, lambda: hp.direct_effects(m, task), name)
    finally:
        h.remove()
    assert hooks_of(hf) == []
    hp.direct_effects(m, task)  # works again once the hook is gone


def test_read_only_hooks_are_accepted_and_see_the_runs():
    m, task = small()
    seen = []
    h = m.hf_model.transformer.ln_f.register_forward_pre_hook(read_only(lambda mod, args: seen.append(1)))
    try:
        de = hp.direct_effects(m, task)
    finally:
        h.remove()
    assert seen and len(de.to_frame()) > 0


# ============================================================================ custom linear metrics
def _weights(lg, a, b, c):
    idx = torch.arange(len(a))
    return 2 * lg[idx, a] - 0.5 * lg[idx, b] + lg[:, c] + 3.0


def test_custom_linear_metric_closes_on_the_shipped_model():
    m = hp.load_default_model()
    task = hp.tasks.ioi(m, n_prompts=16, seed=4)
    c = int(m.tokenizer(" the", add_special_tokens=False)["input_ids"][0])
    mine = Metric("mine", True, lambda lg, a, b: _weights(lg, a, b, c))
    de = hp.direct_effects(m, task, "all", metric=mine)
    total = de.to_frame().groupby("prompt").direct_effect.sum().to_numpy() + de.constant["constant"].to_numpy()
    want = de.constant["metric"].to_numpy()
    # float32 rounding of a metric near 37 (the weights amplify the logits): relative, not absolute
    assert abs(total - want).max() < 2e-6 * abs(want).max()
    # the metric itself, independently from a plain forward
    with torch.no_grad():
        lg = torch.stack([m.hf_model(ids[None]).logits[0, -1] for ids in task.clean_ids])
    ref = _weights(lg, task.answer_ids, task.alternative_ids, c)
    assert abs(de.constant["metric"].to_numpy() - ref.numpy()).max() < 1e-4
    sr = hp.self_repair(m, task, ["L1H5"], metric=mine)
    f = sr.to_frame()
    con = sr.contributions().groupby("prompt").delta_de.sum().to_numpy()
    assert abs(con - f.self_repair.to_numpy()).max() < 2e-6 * abs(want).max()  # float32, as above
    # and a linear metric written by hand reproduces the built-in logit difference exactly
    ld = Metric("my_ld", True, lambda lg, a, b: lg.gather(1, a[:, None]).squeeze(1) - lg.gather(1, b[:, None]).squeeze(1))
    x = hp.direct_effects(m, task, "heads", metric=ld).to_frame().direct_effect.to_numpy()
    y = hp.direct_effects(m, task, "heads").to_frame().direct_effect.to_numpy()
    assert abs(x - y).max() < 1e-5


def test_non_linear_metrics_are_refused_where_linearity_is_needed():
    m, task = small()
    soft = Metric("soft", True, lambda lg, a, b: torch.softmax(lg, -1).gather(1, a[:, None]).squeeze(1))
    refused(hp.MetricError, lambda: hp.direct_effects(m, task, metric=soft), "'soft'", "not linear")
    mixing = Metric("centred", True, lambda lg, a, b: lg.gather(1, a[:, None]).squeeze(1) - lg[:, 0].mean())
    refused(hp.MetricError, lambda: hp.self_repair(m, task, ["L0H0"], metric=mixing), "mixes prompts")
    refused(hp.MetricError, lambda: hp.self_repair(m, task, ["L0H0"], metric=lambda lg, a, b: lg[:, 0]), "linear")
    refused(hp.MetricError, lambda: hp.direct_effects(m, task, metric="kl"), "linear")
    # a non-linear metric is fine where nothing is decomposed
    assert len(hp.ablate(m, task, ["L0H0"], metric=soft).to_frame()) == len(task)


# ============================================================================ threads
def test_a_busy_model_refuses_at_once_and_the_first_call_gives_the_sequential_numbers():
    m, task = small()
    started, go = threading.Event(), threading.Event()

    def waiting(lg, a, b):
        started.set()
        go.wait(30)
        return lg.gather(1, a[:, None]).squeeze(1)

    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", hp.ablate(m, task, ["L1H0", "MLP1"], metric=waiting)))
    t.start()
    try:
        assert started.wait(30)
        t0 = time.perf_counter()
        with pytest.raises(hp.ConcurrencyError, match="busy with ablate.*another thread"):
            hp.self_repair(m, task, ["L0H0"])
        assert time.perf_counter() - t0 < 5  # refused at once, not after waiting
        # another model runs in parallel freely
        other = tiny.model("gpt2", layers=3, heads=2, d=16)
        assert len(hp.ablate(other, tiny.ioi(other, 4), ["L0H0"]).to_frame()) == 4
    finally:
        go.set()
        t.join(60)
    seq = hp.ablate(m, task, ["L1H0", "MLP1"], metric=lambda lg, a, b: lg.gather(1, a[:, None]).squeeze(1))
    assert (out["r"].to_frame().total_effect - seq.to_frame().total_effect).abs().max() < 1e-6
    assert hooks_of(m.hf_model) == []


def test_nested_calls_in_one_thread_pass():
    m, task = small()
    r = hp.interaction_parts(m, task, [("L0H0", "MLP1")], value="zero")  # calls self_repair inside
    assert len(r.to_frame()) == len(task)


# ============================================================================ files and the command line
def test_task_files_read_with_the_file_named(tmp_path):
    m, task = small()
    with pytest.raises(hp.TaskError, match="is a folder"):
        hp.tasks.from_jsonl(m, tmp_path)
    p = tmp_path / "t.jsonl"
    p.write_bytes(b'{"clean": "a"}\n{"clean": "b"}\n\xff\n')
    with pytest.raises(hp.TaskError, match=r"t\.jsonl:3: not UTF-8"):
        hp.tasks.from_jsonl(m, p)


def test_saved_results_read_with_the_file_named(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_bytes(b'{"kind": "ablation",\n "frame": \xff}')
    with pytest.raises(hp.InputError, match="cannot read a saved result from .*r.json"):
        hp.load_result(bad)
    bad.write_text('{"kind": "ablation",\n "frame": [1, 2,\n}')
    with pytest.raises(hp.InputError, match="r.json .*line 3"):
        hp.load_result(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(hp.InputError, match="not a saved result"):
        hp.load_result(bad)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "tiny"
    CAT.save_tiny_model(d)
    return d


def _cli(argv, capsys):
    from hydra_probe import cli

    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_cli_unwritable_output_is_refused_before_work(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with forward_counter() as calls:
            code, out, err = _cli(["ablate", "--model", str(model_dir), "--components", "L0H0", "--out",
                                   "locked/result"], capsys)
        assert code == 2 and "no write permission" in err and "locked" in err and calls == []
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_cli_sigterm_is_handled_like_ctrl_c(model_dir, tmp_path, capsys, monkeypatch):
    """SIGTERM while the result is being written: exit 1, one line, no folder and no temporary folder."""
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    real = pd.DataFrame.to_csv

    def terminated(self, *a, **k):
        real(self, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts the sleep

    monkeypatch.setattr(pd.DataFrame, "to_csv", terminated)
    old = signal.getsignal(signal.SIGTERM)
    code, out, err = _cli(["ablate", "--model", str(model_dir), "--components", "L0H0", "--n-prompts", "4",
                           "--out", "result", "--quiet"], capsys)
    assert code == 1 and err.strip().splitlines() == ["hydra-probe: error: interrupted; nothing was written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is old  # the handler is restored


def test_sigterm_while_a_folder_is_written_leaves_nothing(tmp_path):
    """The library too: SIGTERM inside an atomic folder write (default SIGTERM action) removes the
    temporary folder and leaves an existing folder as it was."""
    from hydra_probe.io import atomic_folder

    old = tmp_path / "out"
    old.mkdir()
    (old / "keep.txt").write_text("previous")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    for target, overwrite in ((tmp_path / "new", False), (old, True)):
        with pytest.raises(KeyboardInterrupt):
            with atomic_folder(target, overwrite=overwrite) as tmp:
                (tmp / "half.txt").write_text("half")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in old.iterdir()] == ["keep.txt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_everything_written_follows_the_umask(model_dir, tmp_path, capsys, monkeypatch, mask):
    monkeypatch.chdir(tmp_path)
    old = os.umask(mask)
    try:
        code, out, err = _cli(["ablate", "--model", str(model_dir), "--components", "L0H0", "--n-prompts", "4",
                               "--out", "result", "--quiet"], capsys)
        m, task = small()
        hp.ablate(m, task, ["L0H0"]).save(tmp_path / "alone.json")
    finally:
        os.umask(old)
    assert code == 0, err
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")
             if p.name != "tiny"}
    assert modes["result"] == 0o777 & ~mask
    files = {k: v for k, v in modes.items() if k != "result"}
    assert {k for k in files if k.endswith(".json")} >= {"result/self_repair.json", "alone.json"}
    assert set(files.values()) == {0o666 & ~mask}, files


# ============================================================================ the property
_NAMES = ["L0H0", "L1H1", "L2H0", "MLP0", "MLP2", "ATTN1", "L0H0+MLP1", "ATTN1+L1H0", "L9H9", "heads", "mlps", 3,
          None, "RESID1", ["L0H1", "MLP0"], "L0H0+L0H0"]
_COMPONENTS = st.one_of(st.sampled_from(_NAMES), st.lists(st.sampled_from(_NAMES), max_size=4))
_POSITIONS = st.one_of(st.none(), st.sampled_from(["last", "all", "first", [], 2.0, True, {0}]),
                       st.integers(-20, 20), st.lists(st.integers(-20, 20), max_size=3))
_VALUES = st.sampled_from(["zero", "mean", "resample", "median", 0, "subset1", "subset3"])
_SEEDS = st.one_of(st.integers(-3, 3), st.sampled_from([2**32, 2**64, "1", 1.0, True]))
_METRICS = st.sampled_from(["logit_diff", "logit", "prob", "nonsense", "soft"])


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(fn=st.sampled_from(["ablate", "self_repair", "direct_effects", "paired_ablation"]), comps=_COMPONENTS,
       comps2=_COMPONENTS, positions=_POSITIONS, value=_VALUES, seed=_SEEDS, metric=_METRICS)
def test_every_call_closes_or_refuses_before_any_forward(fn, comps, comps2, positions, value, seed, metric):
    m, task = small()
    if isinstance(value, str) and value.startswith("subset"):
        value = task.subset(range(int(value[-1])))
    if metric == "soft":
        metric = Metric("soft", True, lambda lg, a, b: torch.softmax(lg, -1).gather(1, a[:, None]).squeeze(1))
    kw = {"metric": metric}
    if fn == "direct_effects":
        args = (comps,)
    elif fn == "paired_ablation":
        args, kw = ([(comps, comps2)], dict(kw, value=value, positions=positions, seed=seed))
    else:
        args, kw = (comps,), dict(kw, value=value, positions=positions, seed=seed)
    with forward_counter() as calls:
        try:
            r = getattr(hp, fn)(m, task, *args, **kw)
        except hp.HydraProbeError:
            assert calls == [], "refused after a forward pass"
            assert hooks_of(m.hf_model) == []
            return
    assert hooks_of(m.hf_model) == []
    f = r.to_frame()
    if fn == "self_repair":
        con = r.contributions().groupby(["component", "prompt"], sort=False).delta_de.sum()
        sr = f.set_index(["component", "prompt"]).self_repair.loc[con.index]
        assert abs(con.to_numpy() - sr.to_numpy()).max() < 1e-5
        assert abs(f.de_lost - f.total_effect - f.self_repair).max() < 1e-9
    elif fn == "direct_effects":
        c = r.constant
        if set(f.component) == {x.name for x in m.components("all")}:
            tot = f.groupby("prompt").direct_effect.sum().to_numpy() + c["constant"].to_numpy()
            assert abs(tot - c["metric"].to_numpy()).max() < 1e-5
    elif fn == "ablate":
        assert abs(f.clean_metric - f.ablated_metric - f.total_effect).max() < 1e-9
    else:
        assert abs(f.te_both - f.te_first - f.te_second - f.interaction).max() < 1e-9
    assert f["prompt"].nunique() == len(task)


_RECEIVERS = st.one_of(st.sampled_from(["logits", "L2H0", "MLP2", "ATTN2", "all", "L0H0", "L9H0", 4, None, []]),
                       st.lists(st.sampled_from(["logits", "L2H1", "MLP1", "L1H0+MLP2", ["L2H0", "logits"]]),
                                max_size=3))


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(fn=st.sampled_from(["activation_patch", "attribution_patch", "path_patch"]), comps=_COMPONENTS,
       receivers=_RECEIVERS, positions=_POSITIONS, direction=st.sampled_from(["noise", "denoise", "sideways"]))
def test_patching_calls_return_rows_or_refuse_before_any_forward(fn, comps, receivers, positions, direction):
    m, task = small()
    args = (comps, receivers) if fn == "path_patch" else (comps,)
    with forward_counter() as calls:
        try:
            r = getattr(hp, fn)(m, task, *args, direction=direction, positions=positions)
        except hp.HydraProbeError:
            assert calls == [], "refused after a forward pass"
            assert hooks_of(m.hf_model) == []
            return
    assert hooks_of(m.hf_model) == []
    f = r.to_frame()
    assert len(f) > 0 and len(f) % len(task) == 0 and f.select_dtypes("number").notna().all().all()


def test_the_command_line_refuses_duplicates(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(["ablate", "--model", str(model_dir), "--components", "L1H1,L1H1", "--out", "r"], capsys)
    assert code == 2 and "more than once" in err and files_under(Path(tmp_path)) == set()
