"""Neuron-level compensation: an MLP's self-repair row split over its neurons.

An MLP writes ``out = sum_n a_n W_out[n] + b`` (``a_n``: the input of its
output projection; for gated MLPs the input of ``down_proj``). When a
component c is ablated, the MLP's compensation at the read (last) position,
read like dDE at the clean final-norm scale sigma, is

    dDE_mlp = sum_n (a'_n - a_n) <gamma P(W_out[n]), u> / sigma

so each neuron's row is its activation change times its write onto the metric
direction. The rows sum to the MLP's ``mlp`` row of
:func:`~hydra_probe.effects.mechanisms.repair_mechanisms` (under
``scale="frozen"`` also its ``self_repair(...).contributions()`` row; under
``"recomputed"`` the MLP's rescaling is a norm effect and is not split).
Positive rows compensate (e.g. a neuron that stopped erasing the answer:
anti-erasure); negative rows amplify the loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from ..checks import public
from ..components import Component, is_downstream, select, select_groups
from ..errors import ComponentError
from ..models.sites import Site
from ..results import Result, provenance
from .ablation import ablation_copies
from .common import as_model, check_scale, make_runner, positions_of, value_name


class NeuronContributions(Result):
    """Per neuron x prompt: ``neuron``, ``prompt``, ``delta_de`` (metric units), every neuron of the MLP.

    ``extras["mlp"]`` (``prompt``, ``delta_de``): the MLP's own row, which
    the neurons sum to. :meth:`summary` ranks neurons by the size of their
    mean contribution.
    """

    kind = "neuron_contributions"

    def mlp_row(self) -> pd.DataFrame:
        """``prompt``, ``delta_de``: the MLP's compensation (the sum of its neurons)."""
        return self.extras["mlp"].copy()

    def summary(self, top: int = 10, level: float = 0.95) -> pd.DataFrame:
        """The ``top`` neurons by |mean delta_de|: ``neuron``, ``n``, ``delta_de`` with ``level`` Student-t
        interval across prompts, ``role`` (``compensates`` if the mean is positive, else ``amplifies``) and
        ``share`` (of the MLP's mean row)."""
        from ..stats import grouped_t

        g = grouped_t(self._frame, ["neuron"], "delta_de", level)
        g = g.reindex(g["mean"].abs().sort_values(ascending=False, kind="stable").index).head(top)
        total = float(self.extras["mlp"]["delta_de"].mean())
        out = pd.DataFrame({"neuron": g["neuron"].astype(int).to_numpy(), "n": g["n"].to_numpy(),
                            "delta_de": g["mean"].to_numpy(), "delta_de_lo": g["lo"].to_numpy(),
                            "delta_de_hi": g["hi"].to_numpy(),
                            "role": np.where(g["mean"].to_numpy() > 0, "compensates", "amplifies"),
                            "share": g["mean"].to_numpy() / total if abs(total) > 1e-12 else np.nan})
        out.attrs["interval"] = f"{int(level * 100)}% Student-t interval of the mean across prompts"
        return out


def _parse(model: Any, component: Any, mlp: Any) -> tuple[Any, Component]:
    groups = select_groups(model, component)
    if len(groups) != 1:
        raise ComponentError(f"neuron_contributions takes one ablated component (a head, an MLP or a joint "
                             f"group of them); got {len(groups)}: {', '.join(g.name for g in groups[:5])}.")
    g = groups[0]
    bad = [c.name for c in g.members if c.kind not in ("head", "mlp")]
    if bad:
        raise ComponentError(f"{', '.join(bad)} is not a head or an MLP; neuron_contributions ablates heads "
                             "(e.g. 'L1H0') or MLPs (e.g. 'MLP0').")
    ms = select(model, mlp) if isinstance(mlp, (str, Component)) else None
    if not ms or len(ms) != 1 or ms[0].kind != "mlp":
        raise ComponentError(f"mlp must name one MLP, e.g. 'MLP{model.n_layers - 1}'; got {mlp!r}.")
    d = ms[0]
    if d in g.members or not any(is_downstream(d, c, model.parallel_residual) for c in g.members):
        raise ComponentError(
            f"{d.name} is not downstream of {g.name} (it does not read what {g.name} writes"
            f"{', with the parallel residual of this model' if model.parallel_residual else ''}), so it cannot "
            f"compensate for it; pick an MLP of a later layer than {g.name}."
        )
    return g, d


@public
def neuron_contributions(model: Any, task: Any, component: Any, mlp: Any, value: Any = "mean",
                         scale: str = "frozen", *, metric: Any = "logit_diff", positions: Any = None,
                         seed: int = 0, progress: bool | None = None) -> NeuronContributions:
    """Split MLP ``mlp``'s compensation for ablating ``component`` over its neurons (see module doc).

    Args:
        model, task, value, metric, positions, seed, progress: as
            :func:`~hydra_probe.effects.self_repair`.
        component: the ablated head or MLP (or a joint group, ``"L1H0+L1H2"``).
        mlp: an MLP downstream of it, e.g. ``"MLP2"``.
        scale: recorded; neurons are read at the clean scale under both
            policies (see module doc).

    Returns:
        :class:`NeuronContributions` (one row per neuron and prompt).
    """
    model = as_model(model)
    check_scale(scale)
    vname = value_name(value)
    g, d = _parse(model, component, mlp)
    ad = model.adapter
    ad.check_neuron_basis()
    pos = positions_of(positions)
    runner, m = make_runner(model, task, metric, value, seed, progress, positions=pos)
    ro = runner.readout  # raises for a non-linear metric, before any forward
    site = Site(d.layer, "mlp_act")
    base = runner.run("clean", [()], readout=True, capture={site})[0]
    o = runner.run("clean", ablation_copies(model, [g], vname, pos), readout=True, capture={site},
                   label="neurons")[0]
    sigma0 = ro.sigma(base.resid)
    write = ro.read_vector(ro.u).cpu() @ ad.W_out(d.layer).detach().to(torch.float64).cpu().T  # (n, d_mlp)
    delta = (o.captures[site].to(torch.float64) - base.captures[site].to(torch.float64)) * write / sigma0[:, None]
    col = [c.name for c in ro.components].index(d.name)
    row = (o.proj[:, col] - base.proj[:, col]) / sigma0
    n, N = delta.shape
    frame = pd.DataFrame({"neuron": np.tile(np.arange(N), n), "prompt": np.repeat(np.arange(n), N),
                          "delta_de": delta.numpy().reshape(-1)})
    prov = provenance(model, task, metric=m, value=value, scale=scale, seed=seed,
                      positions=None if pos is None else list(pos), component=g.name, mlp=d.name, d_mlp=int(N))
    return NeuronContributions(frame, prov, {"mlp": pd.DataFrame({"prompt": np.arange(n), "delta_de": row.numpy()})})
