"""attribution_ablate: AtP* of every component's ablation total effect (the ablation side of exact="auto").

The plain estimate is checked against an independent gradient product taken on the Hugging Face module
itself; the QK fix of an ablation's change against its plain reference (one pinned forward per sender) on
every family; AtP* against its plain references; the estimates against exact ablation on the shipped model;
the report's rule-out reads the estimate on the side of the verdict scale.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import tiny
import torch

import hydra_probe as hp
from hydra_probe.effects.common import make_runner, shared_runs
from hydra_probe.errors import MetricError, OptionError
from hydra_probe.interventions import GradientRead, SenderChange
from hydra_probe.models.sites import Site
from hydra_probe.report import triangulation as tri
from hydra_probe.runner import Runner


@functools.lru_cache(maxsize=None)
def build(family: str):
    """A tiny float64 model and a 4-prompt IOI task of two prompt lengths."""
    m = tiny.model64(family, layers=3, heads=4, d=32, initializer_range=0.2)
    return m, tiny.ioi(m, 4, seed=3)


def _close(got, want, rel: float = 1e-9) -> None:
    got, want = np.asarray(got, float), np.asarray(want, float)
    np.testing.assert_allclose(got, want, atol=rel * max(float(np.abs(want).max()), 1e-12), rtol=0)


def _independent_plain(m: hp.HookedModel, task: hp.Task, value: str) -> pd.Series:
    """-(v - z) . dm/dz per head, summed over positions and averaged over prompts, from the Hugging Face model
    with a plain autograd hook on every output projection's input (one prompt at a time)."""
    L, H, dh = m.n_layers, m.n_heads, m.head_dim
    mods = [m.adapter.module_of(Site(layer, "z"))[0] for layer in range(L)]
    zs: list[list[torch.Tensor]] = []  # per prompt, per layer: z (T, H*dh) with its gradient
    for ids, a, b in zip(task.clean_ids, task.answer_ids, task.alternative_ids):
        got: list[tuple[torch.Tensor, torch.Tensor]] = []

        def grab(mod, args, got=got):  # a zero added to z carries dm/dz without cutting the paths through it
            d = torch.zeros_like(args[0], requires_grad=True)
            got.append((args[0].detach(), d))
            return (args[0] + d, *args[1:])

        hooks = [mod.register_forward_pre_hook(grab) for mod in mods]
        try:
            logits = m.hf_model(ids[None]).logits[0, -1]
        finally:
            for h in hooks:
                h.remove()
        (logits[a] - logits[b]).backward()
        zs.append(got)
    Tmax = max(len(i) for i in task.clean_ids)
    est = np.zeros((len(task), L, H))
    for layer in range(L):
        if value == "mean":  # per-position mean over the prompts that reach each position
            tot = torch.zeros(Tmax, H * dh, dtype=torch.float64)
            cnt = torch.zeros(Tmax, 1, dtype=torch.float64)
            for got in zs:
                T = got[layer][0].shape[1]
                tot[:T] += got[layer][0][0]
                cnt[:T] += 1
            mean = tot / cnt
        for i, got in enumerate(zs):
            z, g = got[layer][0][0], got[layer][1].grad[0]
            v = torch.zeros_like(z) if value == "zero" else mean[:z.shape[0]]
            est[i, layer] = (-(v - z) * g).view(-1, H, dh).sum((0, 2)).numpy()
    names = [f"L{layer}H{h}" for layer in range(L) for h in range(H)]
    return pd.Series(est.mean(0).reshape(-1), index=names)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("value", ["zero", "mean"])
def test_plain_estimate_is_the_gradient_product(family, value):
    m, t = build(family)
    got = hp.attribution_ablate(m, t, "heads", value=value, method="atp").summary().set_index("component")
    want = _independent_plain(m, t, value)
    _close(got.loc[want.index, "estimate"], want, 1e-6)
    assert (want.abs() > 1e-6).sum() > 6  # the comparison has something to compare


@pytest.mark.parametrize("family", tiny.FAMILIES + tiny.NEW_FAMILIES)
def test_qk_fix_of_an_ablation_equals_one_pinned_forward_per_sender(family, monkeypatch):
    m, t = build(family)
    runner, _ = make_runner(m, t, "logit_diff", "resample", 0)
    zs = tuple(Site(layer, "z") for layer in range(1, m.n_layers))
    reads = runner.gradients("clean", [GradientRead(zs, None, True), GradientRead(zs, 2, True)])
    c = {x.name: x for x in m.components(["all", "layers"])}
    changes = [SenderChange((c["L0H1"],), "mean"), SenderChange((c["MLP0"],), "zero"),
               SenderChange((c["ATTN1"],), "resample"), SenderChange((c["L1H3"],), "mean"),
               SenderChange((c["L0H0"], c["MLP1"]), "mean")]
    got = runner.qk_fix("clean", changes, reads)
    monkeypatch.setattr(Runner, "fast_qk", False)
    want = runner.qk_fix("clean", changes, reads)
    _close(got, want, 1e-9 if m.adapter.table.norm_kind == "layernorm" else 1e-4)  # HF's float32 RMSNorm
    assert (want[0].abs().amax(-1) > 1e-6).all()


@pytest.mark.parametrize("family", ["gpt2", "qwen3", "gemma3"])
def test_atp_star_of_an_ablation_equals_its_plain_references(family, monkeypatch):
    m, t = build(family)
    got = hp.attribution_ablate(m, t, "all", value="mean").to_frame()
    with monkeypatch.context() as mp:
        mp.setattr(Runner, "fast_qk", False)
        mp.setattr(Runner, "shared_gradients", False)
        want = hp.attribution_ablate(m, t, "all", value="mean").to_frame()
    _close(got["estimate"], want["estimate"], 1e-4)
    assert (got["dropped_layer"] == want["dropped_layer"]).all()
    # with the QK fix and GradDrop off it is the plain estimate
    plain = hp.attribution_ablate(m, t, "all", value="mean", method="atp").to_frame()
    assert "dropped_layer" not in plain and not np.allclose(plain["estimate"], got["estimate"])


def test_estimates_track_exact_ablation_on_the_shipped_model():
    m = hp.load_default_model()
    t = hp.tasks.ioi(m, 8, seed=0)
    est = hp.attribution_ablate(m, t, "heads", value="mean")
    ex = hp.ablate(m, t, "heads", value="mean")
    ag = est.agreement(ex)
    # an ablation is a large change: a screen, not a measurement. On this model every miss stays under the
    # verdict threshold (0.1 of the verdict scale, here the clean metric), and the ranking beats chance
    scale = float(ex.to_frame()["clean_metric"].mean())
    assert ag["n_components"] == m.n_layers * m.n_heads and ag["spearman"] > 0.3, ag
    assert ag["largest_miss"] < 0.1 * scale and ag["component"] in set(ex.to_frame()["component"]), ag
    f = est.to_frame()
    assert set(f.columns) == {"component", "prompt", "estimate", "clean_metric", "dropped_layer"}
    assert est.provenance["value"] == "mean" and est.provenance["estimator"] == "atp*"
    with pytest.raises(hp.InputError, match=r"value 'zero' \(estimates: 'mean'\)"):
        est.agreement(hp.ablate(m, t, ["L0H0"], value="zero"))
    with pytest.raises(hp.InputError, match=r"task_seed 1 \(estimates: 0\)"):  # other prompts
        est.agreement(hp.ablate(m, hp.tasks.ioi(m, 8, seed=1), ["L0H0"], value="mean"))
    with pytest.raises(hp.InputError, match=r"reference 'ioi' \(estimates: None\)"):  # a reference task's mean
        est.agreement(hp.ablate(m, t, ["L0H0"], value=hp.tasks.ioi(m, 8, seed=2)))
    res = hp.attribution_ablate(m, t, ["L0H0"], value="resample", seed=1)
    with pytest.raises(hp.InputError, match=r"seed 0 \(estimates: 1\)"):  # other resample donors
        res.agreement(hp.ablate(m, t, ["L0H0"], value="resample", seed=0))
    assert res.agreement(hp.ablate(m, t, ["L0H0"], value="resample", seed=1))["n_components"] == 1


def test_the_noising_direction_takes_the_ablation_gradients_in_a_report(monkeypatch):
    """Inside shared runs, AtP* of the ablation (every row) hands its clean-run gradients to AtP* of noising
    (changed rows only): one gradient pass for both, the same estimates as alone."""
    m, t = build("llama")
    calls = []
    orig = Runner._gradients_local

    def spy(self, source, reads, label, changed_rows_only):
        calls.append((source, changed_rows_only))
        return orig(self, source, reads, label, changed_rows_only)

    alone = hp.attribution_patch(m, t, "heads", direction="noise", method="atp*").to_frame()
    monkeypatch.setattr(Runner, "_gradients_local", spy)
    with shared_runs():
        hp.attribution_ablate(m, t, "heads", value="mean")
        shared = hp.attribution_patch(m, t, "heads", direction="noise", method="atp*").to_frame()
    assert calls == [("clean", False)]
    _close(shared["estimate"], alone["estimate"], 1e-9)


def test_bad_input_is_refused_before_any_work():
    m, t = build("gpt2")
    with pytest.raises(OptionError, match="unknown attribution method"):
        hp.attribution_ablate(m, t, method="atp**")
    with pytest.raises(OptionError, match="RESID"):
        hp.attribution_ablate(m, t, "resid")
    with pytest.raises(MetricError, match="linear"):
        hp.attribution_ablate(m, t, metric="logprob")
    with pytest.raises(MetricError, match="minimal at the clean run"):
        hp.attribution_ablate(m, t, metric="kl", method="atp")
    with pytest.raises(OptionError, match="qk_fix"):
        hp.attribution_ablate(m, t, qk_fix="yes")
    with pytest.raises(OptionError, match="value"):
        hp.attribution_ablate(m, t, value="median")
    with pytest.raises(OptionError, match="ablation value"):
        SenderChange((m.components(["L0H0"])[0],), "median")


def _frames(den, noi, de, abl, clean=1.0, corr=0.0):
    names = list("ABCDE")[:len(den)]
    d = pd.DataFrame({"component": names, "estimate": den, "clean_metric": clean, "corrupted_metric": corr,
                      "prompt": 0})
    n = d.assign(estimate=noi)
    direct = pd.DataFrame({"component": names, "direct_effect": de})
    a = None if abl is None else pd.DataFrame({"component": names, "estimate": abl, "prompt": 0})
    return direct, d, n, a


def test_the_rule_out_reads_the_ablation_estimate_on_the_side_of_the_scale():
    # A: nothing but an ablation estimate of 0.08 of the scale (above the cut 0.05): swept; B: -0.08 (against
    # the scale's side, never necessity): ruled out; C: large restoration estimate; D, E: nothing
    direct, den, noi, abl = _frames([0, 0, 0.5, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0.08, -0.08, 0, 0.01, 0])
    plan, bound = tri._exact_plan(direct, den, noi, 0.1, 1, "mean", abl)
    assert plan == {"denoise": ["C"], "noise": ["C"], "ablation": ["A", "C"]}
    assert "AtP* estimate of its mean ablation's total effect" in bound and "other 3 are estimated" in bound
    # a gap of the other sign flips the side: then B is the one ablated
    direct, den, noi, abl = _frames([0, 0, -0.5, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0.08, -0.08, 0, 0.01, 0],
                                    clean=-1.0, corr=0.0)
    plan, _ = tri._exact_plan(direct, den, noi, 0.1, 1, "mean", abl)
    assert plan["ablation"] == ["B", "C"]
    # without an ablation estimate, the direct effect alone covers the ablation side (the bound says so)
    direct, den, noi, _ = _frames([0, 0, 0.5, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], None)
    plan, bound = tri._exact_plan(direct, den, noi, 0.1, 1, "mean", None)
    assert plan == {k: ["C"] for k in tri.MEASUREMENTS} and "what its direct effect does not show" in bound
