"""Verifying compensation edges with paired ablations, and picking compensators.

An edge ``c -> d`` of a compensation graph says that d's direct effect rises
when c is ablated. DESIGN.md section 2 calls the compensation *confirmed*
when, in addition, the interaction ``I = TE_cd - TE_c - TE_d`` of the paired
ablation is positive beyond its confidence interval: removing d as well costs
more than the two single ablations together, as it should if d was covering
for c.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import pandas as pd

from ..checks import public
from ..effects.ablation import PairedAblation
from ..effects.interaction import PARTS, interaction_parts
from ..effects.iterated import IteratedAblation, iterated_ablation
from ..errors import ComponentError, InputError, OptionError
from .build import NORM, edge_frame, scalar


@dataclass
class EdgeVerification:
    """The outcome of :func:`verify_edges`.

    Attributes:
        graph: a copy of the input graph whose tested edges carry
            ``verified`` (``"confirmed"`` / ``"refuted"``) and the
            interaction statistics; untested edges keep ``"untested"``.
        paired: the :class:`~hydra_probe.effects.PairedAblation` that was run
            (per prompt), or None when the graph had no positive edge to test.
        tested: one row per tested edge (``source``, ``target``, ``weight``,
            ``interaction``, ``interaction_lo``, ``interaction_hi``,
            ``interaction_p``, ``verified``, and the interaction's exact parts
            ``interaction_edge``, ``interaction_reverse``,
            ``interaction_others``, ``interaction_norm``; see
            :mod:`hydra_probe.effects.interaction`).
    """

    graph: nx.DiGraph
    paired: PairedAblation | None
    tested: pd.DataFrame = field(default_factory=pd.DataFrame)

    def summary(self) -> pd.DataFrame:
        """The tested edges (a copy of :attr:`tested`)."""
        return self.tested.copy()

    @property
    def confirmed(self) -> list[tuple[str, str]]:
        """Tested edges that were confirmed, strongest first."""
        t = self.tested
        return [] if t.empty else [(a, b) for a, b, v in zip(t["source"], t["target"], t["verified"])
                                   if v == "confirmed"]


def graph_conditions(G: nx.DiGraph, model: Any = None, value: Any = None, metric: Any = None,
                     seed: int | None = None) -> dict[str, Any]:
    """Ablation value, metric, seed and positions under which ``G`` was measured.

    Arguments given explicitly must agree with the graph's provenance (a
    claim checked under other conditions is another claim); a graph measured
    with a reference task's mean needs that task passed as ``value``.
    """
    g = G.graph
    if model is not None and "model" in g and getattr(model, "name", None) != g["model"]:
        raise InputError(f"the graph was measured on model {g['model']!r}, not {getattr(model, 'name', model)!r}; "
                         "verify it on the same model.")
    gval, ref = g.get("value"), g.get("reference")
    if value is None:
        if ref is not None:
            raise OptionError(f"the graph was measured with the mean over reference task {ref!r}; pass that task "
                              "as value= so the verification uses the same ablation value.")
        if gval is None:
            raise OptionError("the graph records no ablation value; pass value='zero', 'mean' or 'resample'.")
        value = gval
    elif isinstance(value, str):
        if gval is not None and (value != gval or ref is not None):
            raise OptionError(f"value={value!r} differs from the graph's ablation value "
                              f"{(ref and 'mean over ' + repr(ref)) or gval!r}; verification must use the same value "
                              "(leave value=None to take it from the graph).")
    elif ref is None:
        raise OptionError(f"the graph was measured with value={gval!r}, not a reference task's mean; leave value=None.")
    elif getattr(value, "name", None) != ref:
        raise OptionError(f"the reference task {getattr(value, 'name', value)!r} differs from the graph's {ref!r}.")
    gmetric = g.get("metric", "logit_diff")
    if metric is None:
        from ..metrics import METRICS

        if gmetric not in METRICS:
            raise OptionError(f"the graph's metric {gmetric!r} is not a built-in one; pass the same metric as metric=.")
        metric = gmetric
    elif isinstance(metric, str) and metric != gmetric:
        raise OptionError(f"metric={metric!r} differs from the graph's metric {gmetric!r}.")
    gseed = int(g.get("seed", 0))
    if seed is not None and int(seed) != gseed:
        raise OptionError(f"seed={seed} differs from the graph's seed {gseed} (it sets resample donors).")
    pos = g.get("positions")
    positions = json.loads(pos) if isinstance(pos, str) else pos
    return {"value": value, "metric": metric, "seed": gseed, "positions": positions}


@public
def verify_edges(model: Any, task: Any, G: nx.DiGraph, *, top: int = 5, value: Any = None, level: float = 0.95,
                 metric: Any = None, progress: bool | None = None) -> EdgeVerification:
    """Test the ``top`` strongest positive (compensation) edges with paired ablations.

    For each edge ``c -> d`` (``d`` not ``NORM``, which cannot be ablated),
    runs the paired ablations ``(c, d), ...`` (with the exact split of each
    interaction, :func:`~hydra_probe.effects.interaction_parts`) under the graph's own
    conditions: the ablation value, metric, seed and positions are read from
    the graph's provenance, so the verification makes the same claim as the
    graph (passing a different ``value`` or ``metric`` raises). The task may
    differ (e.g. held-out prompts); it is recorded as ``verify_task`` /
    ``verify_n`` on the returned graph.

    An edge is ``"confirmed"`` when its weight (mean delta_de) is > 0 and the
    interaction ``I = TE_cd - TE_c - TE_d`` has its ``level`` t-interval lower
    bound above 0; otherwise ``"refuted"``. Edge attributes added:
    ``interaction``, ``interaction_lo``, ``interaction_hi``, ``interaction_p``
    (one-sided t test of I > 0), ``te_source``, ``te_target``, ``te_pair``,
    and the means of the interaction's exact parts ``interaction_edge`` (d's
    change of DE when c is ablated, on the verification prompts),
    ``interaction_reverse``, ``interaction_others`` and ``interaction_norm``
    (they sum to ``interaction``; split with the graph's scale policy).

    The input graph is not modified; the result holds a copy. Returns an
    :class:`EdgeVerification` (``.graph``, ``.paired``, ``.tested``).
    """
    from ..stats import one_sample_p, t_interval

    if not isinstance(top, int) or top < 1:
        raise OptionError(f"top must be a positive integer; got {top!r}.")
    if not 0 < level < 1:
        raise OptionError(f"level must be in (0, 1); got {level!r}.")
    cond = graph_conditions(G, model, value, metric)
    H = G.copy()
    cands = [(u, v, d["weight"]) for u, v, d in H.edges(data=True)
             if v != NORM and H.nodes[v].get("kind") != "norm" and d.get("weight", 0) > 0]
    cands.sort(key=lambda e: -e[2])
    cands = cands[:top]
    H.graph.update({"verify_task": str(getattr(task, "name", "task")), "verify_n": len(task), "verify_top": top,
                    "verify_level": float(level),
                    "verify_rule": "confirmed: weight > 0 and the interaction's t-interval lower bound > 0"})
    if not cands:
        return EdgeVerification(H, None, pd.DataFrame(columns=["source", "target", "weight", "interaction",
                                                               "interaction_lo", "interaction_hi",
                                                               "interaction_p", "verified"]))
    parts = interaction_parts(model, task, [(u, v) for u, v, _ in cands], value=cond["value"],
                              scale=G.graph.get("scale", "frozen"), metric=cond["metric"], seed=cond["seed"],
                              positions=cond["positions"], progress=progress)
    f = parts.to_frame()
    pa = PairedAblation(f[["first", "second", "prompt", "te_first", "te_second", "te_both", "interaction"]],
                        {k: v for k, v in parts.provenance.items() if k not in ("scale", "method")})
    rows = []
    for u, v, w in cands:
        g = f[(f["first"] == u) & (f["second"] == v)]
        if g.empty:
            raise InputError(f"edge {u}->{v}: the paired ablation returned no rows; are these component names "
                             "of this model?")
        m, lo, hi = t_interval(g["interaction"].to_numpy(), level)
        p = one_sample_p(g["interaction"].to_numpy())
        verdict = "confirmed" if (w > 0 and lo == lo and lo > 0) else "refuted"
        split = {f"interaction_{k}": g[k].mean() for k in PARTS}
        attrs = {"interaction": m, "interaction_lo": lo, "interaction_hi": hi, "interaction_p": p,
                 "te_source": g["te_first"].mean(), "te_target": g["te_second"].mean(),
                 "te_pair": g["te_both"].mean(), **split}
        e = H.edges[u, v]
        for k, x in attrs.items():
            sx = scalar(x)
            if sx is None:
                e.pop(k, None)
            else:
                e[k] = sx
        e["verified"] = verdict
        rows.append({"source": u, "target": v, "weight": w, "interaction": m, "interaction_lo": lo,
                     "interaction_hi": hi, "interaction_p": p, "verified": verdict, **split})
    return EdgeVerification(H, pa, pd.DataFrame(rows))


def compensators_of(G: nx.DiGraph, target: str, confirmed_only: bool = True, k: int | None = 3) -> list[str]:
    """The target's compensators in the graph, strongest (largest weight) first.

    Successors of ``target`` with positive weight, excluding ``NORM``; with
    ``confirmed_only`` only edges that :func:`verify_edges` confirmed. At
    most ``k`` (all when None).
    """
    if target not in G:
        raise ComponentError(f"{target!r} is not a node of the graph; ablated components are "
                             f"{', '.join(str(n) for n, d in G.nodes(data=True) if d.get('ablated')) or 'none'}.")
    out = [(v, d["weight"]) for v, d in G[target].items()
           if v != NORM and G.nodes[v].get("kind") != "norm" and d.get("weight", 0) > 0
           and (not confirmed_only or d.get("verified") == "confirmed")]
    out.sort(key=lambda e: -e[1])
    names = [v for v, _ in out]
    return names if k is None else names[:k]


@public
def iterated_from_graph(model: Any, task: Any, G: nx.DiGraph, target: str, *, k: int = 3,
                        confirmed_only: bool = True, compensators: Sequence[str] | None = None,
                        progress: bool | None = None) -> IteratedAblation:
    """:func:`~hydra_probe.effects.iterated_ablation` of ``target`` with its compensators from ``G``.

    Uses :func:`compensators_of` (unless ``compensators`` is given) and the
    graph's ablation value, metric, seed and positions.
    """
    cond = graph_conditions(G, model)
    comps = list(compensators) if compensators is not None else compensators_of(G, target, confirmed_only, k)
    if not comps:
        raise InputError(f"{target} has no {'confirmed ' if confirmed_only else ''}compensators in the graph; run "
                         "verify_edges first, or use confirmed_only=False.")
    return iterated_ablation(model, task, target, comps, value=cond["value"], metric=cond["metric"],
                             seed=cond["seed"], positions=cond["positions"], scale=G.graph.get("scale", "frozen"),
                             progress=progress)


__all__ = ["EdgeVerification", "compensators_of", "edge_frame", "graph_conditions", "iterated_from_graph",
           "verify_edges"]
