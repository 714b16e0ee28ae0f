"""Direct effects close exactly on every family; per-head outputs sum to the attention output."""

import numpy as np
import pytest
import tiny
import torch

import hydra_probe as hp
from hydra_probe.models.sites import Site


def hf_logit_diff(m, task):
    out = []
    for i in range(len(task)):
        with torch.no_grad():
            lg = m.hf_model(task.clean_ids[i][None]).logits[0, -1]
        out.append(float(lg[task.answer_ids[i]] - lg[task.alternative_ids[i]]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_direct_effects_close_to_model_logit_diff(family):
    m = tiny.model(family)
    task = tiny.ioi(m, 6)
    de = hp.direct_effects(m, task, components="all")
    f = de.to_frame()
    assert set(f.component) == {c.name for c in m.components("all")}
    total = f.groupby("prompt").direct_effect.sum().to_numpy() + de.constant.constant.to_numpy()
    ref = hf_logit_diff(m, task).numpy()
    assert abs(total - ref).max() < 1e-4
    assert abs(de.constant.metric.to_numpy() - ref).max() < 1e-4
    # whole attention layers equal the sum of their heads
    layers = hp.direct_effects(m, task, components="layers").to_frame()
    heads = f[f.kind == "head"].groupby(["layer", "prompt"]).direct_effect.sum()
    for _, r in layers.iterrows():
        assert abs(r.direct_effect - heads[(r.layer, r.prompt)]) < 1e-9


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_head_outputs_sum_to_attention_output(family):
    m = tiny.model(family)
    task = tiny.ioi(m, 4)
    ad = m.adapter
    from hydra_probe.runner.readout import Readout

    ro = Readout.build(m, torch.zeros(len(task), m.d_model), torch.zeros(len(task)))
    ids = task.batch(task.groups()[0])
    p = ad.prefix(ids, capture={Site(l, "z") for l in range(m.n_layers)})
    for l in range(m.n_layers):
        z = p.captures[Site(l, "z")]
        o_proj, _ = ad.module_of(Site(l, "z"))
        with torch.no_grad():
            attn_out = o_proj(z)[:, -1].double()
        heads = ro.head_outputs(l, z[:, -1]).sum(1)
        b = ad.b_O(l)
        if b is not None:
            heads = heads + b.double()
        assert torch.allclose(heads, attn_out, atol=1e-5)


def test_recomputed_scale_closes_on_corrupted_run():
    m = tiny.model("llama")
    task = tiny.ioi(m, 4)
    de = hp.direct_effects(m, task, scale="recomputed", run="corrupted")
    total = de.to_frame().groupby("prompt").direct_effect.sum().to_numpy() + de.constant.constant.to_numpy()
    assert abs(total - de.constant.metric.to_numpy()).max() < 1e-4
    frozen = hp.direct_effects(m, task, scale="frozen", run="corrupted")
    # frozen uses the clean scale: a different split of a different total
    assert not torch.allclose(torch.tensor(frozen.to_frame().direct_effect.values),
                              torch.tensor(de.to_frame().direct_effect.values))
    assert de.provenance["scale"] == "recomputed" and de.provenance["run"] == "corrupted"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_recomputed_norm_row_is_computed_not_the_remainder(family):
    """The recomputed-scale rows are each computed from their own formula, so their sum meeting SR is a check.
    Independently of the package's decomposition: NORM = (<r, x'> - sum_d <r, out_d'>) (1/sigma' - 1/sigma),
    with x' the ablated final residual read from a plain hook on the final norm."""
    m = tiny.model(family)
    task = tiny.ioi(m, 4)
    sr = hp.self_repair(m, task, ["L0H1"], value="zero", scale="recomputed")
    f = sr.to_frame()
    con = sr.contributions()
    sums = con.groupby("prompt").delta_de.sum().to_numpy()
    assert abs(sums - f.self_repair.to_numpy()).max() < 1e-5
    # the ablated run by hand: zero head 1's z at layer 0, keep the final norm's input
    ad = m.adapter
    from hydra_probe.metrics import direction
    from hydra_probe.runner.readout import Readout

    u, bias = direction(ad, hp.metrics.get_metric("logit_diff"), task.answer_ids, task.alternative_ids)
    ro = Readout.build(m, u, bias)
    clean_de = hp.direct_effects(m, task, "all").to_frame()
    dh = ad.head_dim
    norm = []
    for i in range(len(task)):
        ids = task.clean_ids[i][None]
        x = {}
        o = ad.module_of(Site(0, "z"))[0]
        h1 = o.register_forward_pre_hook(lambda mod, a: (torch.cat([a[0][..., :dh], 0 * a[0][..., dh:2 * dh],
                                                                     a[0][..., 2 * dh:]], -1),))
        h2 = ad.final_norm.register_forward_pre_hook(lambda mod, a, x=x: x.__setitem__("x", a[0][0, -1].double()))
        try:
            with torch.no_grad():
                m.hf_model(ids)
        finally:
            for h in (h1, h2):
                h.remove()
        r = ro.read_vector(ro.u[i:i + 1])[0]
        sigma1 = sigma_of(m, x["x"])
        sigma0 = de_sigma(m, task, i)
        down = con[(con.prompt == i) & (con.downstream != "NORM")]
        # sum_d <r, out_d'> = sigma' * sum_d (dDE_d + DE_d(clean; sigma)) for the downstream rows
        de0 = clean_de[(clean_de.prompt == i)].set_index("component").direct_effect
        out_d = sigma1 * sum(row.delta_de + de0[row.downstream] for row in down.itertuples())
        norm.append((float(x["x"] @ r) - out_d) * (1 / sigma1 - 1 / sigma0))
    got = con[con.downstream == "NORM"].sort_values("prompt").delta_de.to_numpy()
    assert abs(got - np.array(norm)).max() < 1e-6


def de_sigma(m, task, i):
    """The clean final-norm scale of prompt i, from a plain forward."""
    x = {}
    h = m.adapter.final_norm.register_forward_pre_hook(lambda mod, a: x.__setitem__("x", a[0][0, -1].double()))
    try:
        with torch.no_grad():
            m.hf_model(task.clean_ids[i][None])
    finally:
        h.remove()
    return sigma_of(m, x["x"])


def sigma_of(m, v):
    """The final norm's scale of one residual vector, written out."""
    if m.adapter.table.norm_kind == "layernorm":
        return float(torch.sqrt(v.var(unbiased=False) + m.adapter.norm_params()[2]))
    return float(torch.sqrt(v.pow(2).mean() + m.adapter.norm_params()[2]))
