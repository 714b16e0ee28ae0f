"""Direct effects: each component's contribution to a linear metric through the final norm."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from ..checks import public
from ..components import select
from ..results import Result, provenance
from .common import as_model, check_scale, check_writers, make_runner


class DirectEffects(Result):
    """Per component x prompt direct effects.

    Columns: ``component``, ``prompt``, ``direct_effect`` (metric units).
    ``constant``: per prompt, the part from embeddings, attention output
    biases, the norm's beta and the unembedding bias; for the ``"all"``
    partition, direct effects plus the constant equal ``metric``.

    With a final logit soft-cap (Gemma-2) direct effects are taken on the raw
    (pre-cap) metric, which is linear; ``constant`` then has ``softcap`` =
    metric - raw metric, and the ``"all"`` partition gets one ``SOFTCAP``
    row holding it, so the rows plus the constant sum to the capped metric.
    """

    kind = "direct_effects"

    @property
    def constant(self) -> pd.DataFrame:
        """Frame ``prompt``, ``constant``, ``metric`` (the run's own metric), ``closure_tol``.

        ``closure_tol``: the stated tolerance of ``sum(DE) + constant == metric``
        in the model's dtype (see ``HookedModel.closure_rtol``).
        """
        return self.extras["constant"].copy()


SOFTCAP = "SOFTCAP"


def component_columns(readout_components: list, comp) -> list[int]:
    """Columns of the finest partition that make up ``comp`` (a head, ATTN or MLP)."""
    names = [c.name for c in readout_components]
    if comp.kind == "attn":
        return [i for i, c in enumerate(readout_components) if c.kind == "head" and c.layer == comp.layer]
    return [names.index(comp.name)]


@public
def direct_effects(model: Any, task: Any, components: Any = "all", scale: str = "frozen",
                   metric: Any = "logit_diff", run: str = "clean") -> DirectEffects:
    """Direct effect of each component on the metric in the ``run`` ("clean"/"corrupted") prompts.

    ``DE_c = <gamma * P(out_c), u> / sigma`` at the last position, where
    sigma is the clean run's final-norm scale (``scale="frozen"``) or the
    run's own (``"recomputed"``; identical for the clean run).
    """
    model = as_model(model)
    check_scale(scale)
    if run not in ("clean", "corrupted"):
        from ..errors import OptionError

        raise OptionError(f"run must be 'clean' or 'corrupted'; got {run!r}.")
    comps = select(model, components)
    check_writers(comps, "direct effect")
    runner, m = make_runner(model, task, metric)
    ro = runner.readout
    out = runner.baseline(run, readout=True)
    sigma_run = ro.sigma(out.resid)
    clean = runner.baseline("clean", readout=True)
    sigma = ro.sigma(clean.resid) if scale == "frozen" else sigma_run
    proj = out.proj
    if scale == "frozen" and out.post_sigma is not None:
        # every norm between a component and the logits at the clean run's scale
        proj = proj * ro.column_scale(out.post_sigma, n=len(task)) / ro.column_scale(clean.post_sigma, n=len(task))
    de = proj / sigma[:, None]
    n = len(task)
    rows = []
    for c in comps:
        v = de[:, component_columns(ro.components, c)].sum(1)
        rows.append(pd.DataFrame({"component": c.name, "prompt": range(n), "direct_effect": v.numpy(),
                                  "layer": c.layer, "head": -1 if c.head is None else c.head, "kind": c.kind}))
    const = out.proj_const / sigma + ro.beta_u.cpu()
    raw = ro.raw_metric(out.resid)
    softcap = out.metric - raw if model.adapter.softcap is not None else torch.zeros(n, dtype=torch.float64)
    if model.adapter.softcap is not None and components == "all":
        rows.append(pd.DataFrame({"component": SOFTCAP, "prompt": range(n), "direct_effect": softcap.numpy(),
                                  "layer": model.n_layers, "head": -1, "kind": "softcap"}))
    # the stated closure tolerance per prompt: the dtype's relative one times the size of the summed terms
    tol = model.closure_rtol * (de.abs().sum(1) + const.abs() + softcap.abs())
    cframe = pd.DataFrame({"prompt": range(n), "constant": const.numpy(), "metric": out.metric.numpy(),
                           "raw_metric": raw.numpy() if model.adapter.softcap is not None else out.metric.numpy(),
                           "softcap": softcap.numpy(), "sigma": sigma.numpy(), "closure_tol": tol.numpy()})
    prov = provenance(model, task, metric=m, scale=scale, run=run, direction=None, closure_tol=float(tol.max()))
    return DirectEffects(pd.concat(rows, ignore_index=True), prov, {"constant": cframe})

