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
the rest. Both close exactly. All numbers come from one ablated forward per
component (stacked), read at the last position.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from ..checks import public
from ..components import Group, is_downstream, select_groups
from ..results import Result, provenance
from .ablation import ablation_copies
from .common import as_model, check_scale, check_writers, make_runner, positions_of, value_name
from .direct import component_columns


class SelfRepair(Result):
    """Per ablated component x prompt: ``clean_de``, ``de_lost``, ``total_effect``,
    ``self_repair``, ``norm_term`` (plus ``clean_metric``, ``ablated_metric``).

    :meth:`contributions` gives ``component``, ``downstream``, ``prompt``,
    ``delta_de``: one row per downstream head and MLP and a ``"NORM"`` row;
    per component and prompt they sum to ``self_repair``.
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
    base = runner.baseline("clean", readout=True)
    sigma0 = ro.sigma(base.resid)
    outs = runner.run("clean", ablation_copies(model, groups, vname, pos), readout=True, label="self-repair")
    n = len(task)
    fin = ro.components
    main, contrib = [], []
    for g, o in zip(groups, outs):
        frame, con = _decompose(g, fin, model.parallel_residual, base, o, sigma0, ro.sigma(o.resid), scale, n)
        main.append(frame)
        contrib.append(con)
    prov = provenance(model, task, metric=m, value=value, scale=scale, seed=seed,
                      positions=None if pos is None else list(pos))
    return SelfRepair(pd.concat(main, ignore_index=True), prov, {"contributions": pd.concat(contrib, ignore_index=True)})


def _decompose(g: Group, fin: list, parallel: bool, base, o, sigma0: torch.Tensor, sigma1: torch.Tensor,
               scale: str, n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Main row and contribution rows for one ablated group (see module doc)."""
    cols = sorted({i for c in g.members for i in component_columns(fin, c)})
    clean_de = base.proj[:, cols].sum(1) / sigma0
    repl_de = o.proj[:, cols].sum(1) / sigma0
    de_lost = clean_de - repl_de
    te = base.metric - o.metric
    sr = de_lost - te
    # every non-member that any member can reach (for a group across layers, also those between its members)
    down = [i for i, d in enumerate(fin) if i not in cols and any(is_downstream(d, c, parallel) for c in g.members)]
    if scale == "frozen":
        delta = (o.proj[:, down] - base.proj[:, down]) / sigma0[:, None]
        total1 = o.proj.sum(1) + o.proj_const
        norm = total1 / sigma1 - total1 / sigma0
    else:
        delta = o.proj[:, down] / sigma1[:, None] - base.proj[:, down] / sigma0[:, None]
        norm = sr - delta.sum(1)
    frame = pd.DataFrame({"component": g.name, "prompt": range(n), "clean_de": clean_de.numpy(),
                          "de_lost": de_lost.numpy(), "total_effect": te.numpy(), "self_repair": sr.numpy(),
                          "norm_term": norm.numpy(), "clean_metric": base.metric.numpy(),
                          "ablated_metric": o.metric.numpy()})
    names = [fin[i].name for i in down] + ["NORM"]
    vals = torch.cat([delta, norm[:, None]], dim=1).numpy()  # (n, len(down)+1)
    con = pd.DataFrame({"component": g.name, "downstream": np.tile(names, n),
                        "prompt": np.repeat(np.arange(n), len(names)), "delta_de": vals.reshape(-1)})
    return frame, con
