"""Ablations: single, joint and paired, with per-prompt total effects."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from ..checks import public
from ..components import Group, select_groups
from ..errors import ComponentError
from ..interventions import interventions_for
from ..results import Result, provenance
from .common import as_model, check_writers, make_runner, positions_of, value_name


class Ablation(Result):
    """Columns: ``component``, ``prompt``, ``clean_metric``, ``ablated_metric``,
    ``total_effect`` (= clean - ablated; positive means the metric dropped)."""

    kind = "ablation"


class PairedAblation(Result):
    """Columns: ``first``, ``second``, ``prompt``, ``te_first``, ``te_second``,
    ``te_both``, ``interaction`` (= te_both - te_first - te_second)."""

    kind = "paired_ablation"

    def summary(self) -> pd.DataFrame:
        from ..stats import one_sample_p, t_interval

        rows = []
        for (a, b), g in self._frame.groupby(["first", "second"], sort=False):
            m, lo, hi = t_interval(g["interaction"].to_numpy())
            rows.append({"first": a, "second": b, "n": len(g), "te_first": g["te_first"].mean(),
                         "te_second": g["te_second"].mean(), "te_both": g["te_both"].mean(),
                         "interaction": m, "interaction_lo": lo, "interaction_hi": hi,
                         "p_positive": one_sample_p(g["interaction"].to_numpy())})
        return pd.DataFrame(rows)


def ablation_copies(model, groups: Sequence[Group], value: str, positions) -> list[tuple]:
    return [interventions_for(g.members, value, model.head_dim, positions) for g in groups]


@public
def ablate(model: Any, task: Any, components: Any = "heads", value: Any = "mean", *, metric: Any = "logit_diff",
           positions: Any = None, seed: int = 0, progress: bool | None = None) -> Ablation:
    """Ablate each component (or joint group) in the clean run; per-prompt total effects.

    ``value``: ``"zero"``, ``"mean"`` (per-position mean over the task's
    clean prompts), ``"resample"`` (another prompt's activation, seeded) or
    a reference :class:`~hydra_probe.tasks.Task` whose clean prompts give
    the mean. Nested lists or ``"A+B"`` ablate components together.
    """
    model = as_model(model)
    vname = value_name(value)
    groups = select_groups(model, components)
    check_writers(groups, "ablation")
    pos = positions_of(positions)
    runner, m = make_runner(model, task, metric, value, seed, progress, positions=pos)
    clean = runner.baseline("clean").metric
    outs = runner.run("clean", ablation_copies(model, groups, vname, pos), label="ablate")
    n = len(task)
    rows = [pd.DataFrame({"component": g.name, "prompt": range(n), "clean_metric": clean.numpy(),
                          "ablated_metric": o.metric.numpy(), "total_effect": (clean - o.metric).numpy()})
            for g, o in zip(groups, outs)]
    prov = provenance(model, task, metric=m, value=value, seed=seed, positions=None if pos is None else list(pos))
    return Ablation(pd.concat(rows, ignore_index=True), prov)


def parse_pairs(model: Any, pairs: Sequence[Sequence[Any]]) -> list[tuple[Group, Group]]:
    """Parse ``[(c, d), ...]`` (names, ``"A+B"`` or lists) into disjoint group pairs; raises ComponentError."""
    if not pairs:
        raise ComponentError("pairs is empty; give a list of (first, second) component pairs.")
    parsed = []
    for p in pairs:
        if isinstance(p, str) or len(p) != 2:
            raise ComponentError(f"each pair is two components, e.g. ('L9H9', 'L10H7'); got {p!r}.")
        a, = select_groups(model, [p[0]]) if isinstance(p[0], str) else select_groups(model, [list(p[0])])
        b, = select_groups(model, [p[1]]) if isinstance(p[1], str) else select_groups(model, [list(p[1])])
        if set(a.members) & set(b.members):
            raise ComponentError(f"pair {a.name}, {b.name} overlaps; pair two distinct components.")
        parsed.append((a, b))
    check_writers([g for ab in parsed for g in ab], "ablation")
    return parsed


@public
def paired_ablation(model: Any, task: Any, pairs: Sequence[Sequence[Any]], value: Any = "mean", *,
                    metric: Any = "logit_diff", positions: Any = None, seed: int = 0,
                    progress: bool | None = None) -> PairedAblation:
    """For each pair (c, d): TE of c, of d, of both, and the interaction TE_cd - TE_c - TE_d."""
    model = as_model(model)
    vname = value_name(value)
    pos = positions_of(positions)
    parsed = parse_pairs(model, pairs)
    runner, m = make_runner(model, task, metric, value, seed, progress, positions=pos)
    singles: list[Group] = []
    for a, b in parsed:
        for g in (a, b):
            if g not in singles:
                singles.append(g)
    boths = [Group(a.members + b.members) for a, b in parsed]
    clean = runner.baseline("clean").metric
    outs = runner.run("clean", ablation_copies(model, singles + boths, vname, pos), label="paired ablation")
    te = {g: clean - o.metric for g, o in zip(singles, outs[: len(singles)])}
    n = len(task)
    rows = []
    for (a, b), o in zip(parsed, outs[len(singles):]):
        tb = clean - o.metric
        rows.append(pd.DataFrame({"first": a.name, "second": b.name, "prompt": range(n),
                                  "te_first": te[a].numpy(), "te_second": te[b].numpy(), "te_both": tb.numpy(),
                                  "interaction": (tb - te[a] - te[b]).numpy()}))
    prov = provenance(model, task, metric=m, value=value, seed=seed, positions=None if pos is None else list(pos))
    return PairedAblation(pd.concat(rows, ignore_index=True), prov)
