"""The compensation graph: who restores what an ablated component no longer writes.

From a :class:`~hydra_probe.effects.SelfRepair` result, an edge ``c -> d``
carries the mean change of ``d``'s direct effect when ``c`` is ablated
(``delta_de``, DESIGN.md section 2), so the edges out of ``c`` plus its edge
to ``NORM`` sum to ``c``'s self-repair on every prompt (before thresholding).
Positive edges are compensation, negative ones amplification (kept and
marked). Nothing here runs a model: the graph is a view of measured numbers.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import networkx as nx
import numpy as np

from ..errors import InputError, OptionError

NORM = "NORM"
_HEAD = re.compile(r"^L(\d+)H(\d+)$")
_LAYERED = re.compile(r"^(ATTN|MLP|RESID)(\d+)$")

# Node statistics copied from SelfRepair.summary(): graph attribute name -> summary column.
_NODE_STATS = {
    "de": "clean_de", "te": "total_effect", "de_lost": "de_lost", "sr": "self_repair", "norm_term": "norm_term",
}


def scalar(x: Any) -> Any:
    """A plain str/int/float/bool for graph attributes, or None when undefined (NaN/None).

    Exporters need one plain type per attribute; None values are omitted from
    the graph rather than stored (GraphML and GEXF have no null).
    """
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return None if math.isnan(f) else f
    if isinstance(x, str):
        return x
    return json.dumps(x, default=str)


def _set(attrs: dict[str, Any], key: str, value: Any) -> None:
    v = scalar(value)
    if v is not None:
        attrs[key] = v


def component_attrs(name: str, n_layers: int | None = None) -> dict[str, Any]:
    """``kind``, ``layer`` and (for heads) ``head`` parsed from a canonical name.

    Kinds: ``head``, ``attn``, ``mlp``, ``resid``, ``group`` (a joint ablation
    ``A+B``; its layer is the lowest member's) and ``norm`` (``NORM``, placed
    at layer ``n_layers``).
    """
    if name == NORM or name == "SOFTCAP":
        return {"kind": "norm", "layer": int(n_layers if n_layers is not None else 0)}
    if name.startswith("POSTNORM") and name[8:].isdigit():  # a block's post-attention norm (Gemma-2/3, OLMo-2)
        return {"kind": "norm", "layer": int(name[8:])}
    m = _HEAD.match(name)
    if m:
        return {"kind": "head", "layer": int(m.group(1)), "head": int(m.group(2))}
    m = _LAYERED.match(name)
    if m:
        return {"kind": m.group(1).lower(), "layer": int(m.group(2))}
    if "+" in name:
        parts = [component_attrs(p) for p in name.split("+")]
        return {"kind": "group", "layer": min(p["layer"] for p in parts), "members": name}
    raise InputError(f"cannot read a component name from {name!r}; expected L{{l}}H{{h}}, ATTN{{l}}, MLP{{l}}, "
                     "a joint name 'A+B', or NORM.")


def flat_provenance(prov: dict[str, Any]) -> dict[str, Any]:
    """Provenance as plain scalars (lists and dicts JSON-encoded, None dropped)."""
    out: dict[str, Any] = {}
    for k, v in prov.items():
        if isinstance(v, (list, tuple, dict)):
            out[str(k)] = json.dumps(v)
        else:
            _set(out, str(k), v)
    return out


def compensation_graph(result: Any, *, threshold: float = 0.0, top_k: int | None = None, level: float = 0.95,
                       relative: bool = False) -> nx.DiGraph:
    """The compensation graph of a :class:`~hydra_probe.effects.SelfRepair` result.

    Nodes: every ablated component (or joint group), every downstream head or
    MLP with a kept edge, and ``"NORM"`` (the final-norm scale term; always
    present). Node attributes (plain scalars; undefined values are omitted):
    ``kind``, ``layer``, ``head`` (heads only), ``ablated``; for ablated
    components the per-prompt means and ``level`` t intervals of the clean
    direct effect ``de``, total effect ``te``, direct effect lost
    ``de_lost``, self-repair ``sr`` and ``norm_term`` (each with ``_lo`` /
    ``_hi``), ``fraction_repaired`` (= sr / de_lost), ``p_self_repair``,
    ``q_self_repair``, ``significant`` and ``n``.

    Edge ``c -> d`` attributes: ``weight`` (mean delta_de of d when c is
    ablated), ``weight_lo`` / ``weight_hi`` (t interval), ``fraction``
    (= weight / mean de_lost of c; omitted when de_lost is 0), ``p`` (two-sided
    one-sample t test of mean delta_de != 0), ``q`` (Benjamini-Hochberg over
    every tested (component, downstream) pair of the result, before
    thresholding, so pruning does not shrink the correction), ``n``,
    ``sign`` (``"compensation"`` if weight > 0, else ``"amplification"``) and
    ``verified`` (``"untested"``; see :func:`~hydra_probe.graph.verify_edges`).

    Args:
        result: a ``SelfRepair`` (from ``hp.self_repair``).
        threshold: keep edges with ``|weight| > threshold`` (with
            ``relative=True``: ``|fraction| > threshold``; edges without a
            fraction are dropped then).
        top_k: keep at most this many strongest kept edges per source
            (by ``|weight|``, or ``|fraction|`` when relative).
        level: confidence level of every interval.
        relative: threshold and rank on ``fraction`` instead of ``weight``.

    Graph attributes: the result's provenance flattened to scalars (model,
    task, corruption, value, metric, scale, n, seed, ...), plus ``interval``
    (the method), ``level``, ``threshold``, ``relative``, ``top_k`` and
    ``n_layers`` (as far as the names reveal it).
    """
    from ..stats import bh, grouped_t

    if not hasattr(result, "contributions") or not hasattr(result, "summary"):
        raise InputError(f"compensation_graph needs a SelfRepair result (hp.self_repair(...)); "
                         f"got {type(result).__name__}.")
    if not 0 < level < 1:
        raise OptionError(f"level must be in (0, 1), e.g. 0.95; got {level!r}.")
    if threshold < 0 or not math.isfinite(threshold):
        raise OptionError(f"threshold must be a finite number >= 0; got {threshold!r}.")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise OptionError(f"top_k must be a positive integer or None; got {top_k!r}.")

    summ = result.summary(level=level)
    contrib = result.contributions()
    edges = grouped_t(contrib, ["component", "downstream"], "delta_de", level)
    _, q = bh(edges["p"].to_numpy())
    edges["q"] = q
    de_lost = dict(zip(summ["component"], summ["de_lost"]))
    with np.errstate(divide="ignore", invalid="ignore"):
        dl = edges["component"].map(de_lost).to_numpy(dtype=float)
        edges["fraction"] = np.where(np.abs(dl) > 1e-12, edges["mean"].to_numpy() / dl, np.nan)

    names = list(summ["component"]) + list(edges["downstream"].unique())
    layers = [component_attrs(n)["layer"] for n in names if n != NORM]
    n_layers = max(layers) + 1 if layers else 0

    G = nx.DiGraph()
    G.graph.update(flat_provenance(result.provenance))
    G.graph.update({
        "kind": "compensation_graph",
        "interval": (f"{level:.0%} Student-t interval of the mean across prompts; p: two-sided one-sample t test "
                     "of mean delta_de != 0; q: Benjamini-Hochberg over all tested (component, downstream) pairs"),
        "level": float(level), "threshold": float(threshold), "relative": bool(relative), "n_layers": int(n_layers),
    })
    if top_k is not None:
        G.graph["top_k"] = int(top_k)

    for _, row in summ.iterrows():
        a = component_attrs(row["component"])
        a["ablated"] = True
        for key, col in _NODE_STATS.items():
            _set(a, key, row[col])
            _set(a, f"{key}_lo", row[f"{col}_lo"])
            _set(a, f"{key}_hi", row[f"{col}_hi"])
        for col in ("fraction_repaired", "p_self_repair", "q_self_repair", "significant", "lower_bound", "n"):
            if col in row:
                _set(a, col, row[col])
        G.add_node(row["component"], **a)
    if NORM not in G:
        G.add_node(NORM, **component_attrs(NORM, n_layers), ablated=False)

    score = edges["fraction"] if relative else edges["mean"]
    keep = score.abs() > threshold  # NaN fractions compare False: dropped
    kept = edges[keep.to_numpy()].assign(_s=score[keep].abs())
    if top_k is not None:
        kept = kept.sort_values("_s", ascending=False, kind="stable").groupby("component", sort=False).head(top_k)
    kept = kept.sort_index()
    for _, e in kept.iterrows():
        c, d = e["component"], e["downstream"]
        if d not in G:
            G.add_node(d, **component_attrs(d, n_layers), ablated=False)
        attrs: dict[str, Any] = {}
        for key, col in (("weight", "mean"), ("weight_lo", "lo"), ("weight_hi", "hi"), ("fraction", "fraction"),
                         ("p", "p"), ("q", "q"), ("n", "n")):
            _set(attrs, key, e[col])
        attrs["sign"] = "compensation" if e["mean"] > 0 else "amplification"
        attrs["verified"] = "untested"
        G.add_edge(c, d, **attrs)
    return G


def edge_frame(G: nx.DiGraph):
    """The graph's edges as a DataFrame (``source``, ``target`` and every edge attribute)."""
    import pandas as pd

    return pd.DataFrame([{"source": u, "target": v, **d} for u, v, d in G.edges(data=True)])


def node_frame(G: nx.DiGraph):
    """The graph's nodes as a DataFrame (``node`` and every node attribute)."""
    import pandas as pd

    return pd.DataFrame([{"node": n, **d} for n, d in G.nodes(data=True)])


def hydra_slope(result: Any, *, level: float = 0.95) -> dict[str, float]:
    """Hydra slope of a ``SelfRepair`` result: OLS of per-component mean total effect on mean DE lost.

    Returns ``slope``, ``slope_lo``, ``slope_hi`` (``level`` interval),
    ``intercept``, ``r2`` and ``n`` (components), via
    :func:`hydra_probe.stats.hydra_slope`. Interpretation: a slope of 1 means
    ablating a component costs the metric what it wrote directly; a slope
    below 1 means downstream compensation hides that share of each
    component's role from single ablations (0.6: single ablations show about
    60 % of it), so total effects are lower bounds on roles.
    """
    from ..stats import hydra_slope as _slope

    if not hasattr(result, "to_frame"):
        raise InputError(f"hydra_slope needs a SelfRepair result; got {type(result).__name__}.")
    f = result.to_frame()
    for col in ("component", "total_effect", "de_lost"):
        if col not in f.columns:
            raise InputError(f"hydra_slope needs a SelfRepair result (column {col!r} is missing).")
    means = f.groupby("component", sort=False)[["total_effect", "de_lost"]].mean()
    out = _slope(means["total_effect"].to_numpy(), means["de_lost"].to_numpy(), level)
    out["level"] = float(level)
    return out


# ---------------------------------------------------------------- mechanisms on the edges
def add_mechanisms(G: nx.DiGraph, mechanisms: Any, *, level: float = 0.95) -> nx.DiGraph:
    """A copy of compensation graph ``G`` whose edges carry their mechanism split.

    ``mechanisms`` is a :class:`~hydra_probe.effects.RepairMechanisms` of the
    same model, task, ablation value and metric. Each edge ``c -> d`` gains,
    for every mechanism with rows for (c, d), its mean amount and ``level``
    t interval across prompts: ``pattern``, ``values`` (heads; they sum to
    the edge's weight under the frozen scale), ``mlp`` (MLPs), ``norm`` (the
    NORM edge, or d's rescaling under the recomputed scale), each with
    ``_lo`` / ``_hi``. Graph attribute ``mechanism_order``: the split order.
    """
    import pandas as pd

    from ..stats import grouped_t

    if not hasattr(mechanisms, "by_downstream") or not hasattr(mechanisms, "self_repair_frame"):
        raise InputError(f"add_mechanisms needs a RepairMechanisms result (hp.repair_mechanisms(...)); "
                         f"got {type(mechanisms).__name__}.")
    prov = mechanisms.provenance
    for key in ("model", "task", "value", "metric", "n"):
        if key in G.graph and key in prov and G.graph[key] != scalar(prov[key]):
            raise InputError(f"the graph and the mechanisms differ in {key} ({G.graph[key]!r} vs {prov[key]!r}); "
                             "compute both from the same model, task, value and metric.")
    f = mechanisms.to_frame()
    # only the rows of (component, downstream) pairs that are edges of G
    cc, cu = pd.factorize(f["component"])
    dc, du = pd.factorize(f["downstream"])
    ci, di = {str(c): i for i, c in enumerate(cu)}, {str(d): i for i, d in enumerate(du)}
    want = np.array([ci[str(c)] * len(du) + di[str(d)] for c, d in G.edges if str(c) in ci and str(d) in di],
                    dtype=np.int64)
    rows = np.isin(cc.astype(np.int64) * len(du) + dc, want)
    stats = grouped_t(f[rows], ["component", "downstream", "mechanism"], "amount", level)
    H = G.copy()
    H.graph["mechanism_order"] = prov.get("order")
    for c, d, mech, mean, lo, hi in zip(stats["component"], stats["downstream"], stats["mechanism"], stats["mean"],
                                        stats["lo"], stats["hi"]):
        if not H.has_edge(c, d):
            continue
        attrs = H.edges[c, d]
        _set(attrs, mech, mean)
        _set(attrs, f"{mech}_lo", lo)
        _set(attrs, f"{mech}_hi", hi)
    return H
