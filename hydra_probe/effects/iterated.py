"""Iterated ablation: ablate a target, then its compensators one by one.

Step 0 ablates the target alone; step k ablates the target together with the
first k compensators (in the order given). If the compensators restore what
the target wrote, the total effect climbs from the single-ablation value
towards the target's direct effect lost (DEL, at the clean norm scale), and
the gap ``DEL - TE`` shrinks towards zero (or below it, when the
compensators also carried their own direct effects). To separate the two,
each step's compensators are also ablated without the target: the target's
marginal effect ``TE(target + comps) - TE(comps)`` is what removing the
target costs once its compensators are gone, and climbs towards its DEL
when they were covering for it. All numbers come from one
:func:`~hydra_probe.effects.self_repair` call (one clean forward, one
stacked ablated forward per group).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from ..checks import public
from ..components import Group, select_groups
from ..errors import ComponentError
from ..results import Result
from .common import as_model
from .self_repair import self_repair


class IteratedAblation(Result):
    """Per step x prompt: ``step``, ``ablated`` (names joined by ``+``), ``added``
    (the compensator added at this step; empty at step 0), ``prompt``,
    ``total_effect`` (clean - ablated metric), ``target_de_lost`` (the
    target's DEL from the single ablation, clean scale), ``gap`` (=
    target_de_lost - total_effect), ``compensators_te`` (TE of this step's
    compensators ablated without the target; 0 at step 0),
    ``target_marginal`` (= total_effect - compensators_te: what removing the
    target costs once its compensators are gone), ``marginal_gap`` (=
    target_de_lost - target_marginal), ``de_lost`` (DEL of everything ablated
    at this step), ``clean_metric``, ``ablated_metric``.

    ``total_effect`` also counts the compensators' own direct effects, so it
    can overshoot the target's DE lost; ``target_marginal`` is the target's
    share alone and should climb towards its DE lost as the compensators go.
    """

    kind = "iterated_ablation"

    def summary(self, level: float = 0.95) -> pd.DataFrame:
        """Per step: means and ``level`` t intervals of total_effect, gap, de_lost,
        target_marginal and marginal_gap; ``recovered`` = mean total_effect /
        mean target_de_lost; ``marginal_recovered`` = mean target_marginal /
        mean target_de_lost."""
        from ..stats import t_interval

        rows = []
        for step, g in self._frame.groupby("step", sort=True):
            row: dict[str, Any] = {"step": int(step), "ablated": g["ablated"].iloc[0], "added": g["added"].iloc[0],
                                   "n": len(g)}
            for v in ("total_effect", "target_de_lost", "gap", "de_lost", "target_marginal", "marginal_gap"):
                m, lo, hi = t_interval(g[v].to_numpy(), level)
                row[v], row[f"{v}_lo"], row[f"{v}_hi"] = m, lo, hi
            d = row["target_de_lost"]
            row["recovered"] = row["total_effect"] / d if abs(d) > 1e-12 else float("nan")
            row["marginal_recovered"] = row["target_marginal"] / d if abs(d) > 1e-12 else float("nan")
            rows.append(row)
        out = pd.DataFrame(rows)
        out.attrs["interval"] = f"{level:.0%} Student-t interval of the mean across prompts"
        return out


@public
def iterated_ablation(model: Any, task: Any, target: Any, compensators: Sequence[Any], value: Any = "mean", *,
                      metric: Any = "logit_diff", seed: int = 0, positions: Any = None,
                      scale: str = "frozen", progress: bool | None = None) -> IteratedAblation:
    """Ablate ``target``, then ``target`` + the first k ``compensators``, for k = 1..len(compensators).

    Args:
        target: a component name (or a joint ``"A+B"``).
        compensators: ordered component names; each must differ from the
            target's members and from each other. Pick them from a
            compensation graph with ``hydra_probe.graph.compensators_of``.
        value, metric, seed, positions: as in :func:`~hydra_probe.effects.ablate`
            (the same for every step; recorded in the provenance).
        scale: norm-scale policy passed to ``self_repair`` (DEL and TE do not
            depend on it; recorded).

    Returns an :class:`IteratedAblation` (see its columns).
    """
    model = as_model(model)
    if isinstance(compensators, str):
        compensators = [compensators]
    tgt, = select_groups(model, [target]) if isinstance(target, str) else select_groups(model, [list(target)])
    comps: list[Group] = []
    members = list(tgt.members)
    steps = [Group(tuple(members))]
    for c in compensators:
        g, = select_groups(model, [c]) if isinstance(c, str) else select_groups(model, [list(c)])
        for m in g.members:
            if m in members:
                raise ComponentError(f"compensator {g.name} repeats a component already ablated ({m.name}); "
                                     "give distinct compensators that are not part of the target.")
            members.append(m)
        comps.append(g)
        steps.append(Group(tuple(members)))
    # the compensators of each step without the target, for the target's marginal effect
    alone = [Group(tuple(m for c in comps[:k] for m in c.members)) for k in range(1, len(steps))]
    sr = self_repair(model, task, [list(s.members) for s in steps + alone], value=value, scale=scale,
                     metric=metric, positions=positions, seed=seed, progress=progress)
    f = sr.to_frame()
    n = len(task)

    def group(i: int) -> pd.DataFrame:
        """Rows of the i-th group passed to self_repair (groups come in order, n prompts each)."""
        return f.iloc[i * n:(i + 1) * n]

    target_del = group(0)["de_lost"].to_numpy()
    rows = []
    for k, s in enumerate(steps):
        part = group(k)
        te = part["total_effect"].to_numpy()
        te_comps = 0.0 * te if k == 0 else group(len(steps) + k - 1)["total_effect"].to_numpy()
        rows.append(pd.DataFrame({
            "step": k, "ablated": s.name, "added": "" if k == 0 else comps[k - 1].name, "prompt": range(n),
            "total_effect": te, "target_de_lost": target_del, "gap": target_del - te,
            "compensators_te": te_comps, "target_marginal": te - te_comps,
            "marginal_gap": target_del - (te - te_comps),
            "de_lost": part["de_lost"].to_numpy(), "clean_metric": part["clean_metric"].to_numpy(),
            "ablated_metric": part["ablated_metric"].to_numpy()}))
    prov = dict(sr.provenance)
    prov.update(target=tgt.name, compensators=[c.name for c in comps])
    return IteratedAblation(pd.concat(rows, ignore_index=True), prov)
