"""Self-repair: how much of a component's lost direct effect the model restores, and who restores it.

For an ablated component (or group) c, on each prompt (DESIGN.md section 2):

    DEL = DE_c(clean; sigma) - DE_c(replacement; sigma)
    TE  = m(clean) - m(c ablated)
    SR  = DEL - TE = sum_{d downstream of c} dDE_d + dNorm

For a joint group, "downstream" means every non-member that some member can
reach, including components between members in different layers.

with ``frozen`` scale: ``dDE_d = <gamma P(out_d' - out_d), u> / sigma`` and
``dNorm = m'(sigma') - m'(sigma)``; with ``recomputed`` scale:
``dDE_d = DE_d(ablated; sigma') - DE_d(clean; sigma)`` and the norm row holds
what the rows of downstream components do not: the change of the final
scale on every other term of the ablated residual (constant terms, the
replacement, components the ablation cannot reach),
``NORM = (<r, x'> - sum_d <r, out_d'>) (1/sigma' - 1/sigma)``. Both policies
are computed term by term (no row is a remainder) and close exactly.

Post-attention norms (Gemma-2/3, OLMo-2): head h of layer l writes
``gamma_l W_O^h z_h / sigma_l``. Direct effects read every norm at the
clean scales; the change of layer l's scale is the row ``POSTNORM{l}``
(frozen: ``sum_h <r, gamma_l W_O^h z_h'> (1/sigma_l' - 1/sigma_l) / sigma``
over the layer's heads; recomputed: the same over the layer's heads that
are not downstream rows, at sigma'), one per layer whose scale the ablation
can change. An MLP with a post norm is one unit (its row includes its norm).
With a final logit soft-cap the decomposition is of the raw metric and the
row ``SOFTCAP`` = (m' - raw m') - (m - raw m) closes it on the capped one.

All numbers come from one ablated forward per component (stacked), read at
the last position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..checks import public
from ..components import Group, is_downstream, select_groups
from ..results import Result, provenance
from .ablation import ablation_copies
from .common import as_model, check_scale, check_writers, make_runner, positions_of, value_name
from .direct import SOFTCAP, component_columns

NORM = "NORM"


class SelfRepair(Result):
    """Per ablated component x prompt: ``clean_de``, ``de_lost``, ``total_effect``,
    ``self_repair``, ``norm_term`` (plus ``clean_metric``, ``ablated_metric``,
    ``postnorm_term`` (the sum of the ``POSTNORM{l}`` rows) and ``softcap_term``;
    both 0 for families without post norms or a logit cap).

    :meth:`contributions` gives ``component``, ``downstream``, ``prompt``,
    ``delta_de``: one row per downstream head and MLP, a ``"NORM"`` row, and
    where the family has them one ``"POSTNORM{l}"`` row per post-attention
    norm the ablation can change and a ``"SOFTCAP"`` row; per component and
    prompt they sum to ``self_repair``.
    """

    kind = "self_repair"

    def contributions(self) -> pd.DataFrame:
        return self.extras["contributions"].copy()

    def summary(self, level: float = 0.95, top_fraction: float | None = None) -> pd.DataFrame:
        """Per component: means and t intervals, a paired test of SR > 0 (one-sided t),
        Benjamini-Hochberg q across components, and SR/DEL (fraction compensated).

        ``top_fraction`` (e.g. 0.25) restricts to the prompts where the
        component's clean direct effect is highest (self-repair concentrates there).
        """
        from ..stats import bh, one_sample_p, t_interval

        f = self._frame
        rows = []
        for c, g in f.groupby("component", sort=False):
            if top_fraction is not None:
                k = max(2, int(np.ceil(len(g) * top_fraction)))
                g = g.nlargest(k, "clean_de")
            row: dict[str, Any] = {"component": c, "n": len(g)}
            for v in ("clean_de", "de_lost", "total_effect", "self_repair", "norm_term"):
                m, lo, hi = t_interval(g[v].to_numpy(), level)
                row[v], row[f"{v}_lo"], row[f"{v}_hi"] = m, lo, hi
            row["p_self_repair"] = one_sample_p(g["self_repair"].to_numpy())
            dl = row["de_lost"]
            row["fraction_repaired"] = row["self_repair"] / dl if abs(dl) > 1e-12 else float("nan")
            row["lower_bound"] = bool(row["self_repair"] > 0 and row["self_repair_lo"] > 0)
            rows.append(row)
        out = pd.DataFrame(rows)
        rej, q = bh(out["p_self_repair"].to_numpy())
        out["q_self_repair"], out["significant"] = q, rej
        out.attrs["interval"] = f"{int(level * 100)}% Student-t interval across prompts; p: one-sided t test of SR > 0; q: Benjamini-Hochberg"
        return out

    def contribution_summary(self, level: float = 0.95) -> pd.DataFrame:
        """Per (component, downstream): mean delta_de with t interval, two-sided p and BH q (vectorised)."""
        from ..stats import bh, grouped_t

        g = grouped_t(self.extras["contributions"], ["component", "downstream"], "delta_de", level)
        out = g.rename(columns={"mean": "delta_de", "lo": "delta_de_lo", "hi": "delta_de_hi"})
        out = out[["component", "downstream", "n", "delta_de", "delta_de_lo", "delta_de_hi", "p"]]
        rej, q = bh(out["p"].to_numpy())
        out["q"] = q
        return out


@public
def self_repair(model: Any, task: Any, components: Any = "heads", value: Any = "mean", scale: str = "frozen", *,
                metric: Any = "logit_diff", positions: Any = None, seed: int = 0,
                progress: bool | None = None) -> SelfRepair:
    """Self-repair of each component (or joint group) with its exact decomposition; see module doc."""
    model = as_model(model)
    check_scale(scale)
    vname = value_name(value)
    groups = select_groups(model, components)
    check_writers(groups, "self-repair")
    pos = positions_of(positions)
    runner, m = make_runner(model, task, metric, value, seed, progress, positions=pos)
    ro = runner.readout
    n = len(task)
    capped = model.adapter.softcap is not None
    clean = RunReadout.of(ro, runner.baseline("clean", readout=True), n)
    outs = runner.run("clean", ablation_copies(model, groups, vname, pos), readout=True, label="self-repair")
    main, contrib = [], []
    for g, o in zip(groups, outs):
        parts = Partition.of(g, ro, model.parallel_residual)
        frame, con = decompose_run(g.name, parts, clean=clean, ablated=RunReadout.of(ro, o, n), scale=scale,
                                softcap=capped)
        main.append(frame)
        contrib.append(con)
    prov = provenance(model, task, metric=m, value=value, scale=scale, seed=seed,
                      positions=None if pos is None else list(pos))
    return SelfRepair(pd.concat(main, ignore_index=True), prov, {"contributions": pd.concat(contrib, ignore_index=True)})


@dataclass(frozen=True)
class RunReadout:
    """One run's last-position readout in the terms of the decomposition (task order, float64, CPU).

    ``metric`` (n,): the model's own (soft-capped) metric; ``raw_metric`` (n,): the linear pre-cap
    metric from the final residual; ``proj`` (n, C): every finest component's actual write projected on
    the read vector (no final-norm scale); ``resid_proj`` (n,): the whole final residual projected;
    ``sigma`` (n,): the final norm's scale; ``post_scale`` (n, C): the post-attention scale each head's
    write was divided by (1 for MLPs and families without post norms).
    """

    metric: torch.Tensor
    raw_metric: torch.Tensor
    proj: torch.Tensor
    resid_proj: torch.Tensor
    sigma: torch.Tensor
    post_scale: torch.Tensor

    @classmethod
    def of(cls, ro: Any, out: Any, n: int) -> RunReadout:
        return cls(metric=out.metric, raw_metric=ro.raw_metric(out.resid), proj=out.proj,
                   resid_proj=ro.project(out.resid.to(ro.u.device)).cpu(), sigma=ro.sigma(out.resid).cpu(),
                   post_scale=ro.column_scale(out.post_sigma, n))

    @property
    def pre_post(self) -> torch.Tensor:
        """(n, C) projections before the post-attention norm's division (``proj * post_scale``)."""
        return self.proj * self.post_scale


@dataclass(frozen=True)
class Partition:
    """The finest columns of one ablated group: ``members``, ``downstream`` (every non-member some member can
    reach) with their ``names``, the ``post_layers`` whose post-attention scale the ablation can change, and
    ``layer_of`` (C,) each column's layer for heads (-1 for MLPs)."""

    members: list[int]
    downstream: list[int]
    names: list[str]
    post_layers: list[int]
    layer_of: torch.Tensor

    @classmethod
    def of(cls, g: Group, ro: Any, parallel: bool) -> Partition:
        fin = ro.components
        members = sorted({i for c in g.members for i in component_columns(fin, c)})
        # every non-member that any member can reach (for a group across layers, also those between its members)
        down = [i for i, d in enumerate(fin)
                if i not in members and any(is_downstream(d, c, parallel) for c in g.members)]
        layer_of = ro.head_layers()
        post = sorted({int(layer_of[i]) for i in members + down if layer_of[i] >= 0}) if ro.has_post_norms else []
        return cls(members, down, [fin[i].name for i in down], post, layer_of)


def decompose(group: Group, readout: Any, *, parallel: bool, clean_run: Any, ablated_run: Any, scale: str,
              softcap: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The self-repair rows of one ablated ``group`` from the runner's outputs of the clean and the ablated
    run (``readout=True``): (main frame, contribution frame), as :func:`self_repair` builds them.

    ``readout``: the runner's :class:`~hydra_probe.runner.readout.Readout`; ``parallel``: the model's
    parallel-residual flag; ``softcap``: whether the model caps its logits (adds the ``SOFTCAP`` row).
    """
    n = clean_run.metric.shape[0]
    return decompose_run(group.name, Partition.of(group, readout, parallel), clean=RunReadout.of(readout, clean_run, n),
                      ablated=RunReadout.of(readout, ablated_run, n), scale=scale, softcap=softcap)


def decompose_run(group: str, parts: Partition, *, clean: RunReadout, ablated: RunReadout, scale: str,
                  softcap: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Main rows and contribution rows of one ablated ``group`` (see module doc), every term computed directly."""
    n = clean.metric.shape[0]
    M, D = parts.members, parts.downstream
    s0, s1 = clean.post_scale, ablated.post_scale
    q1 = ablated.pre_post
    sigma0, sigma1 = clean.sigma, ablated.sigma
    clean_de = clean.proj[:, M].sum(1) / sigma0
    repl_de = (q1[:, M] / s0[:, M]).sum(1) / sigma0       # the replacement at the clean scales
    de_lost = clean_de - repl_de
    te = clean.metric - ablated.metric
    sr = de_lost - te
    rescale = q1 * (1 / s1 - 1 / s0)                       # (n, C) each head's change from its layer's scale
    if scale == "frozen":
        delta = (q1[:, D] / s0[:, D] - clean.proj[:, D]) / sigma0[:, None]
        post = [rescale[:, parts.layer_of == l].sum(1) / sigma0 for l in parts.post_layers]
        norm = ablated.resid_proj * (1 / sigma1 - 1 / sigma0)
    else:
        delta = ablated.proj[:, D] / sigma1[:, None] - clean.proj[:, D] / sigma0[:, None]
        not_down = torch.ones(rescale.shape[1], dtype=torch.bool)
        not_down[D] = False
        post_sum = [rescale[:, (parts.layer_of == l) & not_down].sum(1) for l in parts.post_layers]
        post = [p / sigma1 for p in post_sum]
        # everything of x' the downstream rows do not hold, at the clean post scales, times the change of 1/sigma
        rest = ablated.resid_proj - ablated.proj[:, D].sum(1) - sum(post_sum, torch.zeros(n, dtype=torch.float64))
        norm = rest * (1 / sigma1 - 1 / sigma0)
    cap = ((ablated.metric - ablated.raw_metric) - (clean.metric - clean.raw_metric) if softcap
           else torch.zeros(n, dtype=torch.float64))
    postnorm = sum(post, torch.zeros(n, dtype=torch.float64))
    frame = pd.DataFrame({"component": group, "prompt": range(n), "clean_de": clean_de.numpy(),
                          "de_lost": de_lost.numpy(), "total_effect": te.numpy(), "self_repair": sr.numpy(),
                          "norm_term": norm.numpy(), "postnorm_term": postnorm.numpy(),
                          "softcap_term": cap.numpy(), "clean_metric": clean.metric.numpy(),
                          "ablated_metric": ablated.metric.numpy()})
    names = parts.names + [f"POSTNORM{l}" for l in parts.post_layers] + [NORM] + ([SOFTCAP] if softcap else [])
    cols = [delta] + [p[:, None] for p in post] + [norm[:, None]] + ([cap[:, None]] if softcap else [])
    vals = torch.cat(cols, dim=1).numpy()  # (n, len(names))
    con = pd.DataFrame({"component": group, "downstream": np.tile(names, n),
                        "prompt": np.repeat(np.arange(n), len(names)), "delta_de": vals.reshape(-1)})
    return frame, con
