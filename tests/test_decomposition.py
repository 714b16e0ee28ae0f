"""Direct effects close exactly on every family; per-head outputs sum to the attention output."""

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
