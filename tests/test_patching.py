"""Exactness of activation patching and of the fast local path (tiny float64 models)."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch

import hydra_probe as hp
from hydra_probe.components import select
from hydra_probe.interventions import interventions_for
from hydra_probe.metrics import get_metric
from hydra_probe.runner import Runner


def _model(family: str) -> hp.HookedModel:
    hf = tiny.hf_model(family).double()
    return hp.load_model(hf, tokenizer=tiny.tokenizer(bos=family in ("llama", "mistral", "gemma")))


@pytest.fixture(scope="module")
def gpt2():
    m = _model("gpt2")
    return m, tiny.ioi(m, 6)


@pytest.fixture(scope="module")
def llama():
    m = _model("llama")
    return m, tiny.ioi(m, 6)


def _same_task(model: hp.HookedModel, task: hp.Task) -> hp.Task:
    rows = [{**p, "corrupted": p["clean"]} for p in task.pairs]
    return hp.tasks.from_pairs(model, rows, name="same")


def test_clean_into_clean_is_a_no_op(gpt2):
    m, t = gpt2
    r = Runner(m, t, get_metric("logit_diff"))
    clean = r.baseline("clean").metric
    comps = select(m, ["L0H1", "ATTN1", "MLP2", "RESID1", "RESID3"])
    copies = [interventions_for([c], "clean", m.head_dim) for c in comps]
    copies.append(interventions_for(comps, "clean", m.head_dim))
    for o in r.run("clean", copies):
        torch.testing.assert_close(o.metric, clean, atol=1e-12, rtol=0)
    # a task whose corrupted prompts are the clean ones: denoising changes nothing either ...
    same = _same_task(m, t)
    r2 = Runner(m, same, get_metric("logit_diff"))
    for o in r2.run("corrupted", copies):
        torch.testing.assert_close(o.metric, clean, atol=1e-12, rtol=0)
    # ... but normalised scores are undefined there, and activation patching says so
    with pytest.raises(hp.MetricError, match="normalised"):
        hp.activation_patch(m, same, ["L0H1"], "denoise")


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_all_heads_of_a_layer_jointly_equal_attn_layer(gpt2, direction):
    m, t = gpt2
    r = Runner(m, t, get_metric("logit_diff"))
    source, value = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    attn = {}
    for layer in range(m.n_layers):
        heads = [c for c in select(m, "heads") if c.layer == layer]
        joint, attn[layer] = r.run(source, [interventions_for(heads, value, m.head_dim),
                                            interventions_for(select(m, f"ATTN{layer}"), value, m.head_dim)])
        torch.testing.assert_close(joint.metric, attn[layer].metric, atol=1e-12, rtol=0)
        # patching the heads one by one is not the same (the layer is not additive through later layers)
    ap = hp.activation_patch(m, t, ["ATTN1"], direction).to_frame()
    torch.testing.assert_close(torch.tensor(ap.patched_metric.values), attn[1].metric, atol=1e-12, rtol=0)


@pytest.mark.parametrize("fixture", ["gpt2", "llama"])
def test_residual_patching_restores_exactly(fixture, request):
    m, t = request.getfixturevalue(fixture)
    L = m.n_layers
    for direction in ("denoise", "noise"):
        f = hp.activation_patch(m, t, ["RESID0", f"RESID{L}"], direction, per_position=False).to_frame()
        target = f.clean_metric if direction == "denoise" else f.corrupted_metric
        assert (f.patched_metric - target).abs().max() < 1e-10
    # per position: only the last position of the final residual matters to the metric
    f = hp.activation_patch(m, t, [f"RESID{L}"], "denoise").to_frame()
    last, rest = f[f.position == -1], f[f.position != -1]
    assert (last.patched_metric - last.clean_metric).abs().max() < 1e-10
    assert (rest.patched_metric - rest.corrupted_metric).abs().max() < 1e-10
    assert sorted(set(f.position)) == list(range(-min(t.lengths), 0))


# ------------------------------------------------------------------------- plain reference loop
def _plain_sites(family: str, hf, layer: int):
    """(module whose input is z, MLP module) of ``layer``: plain module paths, tests only."""
    if family == "gpt2":
        blk = hf.transformer.h[layer]
        return blk.attn.c_proj, blk.mlp
    blk = hf.model.layers[layer]
    return blk.self_attn.o_proj, blk.mlp


def _plain_metric(hf, ids, a, b, pre=None, post=None):
    """One full forward of one prompt with plain torch hooks; logit difference at the last position."""
    handles = []
    try:
        if pre is not None:
            mod, fn = pre
            handles.append(mod.register_forward_pre_hook(lambda _m, args: (fn(args[0]),)))
        if post is not None:
            mod, fn = post
            handles.append(mod.register_forward_hook(lambda _m, _a, out: fn(out)))
        with torch.no_grad():
            lg = hf(input_ids=ids[None]).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return float(lg[a] - lg[b])


def _plain_captures(hf, family, t):
    """Per layer and prompt: z (T, H*dh) and mlp_out (T, d) of every clean prompt, one forward each."""
    L = len(hf.transformer.h) if family == "gpt2" else len(hf.model.layers)
    z = {l: [] for l in range(L)}
    mlp = {l: [] for l in range(L)}
    handles = []
    for l in range(L):
        zm, mm = _plain_sites(family, hf, l)
        handles.append(zm.register_forward_pre_hook(lambda _m, args, l=l: z[l].append(args[0][0].clone())))
        handles.append(mm.register_forward_hook(lambda _m, _a, out, l=l: mlp[l].append(out[0].clone())))
    try:
        with torch.no_grad():
            for ids in t.clean_ids:
                hf(input_ids=ids[None])
    finally:
        for h in handles:
            h.remove()
    return z, mlp


def _per_position_mean(xs):
    T = max(x.shape[0] for x in xs)
    s = torch.zeros(T, xs[0].shape[1], dtype=torch.float64)
    c = torch.zeros(T, 1, dtype=torch.float64)
    for x in xs:
        s[: x.shape[0]] += x
        c[: x.shape[0]] += 1
    return s / c


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fast_path_equals_plain_hook_loop(family):
    m = _model(family)
    t = tiny.ioi(m, 4)
    hf = m.hf_model
    comps = ["L0H1", "L1H3", "MLP0", "MLP2", "ATTN2"]
    ab = hp.ablate(m, t, comps, "mean").to_frame()
    sr = hp.self_repair(m, t, comps, "mean").to_frame()
    z, mlp = _plain_captures(hf, family, t)
    dh = m.head_dim
    W_U = hf.get_output_embeddings().weight
    for c in comps:
        layer = int(c[1]) if c.startswith("L") else int(c[-1])
        zmod, mmod = _plain_sites(family, hf, layer)
        for i, ids in enumerate(t.clean_ids):
            T = len(ids)
            a, b = int(t.answer_ids[i]), int(t.alternative_ids[i])
            if c.startswith("MLP"):
                mean = _per_position_mean(mlp[layer])[:T]
                post, pre = (mmod, lambda out, mean=mean: mean[None].to(out.dtype)), None
            else:
                mean = _per_position_mean(z[layer])[:T]
                cols = slice(None) if c.startswith("ATTN") else slice(int(c[3]) * dh, (int(c[3]) + 1) * dh)

                def fn(x, mean=mean, cols=cols):
                    x = x.clone()
                    x[0, :, cols] = mean[:, cols]
                    return x
                pre, post = (zmod, fn), None
            clean = _plain_metric(hf, ids, a, b)
            ablated = _plain_metric(hf, ids, a, b, pre=pre, post=post)
            row = ab[(ab.component == c) & (ab.prompt == i)].iloc[0]
            assert abs(row.clean_metric - clean) < 1e-5
            assert abs(row.ablated_metric - ablated) < 1e-5
            assert abs(row.total_effect - (clean - ablated)) < 1e-5
            srow = sr[(sr.component == c) & (sr.prompt == i)].iloc[0]
            assert abs(srow.total_effect - (clean - ablated)) < 1e-5
            # the direct effect lost, by hand: <gamma P(out_c - out_c'), u> / sigma_clean at the last position
            if c.startswith("MLP"):
                diff = mlp[layer][i][-1] - mean[-1]
            else:
                dz = z[layer][i][-1, cols] - mean[-1, cols]
                # GPT-2's Conv1D weight is (in, out); nn.Linear's is (out, in)
                diff = dz @ (zmod.weight[cols] if family == "gpt2" else zmod.weight[:, cols].T)
            gamma, _, eps = m.adapter.norm_params()
            x = m.adapter.prefix(ids[None]).resid[-1][0, -1]
            if family == "gpt2":
                sigma, diff = torch.sqrt(x.var(unbiased=False) + eps), diff - diff.mean()
            else:
                sigma = torch.sqrt(x.pow(2).mean() + eps)
            u = W_U[a] - W_U[b]
            assert abs(srow.de_lost - float((gamma * diff) @ u / sigma)) < 1e-5
    # nothing left behind
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in hf.modules())


def _plain_run(hf, family: str, ids: torch.Tensor, zero: tuple[int, int] | None, dh: int
               ) -> dict[str, torch.Tensor]:
    """One plain forward of ``ids`` with head ``zero`` = (layer, head) zeroed; records z, mlp input/output,
    q input and the final residual by hand (test-only module paths)."""
    rec: dict[str, torch.Tensor] = {}
    blocks = hf.transformer.h if family == "gpt2" else hf.model.layers
    handles = []
    for l, blk in enumerate(blocks):
        zmod = blk.attn.c_proj if family == "gpt2" else blk.self_attn.o_proj
        mlp = blk.mlp

        def zpre(_m, a, l=l):
            x = a[0].clone()
            if zero is not None and zero[0] == l:
                x[..., zero[1] * dh:(zero[1] + 1) * dh] = 0
            rec[f"z{l}"] = x
            return (x,)
        handles += [zmod.register_forward_pre_hook(zpre),
                    mlp.register_forward_pre_hook(lambda _m, a, l=l: rec.__setitem__(f"mi{l}", a[0])),
                    mlp.register_forward_hook(lambda _m, a, o, l=l: rec.__setitem__(f"mo{l}", o))]
    norm = hf.transformer.ln_f if family == "gpt2" else hf.model.norm
    handles.append(norm.register_forward_pre_hook(lambda _m, a: rec.__setitem__("final", a[0])))
    try:
        with torch.no_grad():
            hf(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return rec


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", ["local", "nnsight"])
def test_run_captures_sites_from_the_same_forward(family, backend):
    """capture= returns the edited activations at the last position or every position, equal to a plain
    hook forward, for sites below and above the restart layer; no extra forward is run."""
    from hydra_probe.models.sites import Site

    hf = tiny.hf_model(family).double()
    m = hp.load_model(hf, tokenizer=tiny.tokenizer(bos=family == "llama"), backend=backend)
    t = tiny.ioi(m, 4)
    r = Runner(m, t, get_metric("logit_diff"))
    L = m.n_layers
    cap = {Site(0, "z"), Site(1, "z"), Site(1, "mlp_in"), Site(2, "mlp_out"), Site(L, "resid_pre")}
    copies = [(), interventions_for(select(m, ["L1H2"]), "zero", m.head_dim)]
    r.prefix(0, "clean")
    calls = [0]
    h = hf.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        last = r.run("clean", copies, capture=cap)
        allp = r.run("clean", copies, capture=cap, capture_positions="all")
    finally:
        h.remove()
    if backend == "local":
        # the cached prefixes plus one stacked forward per group and call; nothing extra for the captures
        assert calls[0] == 0  # the local path runs blocks, never the whole model again
    names = {Site(0, "z"): "z0", Site(1, "z"): "z1", Site(1, "mlp_in"): "mi1", Site(2, "mlp_out"): "mo2",
             Site(L, "resid_pre"): "final"}
    for ci, zero in enumerate([None, (1, 2)]):
        for g, idx in enumerate(r.groups):
            ids = t.batch(idx, "clean")
            rec = _plain_run(hf, family, ids, zero, m.head_dim)
            for s, key in names.items():
                torch.testing.assert_close(allp[ci].captures[s][g], rec[key], atol=1e-10, rtol=0)
                torch.testing.assert_close(last[ci].captures[s][torch.tensor(idx)], rec[key][:, -1],
                                           atol=1e-10, rtol=0)
            torch.testing.assert_close(allp[ci].resid_all[g], rec["final"], atol=1e-10, rtol=0)
    # the zeroed head's columns are zero in the capture, and the metric agrees with the plain run
    assert (last[1].captures[Site(1, "z")][:, 2 * m.head_dim:3 * m.head_dim] == 0).all()
    torch.testing.assert_close(last[1].metric, allp[1].metric, atol=1e-12, rtol=0)
    with pytest.raises(hp.OptionError, match="capture_positions"):
        r.run("clean", copies, capture=cap, capture_positions="first")
    with pytest.raises(hp.InterventionError, match="outside"):
        r.run("clean", copies, capture={Site(L + 3, "z")})


@pytest.mark.parametrize("family", tiny.FAMILIES + tiny.NEW_FAMILIES)
def test_head_ablation_restarts_at_the_output_projection(family, monkeypatch):
    """A copy whose earliest edits are heads' outputs restarts at their layer's output projection (that layer's
    attention is the prefix's, never recomputed); its numbers equal the plain restart's, for ablation and
    self-repair, and the attention module's forward is restored."""
    from hydra_probe.models.adapter import get_path

    hf = tiny.hf_model(family).double()
    m = hp.load_model(hf, tokenizer=tiny.tokenizer(bos=family not in ("gpt2", "neox")))
    t = tiny.ioi(m, 4)
    ad = m.adapter
    comps = ["L1H0", "L1H2", "ATTN2", "L0H1+L2H3", "MLP1"]
    plain, fast = {}, {}
    for flag, out in ((False, plain), (True, fast)):
        monkeypatch.setattr(Runner, "fast_attention", flag)
        out["ablate"] = hp.ablate(m, t, comps, "mean").to_frame().ablated_metric.to_numpy()
        out["sr"] = hp.self_repair(m, t, comps, "zero").to_frame()[["de_lost", "self_repair"]].to_numpy()
        r = Runner(m, t, get_metric("logit_diff"))
        for g in range(len(r.groups)):
            r.prefix(g, "clean")
        direct = ad.can_start_at_z(r.prefix(0, "clean"), 1)
        # the families whose attention returns more than its output (e.g. eager weights) keep the plain path
        assert direct or family not in tiny.FAMILIES
        qproj = get_path(ad.blocks[1], ad.table.qkv[0])
        calls = [0]
        h = qproj.register_forward_hook(lambda *_, calls=calls: calls.__setitem__(0, calls[0] + 1))
        try:
            r.run("clean", [interventions_for(select(m, ["L1H0"]), "zero", m.head_dim)])
        finally:
            h.remove()
        out["calls"] = calls[0]
    assert fast["calls"] == (0 if direct else plain["calls"]) and plain["calls"] > 0
    np.testing.assert_allclose(fast["ablate"], plain["ablate"], atol=1e-12, rtol=0)
    np.testing.assert_allclose(fast["sr"], plain["sr"], atol=1e-12, rtol=0)
    assert all("forward" not in get_path(b, ad.table.attn).__dict__ for b in ad.blocks)
