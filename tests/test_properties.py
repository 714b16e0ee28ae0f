"""Property tests over random tiny configs of all six families (hypothesis).

For a random family, depth (1-3 layers), head count (1, 2, 4), width (16,
32) and weight seed:

* direct effects of the finest partition plus the constant equal the model's
  own logit difference (closure), and the model is left unchanged;
* the self-repair decomposition closes, for both scale policies and the three
  ablation values: the contributions (downstream heads, MLPs and the norm row)
  sum to SR = DEL - TE on every prompt;
* no-op patches change nothing: mean or resample ablation on a task of one
  repeated prompt, noising at the positions before the first token where
  clean and corrupted differ; and patching the whole embedding stream (RESID0)
  gives exactly the other run.

Examples are derandomised (the same ones on every run) and nothing is saved to
a hypothesis database; ``max_examples`` is small so the file runs in about a
minute on two cores.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import tiny
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_model_unchanged import State

import hydra_probe as hp

SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# the family is a pytest parameter (so every family is covered on every run); the rest is drawn
configs = st.fixed_dictionaries({
    "layers": st.integers(1, 3),
    "heads": st.sampled_from([1, 2, 4]),
    "d": st.sampled_from([16, 32]),
    "seed": st.integers(0, 2**16),
})


@functools.lru_cache(maxsize=4)
def build(family: str, layers: int, heads: int, d: int, seed: int):
    m = tiny.model(family, seed=seed, layers=layers, heads=heads, d=d)
    return m, tiny.ioi(m, 4, seed=seed)


def model_logit_diff(m, task) -> np.ndarray:
    out = []
    for i in range(len(task)):
        with torch.no_grad():
            lg = m.hf_model(task.clean_ids[i][None]).logits[0, -1].double()
        out.append(float(lg[task.answer_ids[i]] - lg[task.alternative_ids[i]]))
    return np.array(out)


@pytest.mark.parametrize("family", tiny.FAMILIES)
@settings(max_examples=3, **SETTINGS)
@given(cfg=configs)
def test_direct_effects_close_and_model_unchanged(family, cfg):
    m, task = build(family, **cfg)
    ids = task.clean_ids[0][None]
    before = State(m.hf_model, ids)
    de = hp.direct_effects(m, task, "all")
    total = de.to_frame().groupby("prompt").direct_effect.sum().to_numpy() + de.constant.constant.to_numpy()
    ref = model_logit_diff(m, task)
    assert abs(total - ref).max() < 1e-4
    assert abs(de.constant.metric.to_numpy() - ref).max() < 1e-4
    before.assert_same(m.hf_model, ids)


@pytest.mark.parametrize("family", tiny.FAMILIES)
@settings(max_examples=3, **SETTINGS)
@given(cfg=configs, pick=st.integers(0, 10**6))
def test_self_repair_decomposition_closes(family, cfg, pick):
    m, task = build(family, **cfg)
    comps = [c.name for c in m.components("all")]
    chosen = sorted({comps[pick % len(comps)], comps[(pick // 7) % len(comps)], "ATTN0"})
    # a joint group across layers: components between its members change too and must have rows
    chosen.append(f"L0H{pick % m.n_heads}+MLP{m.n_layers - 1}")
    ids = task.clean_ids[0][None]
    before = State(m.hf_model, ids)
    de_lost = {}
    # independent reference for SR = DEL - TE: TE from ablate(), and for zero ablation DEL = the clean direct
    # effect from direct_effects() (which shares no code path with self_repair's decomposition)
    te_zero = hp.ablate(m, task, chosen, value="zero").to_frame().set_index(["component", "prompt"]).total_effect
    de = hp.direct_effects(m, task, "all").to_frame()
    for value in ("zero", "mean", "resample"):
        for scale in ("frozen", "recomputed"):
            sr = hp.self_repair(m, task, chosen, value=value, scale=scale, seed=cfg["seed"])
            f = sr.to_frame().set_index(["component", "prompt"])
            if value == "zero":
                for name in dict.fromkeys(chosen):
                    members = [c for part in name.split("+") for c in _finest_of(m, part)]
                    clean_de = de[de.component.isin(members)].groupby("prompt").direct_effect.sum().to_numpy()
                    want = clean_de - te_zero.loc[name].to_numpy()
                    assert np.abs(f.loc[name].self_repair.to_numpy() - want).max() < 1e-6, name
            sums = sr.contributions().groupby(["component", "prompt"]).delta_de.sum()
            assert abs(sums.reindex(f.index).to_numpy() - f.self_repair.to_numpy()).max() < 1e-6
            norm = sr.contributions().query("downstream == 'NORM'").set_index(["component", "prompt"]).delta_de
            assert np.allclose(norm.reindex(f.index).to_numpy(), f.norm_term.to_numpy(), atol=1e-9)
            de_lost.setdefault(value, []).append(f.de_lost.to_numpy())
    # DEL and SR are taken at the clean scale: they do not depend on the policy
    for frozen, recomputed in de_lost.values():
        assert np.allclose(frozen, recomputed, atol=1e-9)
    before.assert_same(m.hf_model, ids)


def _finest_of(m, name: str) -> list[str]:
    """The heads and MLPs that make up ``name`` (ATTN{l} is its heads)."""
    if name.startswith("ATTN"):
        return [f"L{name[4:]}H{h}" for h in range(m.n_heads)]
    return [name]


@pytest.mark.parametrize("family", tiny.FAMILIES)
@settings(max_examples=3, **SETTINGS)
@given(cfg=configs, pick=st.integers(0, 10**6))
def test_noop_patches_change_nothing(family, cfg, pick):
    m, task = build(family, **cfg)
    comps = [c.name for c in m.components("all")]
    c = comps[pick % len(comps)]
    ids = task.clean_ids[0][None]
    before = State(m.hf_model, ids)
    # one prompt repeated: its mean (and any resampled donor) is its own activation
    same = hp.tasks.from_pairs(m, [task.pairs[0]] * 3)
    for value in ("mean", "resample"):
        te = hp.ablate(m, same, [c, "ATTN0"], value=value).to_frame().total_effect.to_numpy()
        assert abs(te).max() < 1e-5, (value, te)
    # noising before the first differing token: the corrupted run equals the clean run there (causal model)
    first = min(int((task.clean_ids[i] != task.corrupted_ids[i]).nonzero()[0, 0]) for i in range(len(task)))
    if first > 0:
        r = hp.activation_patch(m, task, [c, "RESID1"], direction="noise", positions=list(range(first))).to_frame()
        assert abs(r.patched_metric - r.clean_metric).max() < 1e-5
    # patching the whole embedding stream gives the other run exactly
    for direction, other in (("denoise", "clean_metric"), ("noise", "corrupted_metric")):
        r = hp.activation_patch(m, task, "RESID0", direction=direction, per_position=False).to_frame()
        assert abs(r.patched_metric - r[other]).max() < 1e-5
    before.assert_same(m.hf_model, ids)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_every_family_builds_at_the_extremes(family):
    """The corners of the config space the properties draw from all load (1 head / 4 heads, d 16 / 32)."""
    for layers, heads, d in ((1, 1, 16), (3, 4, 32)):
        m, task = build(family, layers, heads, d, 0)
        assert (m.n_layers, m.n_heads) == (layers, heads)


@pytest.mark.parametrize("family", ["gpt2", "neox", "qwen2"])
@pytest.mark.parametrize("value", ["zero", "mean", "resample"])
def test_interaction_splits_exactly(family, value):
    """I = TE_cd - TE_c - TE_d = edge + reverse + others + norm per prompt (frozen scale, float error), and I
    equals paired_ablation's; the edge part is the self-repair row of d when c is ablated."""
    m, task = build(family, layers=3, heads=4, d=32, seed=1)
    pairs = [("L0H1", "L2H0"), ("L2H0", "L0H1"), ("ATTN0", "MLP1"), ("L1H0+L1H1", "MLP2"), ("MLP0", "ATTN2")]
    r = hp.interaction_parts(m, task, pairs, value=value, seed=1).to_frame()
    parts = r[["edge", "reverse", "others", "norm"]].sum(axis=1)
    assert (r["interaction"] - parts).abs().max() < 1e-5
    pa = hp.paired_ablation(m, task, pairs, value=value, seed=1).to_frame()
    assert np.abs(r["interaction"].to_numpy() - pa["interaction"].to_numpy()).max() < 1e-5
    sr = hp.self_repair(m, task, ["L0H1"], value=value, seed=1).contributions()
    want = sr[sr.downstream == "L2H0"].delta_de.to_numpy()
    got = r[(r["first"] == "L0H1") & (r["second"] == "L2H0")]
    assert np.abs(got["edge"].to_numpy() - want).max() < 1e-9
    assert (got["reverse"] == 0).all()          # L0H1 cannot react to L2H0



def test_interaction_parts_round_trip(tmp_path):
    m, task = build("llama", layers=2, heads=4, d=32, seed=0)
    r = hp.interaction_parts(m, task, [("L0H1", "MLP1")], value="zero")
    back = hp.load_result(r.save(tmp_path / "parts.json"))
    assert isinstance(back, hp.InteractionParts) and back.provenance == r.provenance
    pd.testing.assert_frame_equal(back.to_frame(), r.to_frame())
    assert list(back.summary()["first"]) == ["L0H1"]


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_interaction_norm_part_holds_every_scale_row(family):
    """On families with post-attention norms (and Gemma-2's logit cap) the norm part of a paired interaction is
    the non-additive change of every scale row (NORM, POSTNORM{l}, SOFTCAP), computed here from the three
    self-repair decompositions; `others` holds components only."""
    m = tiny.model64(family, layers=3, heads=4, d=32, seed=2)
    task = tiny.ioi(m, 6)
    a, b = "L0H1", "L1H2"
    r = hp.interaction_parts(m, task, [(a, b)], value="zero").to_frame()
    con = hp.self_repair(m, task, [a, b, f"{a}+{b}"], value="zero").contributions()
    scale = con[con.downstream.str.match(r"^(NORM|SOFTCAP|POSTNORM\d+)$")]
    assert scale.downstream.str.startswith("POSTNORM").any()
    per = scale.groupby(["component", "prompt"]).delta_de.sum().unstack("component")
    want = (per[a] + per[b] - per[f"{a}+{b}"]).to_numpy()
    assert np.abs(r["norm"].to_numpy() - want).max() < 1e-9
    assert (r["interaction"] - r[["edge", "reverse", "others", "norm"]].sum(axis=1)).abs().max() < 1e-5
