"""Why two ablations interact: an exact split of the paired interaction.

For components (or groups) c and d ablated singly and together, with the same
value on the same prompts, the direct effect lost adds over members (clean
norm scale), so the paired interaction is a statement about self-repair:

    I = TE_cd - TE_c - TE_d = SR_c + SR_d - SR_cd

Splitting each SR into its rows (:func:`~hydra_probe.effects.self_repair`):

    I = edge + reverse + others + norm, per prompt and exactly, where
    edge    = dDE_d(c ablated)                   (the compensation-graph weight c -> d)
    reverse = dDE_c(d ablated)                   (0 unless c reads what d writes)
    others  = sum over e not in c, d of [dDE_e(c) + dDE_e(d) - dDE_e(c, d)]
    norm    = Norm_c + Norm_d - Norm_cd          (the scale rows: NORM, and POSTNORM{l} and SOFTCAP where
                                                  the family has them)

So a paired ablation confirms the edge c -> d cleanly when ``edge`` dominates;
when interaction and edge disagree in sign, ``others`` and ``norm`` say why
(e.g. the final norm's scale reacting non-additively to two removals).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from ..checks import public
from ..components import Group, finest, is_norm_row
from ..results import Result
from .ablation import parse_pairs
from .common import as_model
from .direct import component_columns
from .self_repair import self_repair

PARTS = ("edge", "reverse", "others", "norm")


class InteractionParts(Result):
    """Per pair x prompt: ``first``, ``second``, ``prompt``, ``te_first``,
    ``te_second``, ``te_both``, ``interaction`` (= te_both - te_first -
    te_second) and its exact parts ``edge``, ``reverse``, ``others``,
    ``norm`` (they sum to ``interaction``).
    """

    kind = "interaction_parts"

    def summary(self, level: float = 0.95) -> pd.DataFrame:
        """Per pair: means with ``level`` t intervals of the interaction and of each part."""
        from ..stats import t_interval

        rows = []
        for (a, b), g in self._frame.groupby(["first", "second"], sort=False):
            row: dict[str, Any] = {"first": a, "second": b, "n": len(g)}
            for v in ("interaction", *PARTS):
                m, lo, hi = t_interval(g[v].to_numpy(), level)
                row[v], row[f"{v}_lo"], row[f"{v}_hi"] = m, lo, hi
            rows.append(row)
        out = pd.DataFrame(rows)
        out.attrs["interval"] = f"{level:.0%} Student-t interval of the mean across prompts"
        return out


@public
def interaction_parts(model: Any, task: Any, pairs: Sequence[Sequence[Any]], value: Any = "mean",
                      scale: str = "frozen", *, metric: Any = "logit_diff", positions: Any = None, seed: int = 0,
                      progress: bool | None = None) -> InteractionParts:
    """Paired ablations of ``pairs`` with the exact split of each interaction (see the module doc).

    Runs one :func:`self_repair` over the singles and the pairs (the same
    forwards as :func:`paired_ablation`, with the readout). ``scale`` sets how
    each self-repair is split between components and the norm (frozen or
    recomputed); the interaction itself does not depend on it.
    """
    model = as_model(model)
    parsed = parse_pairs(model, pairs)
    groups: list[Group] = []
    index: dict[frozenset, int] = {}  # one ablation per set of members: (c, d) and (d, c) share the joint one
    for a, b in parsed:
        for g in (a, b, Group(a.members + b.members)):
            if frozenset(g.members) not in index:
                index[frozenset(g.members)] = len(groups)
                groups.append(g)
    sr = self_repair(model, task, [list(g.members) for g in groups], value=value, scale=scale, metric=metric,
                     positions=positions, seed=seed, progress=progress)
    frame = sr.to_frame()
    # self_repair may order a group's members its own way: map our groups to its names by position
    order = list(dict.fromkeys(frame["component"]))

    def name(g: Group) -> str:
        return order[index[frozenset(g.members)]]

    main = frame.set_index(["component", "prompt"])
    con = sr.contributions().pivot_table(index=["component", "prompt"], columns="downstream", values="delta_de",
                                         aggfunc="sum", fill_value=0.0)
    fin = finest(model)

    def rows(g: Group) -> list[str]:
        """Contribution rows (heads and MLPs) that make up ``g``."""
        return [fin[i].name for c in g.members for i in component_columns(fin, c)]

    def total(g: Group, columns: list[str]) -> pd.Series:
        """Per prompt: the sum of ``columns`` of ``g``'s contribution rows (absent rows count 0)."""
        return con.loc[name(g)].reindex(columns=columns, fill_value=0.0).sum(axis=1)

    frames = []
    for a, b in parsed:
        ab = Group(a.members + b.members)
        ra, rb = rows(a), rows(b)
        te = {g.name: main.loc[name(g), "total_effect"] for g in (a, b, ab)}
        sr_ = {g.name: main.loc[name(g), "self_repair"] for g in (a, b, ab)}
        edge, reverse = total(a, rb), total(b, ra)
        scales = [x for x in con.columns if is_norm_row(x)]  # NORM, and POSTNORM{l} / SOFTCAP where they exist
        norm = total(a, scales) + total(b, scales) - total(ab, scales)
        rest = [x for x in con.columns if not is_norm_row(x) and x not in ra and x not in rb]
        others = total(a, rest) + total(b, rest) - total(ab, rest)
        inter = te[ab.name] - te[a.name] - te[b.name]
        frames.append(pd.DataFrame({
            "first": a.name, "second": b.name, "prompt": inter.index.to_numpy(),
            "te_first": te[a.name].to_numpy(), "te_second": te[b.name].to_numpy(), "te_both": te[ab.name].to_numpy(),
            "interaction": inter.to_numpy(), "edge": edge.to_numpy(), "reverse": reverse.to_numpy(),
            "others": others.to_numpy(), "norm": norm.to_numpy(),
            "self_repair_first": sr_[a.name].to_numpy(), "self_repair_second": sr_[b.name].to_numpy(),
            "self_repair_both": sr_[ab.name].to_numpy()}))
    prov = dict(sr.provenance)
    prov["method"] = "paired ablation with the exact split I = edge + reverse + others + norm"
    return InteractionParts(pd.concat(frames, ignore_index=True), prov)
