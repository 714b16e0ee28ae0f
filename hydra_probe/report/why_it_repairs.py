"""The report's "Why it repairs" section: its analysis step, its figures and its text.

Three pieces, so the triangulation report can wire them where its own steps,
figures and sections live:

* :func:`mechanism_step` runs the analyses (``repair_mechanisms`` over the
  triangulated components, the per-layer ``layer_regression`` and
  ``neuron_contributions`` of the most compensating MLP) and returns
  ``({name: result}, notes)`` for ``TriangulationReport.results``;
* :func:`mechanism_figures` draws the section's figures from those results;
* :func:`why_it_repairs` is the section, ``(d, ctx) -> None`` like every
  section of the report's document: it reads ``ctx.results`` and
  ``ctx.figures`` and assembles; it computes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from ..errors import ArchitectureError

#: Result keys of the section in ``TriangulationReport.results``.
KEYS = ("repair_mechanisms", "layer_regression", "neuron_contributions")
#: Figure names of the section.
FIGURES = ("mechanism_bars", "top_neurons", "layer_regression")


def _f(x: Any, digits: int = 3) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(x):
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits}f}".rstrip("0").rstrip(".") or "0"


def _ci(m: Any, lo: Any, hi: Any) -> str:
    return f"{_f(m)} [{_f(lo)}, {_f(hi)}]"


def most_compensating_mlp(mech: Any, components: Sequence[str]) -> tuple[str, str] | None:
    """(component, MLP) with the largest mean ``mlp`` amount among ``components`` (positive first), or None."""
    f = mech.to_frame()
    f = f[(f["mechanism"] == "mlp") & f["component"].isin(list(components))]
    if f.empty:
        return None
    g = f.groupby(["component", "downstream"], sort=False)["amount"].mean()
    best = g.idxmax() if (g > 0).any() else g.abs().idxmax()
    return str(best[0]), str(best[1])


def skip_note(model: Any) -> str | None:
    """Why the section cannot run on ``model`` (the note the report prints), or None when it can: an nnsight model
    (also remote) whose attention forward has no attention call to read weights and values from (the refusal
    ``repair_mechanisms`` would make)."""
    if getattr(model, "backend", "local") != "nnsight":
        return None
    from ..models.nnsight_backend import mechanism_read
    from ..models.sites import Site

    try:
        mechanism_read(model, Site(model.n_layers - 1, "attn_last"))
    except ArchitectureError as e:
        return f"why it repairs: skipped; {e}"
    return None


def mechanism_step(model: Any, task: Any, *, components: Sequence[str], top: Sequence[str], value: Any = "mean",
                   scale: str = "frozen", metric: Any = "logit_diff", seed: int = 0, order: str = "pattern_first",
                   progress: bool | None = None, mech: Any = None) -> tuple[dict[str, Any], list[str]]:
    """The section's analyses: ``({"repair_mechanisms", "layer_regression"[, "neuron_contributions"]}, notes)``.

    ``components``: the triangulated components (names); ``top``: the top
    components, among which the most compensating MLP is chosen for the
    neuron split. ``mech``: a :class:`~hydra_probe.effects.RepairMechanisms` of these components with
    these arguments already computed (the report's self-repair step ran it), used instead of a new sweep.
    Skips (with a note) what the model cannot do.
    """
    from ..effects.mechanisms import layer_regression, repair_mechanisms
    from ..effects.neurons import neuron_contributions

    notes: list[str] = []
    out: dict[str, Any] = {}
    skip = skip_note(model)
    if skip:
        return out, [skip]
    names = [c for c in components if not c.startswith("ATTN")]
    if not names:  # repair_mechanisms splits heads and MLPs; a whole attention layer has no single pattern
        return out, ["why it repairs: skipped; no head or MLP among the ablated components (the mechanisms are "
                     "split per head and MLP: triangulate components='heads' or 'all' for this section)."]
    if mech is None:
        mech = repair_mechanisms(model, task, names, value=value, scale=scale, order=order, metric=metric,
                                 seed=seed, progress=progress)
    out["repair_mechanisms"] = mech
    out["layer_regression"] = layer_regression(mech, seed=seed)
    pick = most_compensating_mlp(mech, [c for c in top if c in set(names)])
    if pick is None:
        notes.append("neuron contributions: no MLP downstream of the top components.")
        return out, notes
    try:
        model.adapter.check_neuron_basis()  # the refusal neuron_contributions itself makes, read as a note
    except ArchitectureError as e:
        notes.append(f"neuron contributions: skipped; {e}")
        return out, notes
    out["neuron_contributions"] = neuron_contributions(model, task, pick[0], pick[1], value=value, scale=scale,
                                                       metric=metric, seed=seed, progress=progress)
    return out, notes


def mechanism_figures(results: dict[str, Any], top: Sequence[str], caption: str = "") -> dict[str, Any]:
    """The section's figures ({name: Figure}) from its results; missing results draw nothing."""
    from . import mechanism_figures as MF

    figs: dict[str, Any] = {}
    if "repair_mechanisms" in results:
        s = results["repair_mechanisms"].summary()
        comps = [c for c in top if c in set(s["component"])]
        if comps:
            figs["mechanism_bars"] = MF.mechanism_bars(s, comps, caption=caption)
    if "neuron_contributions" in results:
        n = results["neuron_contributions"]
        figs["top_neurons"] = MF.top_neurons(n.summary(top=12), mlp=n.provenance["mlp"],
                                             component=n.provenance["component"], caption=caption)
    if "layer_regression" in results:
        r = results["layer_regression"]
        figs["layer_regression"] = MF.layer_regression_figure(r.points(), r.to_frame(), r.shares(), caption=caption)
    return figs


def why_it_repairs(d: Any, ctx: Any) -> None:
    """Why it repairs: each top component's self-repair by mechanism, the top neurons of the most compensating
    MLP, and the per-layer Hydra regression (reads ``ctx.results`` and ``ctx.figures``)."""
    r, figures = ctx.results, ctx.figures
    d.h(2, "Why it repairs: mechanisms of self-repair")
    if "repair_mechanisms" not in r:
        d.p("Not run (see the notes).")
        return
    mech = r["repair_mechanisms"]
    prov = mech.provenance
    order = prov.get("order", "pattern_first")
    d.p("Each downstream head's compensation splits exactly into *pattern* (its attention, from the read position, "
        "moved to other tokens while their values stayed clean) and *values* (the tokens it reads now carry "
        "different values, at its new pattern); MLPs are one *mlp* part (split over neurons below) and the "
        "final-norm scale change is *norm*" + (", block norms' *block_norm*, the logit cap's *softcap*"
                                                 if {"block_norm", "softcap"} & set(mech.to_frame()["mechanism"])
                                                 else "")
        + f". Per prompt the parts sum to the self-repair exactly. Split order: `{order}`"
        + (" (pattern first, at clean values)." if order == "pattern_first" else
           " (values first, at the clean pattern)." if order == "values_first" else
           " (the mean of both orders).")
        + " A large *pattern* share means backup heads re-route attention (e.g. towards the name a removed head "
          "was copying); *values* means the heads attend where they did but read changed tokens; *norm* means "
          "no component reacts, the residual just shrank and the final norm rescaled everything.")
    s = mech.summary()
    top = [c for c in ctx.top if c in set(s["component"])]
    if top:
        rows = []
        for c in top:
            g = s[s["component"] == c].set_index("mechanism")
            row: dict[str, Any] = {"component": c, "self-repair": _f(g["self_repair"].iloc[0])}
            for mm in g.index:
                row[f"{mm} [95% CI]"] = _ci(g.loc[mm, "amount"], g.loc[mm, "amount_lo"], g.loc[mm, "amount_hi"])
            rows.append(row)
        d.table(pd.DataFrame(rows).fillna("–"), f"Self-repair of the top components by mechanism (mean per prompt, "
                                                 f"metric units; value {prov.get('value')}, scale "
                                                 f"{prov.get('scale')}).")
    if "mechanism_bars" in figures:
        d.fig("mechanism_bars", "Self-repair of the top components stacked by mechanism, each part with its 95% "
                                "interval; black bar: the self-repair.")
    if "neuron_contributions" in r:
        n = r["neuron_contributions"]
        p = n.provenance
        ns = n.summary(top=8)
        total = float(n.mlp_row()["delta_de"].mean())
        d.p(f"{p['mlp']} compensates most for {p['component']} (mean ΔDE {_f(total)}). Its {p.get('d_mlp')} "
            "neurons split that exactly (out = Σ_n a_n W_out[n] + b: each neuron's activation change times its "
            "write onto the metric direction). Positive neurons compensate (e.g. they stopped erasing the answer: "
            "anti-erasure); negative ones amplify the loss.")
        d.table(pd.DataFrame({"neuron": ns["neuron"], "ΔDE [95% CI]": [
            _ci(a, lo, hi) for a, lo, hi in zip(ns["delta_de"], ns["delta_de_lo"], ns["delta_de_hi"])],
            "role": ns["role"], "share of the MLP": [_f(x, 2) for x in ns["share"]]}),
            f"Top neurons of {p['mlp']} when {p['component']} is ablated.")
        if "top_neurons" in figures:
            d.fig("top_neurons", f"Top neurons of {p['mlp']} (ΔDE when {p['component']} is ablated, 95% intervals).")
    if "layer_regression" in r:
        reg = r["layer_regression"]
        f = reg.to_frame()
        d.p("Per layer, compensation (the self-repair: downstream ΔDE plus the norm rows) regressed on the direct "
            "effect lost across that layer's ablated components (OLS, statsmodels): a slope near 1 means the layer's "
            "components are compensated about as much as they lose; near 0, ablations of that layer show their "
            "full direct effect. Shares: each mechanism's part of the layer's self-repair (95% bootstrap over "
            "prompts).")
        sh = reg.shares()
        tab = {"layer": f["layer"], "components": f["n_components"],
               "slope [95% CI]": [_ci(a, lo, hi) for a, lo, hi in zip(f["slope"], f["slope_lo"], f["slope_hi"])],
               "R²": [_f(x, 2) for x in f["r2"]]}
        for mm in dict.fromkeys(sh["mechanism"]):
            x = sh[sh["mechanism"] == mm].set_index("layer").reindex(f["layer"])
            tab[f"{mm} share"] = [_ci(a, lo, hi) for a, lo, hi in zip(x["share"], x["share_lo"], x["share_hi"])]
        d.table(pd.DataFrame(tab), "Per-layer Hydra regression and mechanism shares.")
        if "layer_regression" in figures:
            d.fig("layer_regression", "Left: compensation vs DE lost per component with each layer's fit; right: "
                                      "each mechanism's share of the layer's self-repair.")


__all__ = ["FIGURES", "KEYS", "mechanism_figures", "mechanism_step", "most_compensating_mlp", "why_it_repairs"]
