"""The report's document: one function per section, in :data:`SECTIONS` order.

Each section is ``section(d: Doc, ctx: Context) -> None``: it appends its
heading, prose, tables and figures to ``d``, reading the report through
``ctx`` (the report, its figures and what every section shares: provenance,
config, baseline, the per-component table, the top components). Adding a
section is one function here and one entry in :data:`SECTIONS`. Assembly
only: numbers come from the report's results, table and summaries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..claims import SCALE_RULE
from ..formatting import ci, fmt, pct
from ..results import _jsonable
from .blocks import Doc
from .conditions_section import conditions_section
from .prose import (
    VALUE_TEXT,
    claim_conditions,
    component_sentence,
    findings,
    hydra_reading,
    rerun_command,
    verdict_rule_text,
)
from .why_it_repairs import why_it_repairs

FILES = {
    "report.md": "this report (Markdown; figures linked from figures/)",
    "report.html": "this report, self-contained (figures embedded; opens offline)",
    "results.json": "every number with its provenance: per-prompt result frames, derived tables, config, version",
    "tables/": "one CSV per analysis (per-prompt frames and summaries)",
    "graph/": "the compensation graph as GraphML, GEXF and node-link JSON",
    "figures/": "every figure as PNG and SVG",
}


@dataclass
class Context:
    """What the sections read: the report, its figures ({name: png path}) and shared views of it."""

    rep: Any
    figures: Mapping[str, Path]
    max_rows: int
    prov: dict[str, Any]
    config: dict[str, Any]
    baseline: dict[str, float]
    table: pd.DataFrame
    results: dict[str, Any]
    top: list[str]

    @classmethod
    def of(cls, rep: Any, figures: Mapping[str, Path], max_rows: int = 40) -> Context:
        """The context of ``rep`` (its table and top components computed once)."""
        return cls(rep=rep, figures=figures, max_rows=max_rows, prov=rep.provenance, config=rep.config,
                   baseline=rep.baseline, table=rep.to_frame(), results=rep.results, top=rep.top_components())

    @property
    def metric(self) -> Any:
        return self.prov.get("metric")

    @property
    def value(self) -> Any:
        return self.prov.get("value")

    @property
    def corruption(self) -> Any:
        return self.prov.get("corruption")


# ============================================================================ sections
def title(d: Doc, ctx: Context) -> None:
    """The title and the conditions every claim is made under."""
    prov = ctx.prov
    d.h(1, f"Triangulation report: {prov.get('model')} on {prov.get('task')}")
    d.p(f"hydra_probe {prov.get('version')}. Every claim below is made under the conditions stated with it: "
        + claim_conditions(prov) + ". Necessity-style evidence (ablation) and restoration-style evidence (activation, "
        "path and attribution patching) are set side by side for each component.")


def key_findings(d: Doc, ctx: Context) -> None:
    """Key findings (:func:`.prose.findings`)."""
    rep = ctx.rep
    d.h(2, "Key findings")
    d.items(findings(rep))


def task_and_baseline(d: Doc, ctx: Context) -> None:
    """Model, task, corruption, metric, ablation value, scale; the clean and corrupted baseline."""
    prov, cfg, b, t, rep = ctx.prov, ctx.config, ctx.baseline, ctx.table, ctx.rep
    metric, val = ctx.metric, ctx.value
    d.h(2, "Task and baseline")
    ti, mi = rep.task_info, rep.model_info
    rows = [("model", f"{mi.get('name')} ({mi.get('family')}, {mi.get('n_layers')} layers x {mi.get('n_heads')} heads, "
                      f"d_model {mi.get('d_model')})"),
            ("task", f"{ti.get('name')}, {ti.get('n')} prompt pairs, task seed {ti.get('seed')}"),
            ("corruption", f"{ti.get('corruption')}" + (f": {ti['corruption_description']}"
                                                        if ti.get("corruption_description") else "")),
            ("metric", f"{metric} at the last position"),
            ("ablation value", VALUE_TEXT.get(str(val), str(val))),
            ("final-norm scale", f"{prov.get('scale')} (direct effects at the clean run's norm scale)"
             if prov.get("scale") == "frozen" else f"{prov.get('scale')} (each run's own norm scale)"),
            ("components", f"{cfg['components']} ({len(t)} components)"),
            ("seed", str(cfg["seed"])),
            ("clean metric (mean)", fmt(b["clean_metric"])),
            ("corrupted metric (mean)", fmt(b["corrupted_metric"])),
            ("gap (clean - corrupted)", fmt(b["gap"])),
            ("verdict scale (TE, DE lost)", f"{fmt(b['verdict_scale'])} = {SCALE_RULE}")]
    if metric == "logit_diff":
        rows += [("clean accuracy (answer above alternative)", pct(b["clean_accuracy"])),
                 ("corrupted accuracy", pct(b["corrupted_accuracy"]))]
    d.table(pd.DataFrame(rows, columns=["", "value"]))
    if rep.task_pairs:
        ex = rep.task_pairs[0]
        d.p(f"Example pair: clean `{ex['clean']}` / corrupted `{ex['corrupted']}`; answer `{ex['answer']}`, "
            f"alternative `{ex['alternative']}`.")


def triangulation_table(d: Doc, ctx: Context) -> None:
    """The verdict rule, the per-component table and one claim per top component."""
    prov, cfg, t, top, rep, figures, max_rows = (ctx.prov, ctx.config, ctx.table, ctx.top, ctx.rep, ctx.figures,
                                                 ctx.max_rows)
    metric, val, corr = ctx.metric, ctx.value, ctx.corruption
    d.h(2, "Triangulation table")
    d.p("One row per component, most important first (importance = the largest of |TE|/scale, |DE lost|/scale, "
        "restoration, damage; scale: see the rule below). Metric units unless marked %; intervals are 95% Student-t intervals of the mean "
        f"across prompts. **TE** = `{metric}`(clean) - `{metric}`(clean, component {val}-ablated); **DE** = direct "
        "effect on the clean run; **SR** = self-repair = DE lost - TE, positive when downstream components restore "
        "what the ablation removed; **lower bound** = SR > 0 beyond its interval, so TE understates the role; "
        f"**restoration** = denoising score (clean activation into the `{corr}`-corrupted run); **damage** = "
        "noising score (corrupted activation into the clean run); both as a share of the gap. **attribution** = "
        "first-order estimate of restoration (never used in the verdict); **backups** = the compensators behind a "
        "masked verdict, with the ablation that confirmed them. SR/DE lost is left blank where DE lost is under 1% "
        "of the scale.")
    d.pre(verdict_rule_text(rep))
    if cfg.get("exact") == "auto":
        d.p("**Exact sweeps where attribution cannot rule a component out** (`exact='auto'`, the default): "
            f"{cfg['exact_bound']} The `exact` column says which measurements were made: *yes* (all), "
            "*estimated* (none: no ablation or patching measurement, blank cells) or the ones made (the others' "
            "cells are blank); the attribution column is the AtP* estimate. `exact='all'` (`--exact all`) sweeps "
            "every component.")
    show = t.head(max_rows)
    tab = pd.DataFrame({
        "component": show["component"],
        "DE": [fmt(x) for x in show["direct_effect"]],
        "TE [95% CI]": [ci(a, lo, hi) for a, lo, hi in zip(show["total_effect"], show["total_effect_lo"],
                                                            show["total_effect_hi"])],
        "DE lost": [fmt(x) for x in show["de_lost"]],
        "SR [95% CI]": [ci(a, lo, hi) for a, lo, hi in zip(show["self_repair"], show["self_repair_lo"],
                                                            show["self_repair_hi"])],
        "SR/DE lost": [pct(x) if abs(dn) >= 0.01 else "" for x, dn in zip(show["fraction_repaired"],
                                                                            show["del_norm"])],
        "lower bound": ["yes" if x is True or x == 1 else "" for x in show["lower_bound"]],  # NaN: not ablated
        "compensators": show["compensators"],
        "backups": show["backups"],
        "restoration": [pct(x) for x in show["restoration"]],
        "damage": [pct(x) for x in show["damage"]],
        "attribution": [pct(x) for x in show["attribution"]],
        "verdict": show["verdict"],
    })
    if cfg.get("exact") == "auto":
        tab["exact"] = ["yes" if x else (m or "estimated") for x, m in zip(show["exact"], show["measured"])]
    d.table(tab, f"Conditions: {claim_conditions(prov)}."
            + (f" Top {max_rows} of {len(t)} rows; all in tables/triangulation.csv." if len(t) > max_rows else ""))
    d.h(3, "Claims for the top components")
    backed = t[t["backed_up"].astype(bool) & ~t["component"].isin(top)]
    if len(backed):
        d.p(f"The top {len(top)} components by importance, then the {len(backed)} other components whose backups "
            "paired or iterated ablation confirmed.")
    d.items([component_sentence(row, prov, rep) for _, row in pd.concat([t.head(len(top)), backed]).iterrows()])
    if "evidence_map" in figures:
        d.fig("evidence_map", "Necessity (TE / scale) against restoration (denoising score), coloured by verdict; "
                              f"dotted lines at the threshold {cfg['threshold']}."
              + (" Components without both measurements (exact='auto' ruled one out) are not drawn; the legend "
                 "counts every component." if cfg.get("exact") == "auto" else ""))


def patch_vs_ablate(d: Doc, ctx: Context) -> None:
    """Patch clean A vs ablate A, for the top components."""
    prov, val, corr, figures = ctx.prov, ctx.value, ctx.corruption, ctx.figures
    d.h(2, "Patch clean A vs ablate A")
    d.p(f"For each top component A: the metric on the clean run, the `{corr}`-corrupted run, the corrupted run with "
        f"A's clean activation patched in (clean-patched: does A alone restore the behaviour?), and the clean run "
        f"with A {val}-ablated (ablated: is A needed?). Bars: mean with 95% interval; dots: prompts."
        + (" A run that `exact='auto'` ruled out for a component (its AtP* estimate below half the threshold) has no "
           "bar." if ctx.config.get("exact") == "auto" else ""))
    if "patch_vs_ablate" in figures:
        d.fig("patch_vs_ablate", f"Patch clean A vs ablate A ({claim_conditions(prov)}).")


def hydra_effect(d: Doc, ctx: Context) -> None:
    """The Hydra slope: total effect against DE lost across components."""
    val, rep, figures = ctx.value, ctx.rep, ctx.figures
    d.h(2, "Hydra effect: total effect against direct effect lost")
    h = rep.hydra
    if h and not math.isnan(h.get("slope", float("nan"))):
        swept = " swept" if ctx.config.get("exact") == "auto" else ""  # exact="auto": estimated rows were not ablated
        d.p(f"Regressing the single-ablation total effect on the direct effect lost across the {h['n']}{swept} components "
            f"(OLS, statsmodels) gives a slope of {ci(h['slope'], h['slope_lo'], h['slope_hi'])}, intercept "
            f"{fmt(h['intercept'])}, R² {fmt(h['r2'])}. A slope of 1 means an ablation costs the metric what the "
            "component wrote directly; below 1, downstream compensation hides that share of each component's role "
            "from single ablations; above 1, components act mostly through downstream components (indirect "
            "effects), which the slope does not separate from self-repair. Here: " + hydra_reading(h, val)
            + " Points below the identity line (blue where self-repair is significant) are components whose TE "
            "is a lower bound on what they write."
            + (" Only the swept components enter the fit (exact='auto'): they were selected by size, so the slope "
               "can differ from the exhaustive run's (`--exact all`)." if swept else ""))
    else:
        d.p("The Hydra slope is undefined here (fewer than three components or no variation in DE lost).")
    if "te_vs_de_lost" in figures:
        d.fig("te_vs_de_lost", "Total effect vs direct effect lost per component, with the identity line and the "
                               "Hydra fit.")


def layer_head_maps(d: Doc, ctx: Context) -> None:
    """Every measure on the layer x head layout."""
    prov, figures = ctx.prov, ctx.figures
    d.h(2, "Layer x head maps")
    d.p("Each measure on the model's layout (rows: layers; columns: heads, and ATTN/MLP where analysed). Each panel "
        "has its own symmetric colour scale: direct effect, total effect and self-repair in metric units; restoration, "
        "damage and attribution as shares of the clean-corrupted gap.")
    if "heatmaps" in figures:
        d.fig("heatmaps", f"Per-component measures ({claim_conditions(prov)}).")


def compensation_graph(d: Doc, ctx: Context) -> None:
    """Who compensated: the self-repair decomposition and the compensation graph."""
    prov, cfg, val, rep, figures = ctx.prov, ctx.config, ctx.value, ctx.rep, ctx.figures
    d.h(2, "Who compensated: the compensation graph")
    d.p("Self-repair decomposes exactly: SR = Σ over downstream heads and MLPs of the change of their direct effect "
        "(ΔDE) + the final-norm scale term (NORM). An edge c → d carries the mean ΔDE of d when c is ablated "
        f"({val} ablation, scale {prov.get('scale')}); positive edges are compensation, negative ones amplification.")
    if "compensation_bars" in figures:
        d.fig("compensation_bars", "Self-repair of the top components split over who supplied it (largest four named, "
                                   "the rest as 'other'); markers: DE lost (black) and TE (orange).")
    if rep.graph is not None:
        G = rep.graph
        d.p(f"The graph keeps edges with |ΔDE| > {fmt(cfg.get('graph_threshold'))} (0.5% of |gap| by default), at "
            f"most {cfg.get('graph_top_k')} per ablated component: {G.number_of_nodes()} nodes, "
            f"{G.number_of_edges()} edges. Exports: graph/compensation_graph.graphml, .gexf, .json.")
        if "compensation_graph" in figures:
            d.fig("compensation_graph", "Compensation graph: nodes on the layer x head layout (colour: clean direct "
                                        "effect), edges by |ΔDE| (blue compensation, orange amplification; solid: "
                                        "confirmed by paired ablation, dashed: refuted, faint: untested).")


def paired_confirmations(d: Doc, ctx: Context) -> None:
    """The strongest compensation edges, tested by paired ablation."""
    prov, val, rep = ctx.prov, ctx.value, ctx.rep
    d.h(3, "Paired-ablation confirmations")
    if len(rep.edges_tested):
        e = rep.edges_tested
        d.p(f"The strongest compensation edges c → d, tested by ablating c and d together ({val} ablation): the "
            "interaction I = TE(c,d) - TE(c) - TE(d) is positive when d was compensating for c. An edge is confirmed "
            "when ΔDE > 0 and the interaction's 95% interval lies above 0. The interaction splits exactly into "
            "d's rise when c is ablated (the edge itself), c's reaction to d (reverse), the non-additive reactions "
            "of all other components (others) and of the final norm's scale (norm).")
        table = {"edge": [f"{a} → {b_}" for a, b_ in zip(e["source"], e["target"])],
                 "ΔDE (weight)": [fmt(x) for x in e["weight"]],
                 "interaction [95% CI]": [ci(a, lo, hi) for a, lo, hi in
                                          zip(e["interaction"], e["interaction_lo"], e["interaction_hi"])],
                 "p (I > 0)": [fmt(x) for x in e["interaction_p"]]}
        for part in ("edge", "reverse", "others", "norm"):
            table[f"I: {part}"] = [fmt(x) for x in e[f"interaction_{part}"]]
        table["verdict"] = e["verified"]
        d.table(pd.DataFrame(table), f"Conditions: {claim_conditions(prov)}.")
    else:
        d.p("No compensation edge was tested (see the notes).")


def iterated_ablation(d: Doc, ctx: Context) -> None:
    """The iterated ablation of the most self-repaired component."""
    r, figures = ctx.results, ctx.figures
    d.h(3, "Iterated ablation")
    if "iterated_ablation" in r:
        s = r["iterated_ablation"].summary()
        d.p(f"The most self-repaired component, {s['ablated'].iloc[0]}, ablated alone and then together with its "
            "compensators one by one. The cost of removing it once the compensators are gone, TE(target + "
            "compensators) - TE(compensators), climbs towards its direct effect lost "
            f"({fmt(s['target_de_lost'].iloc[0])}) when they were covering for it; the TE of everything ablated "
            "also counts the compensators' own direct effects.")
        table = {"step": s["step"], "ablated": s["ablated"],
                 "TE [95% CI]": [ci(a, lo, hi) for a, lo, hi in
                                 zip(s["total_effect"], s["total_effect_lo"], s["total_effect_hi"])]}
        table["cost of removing the target [95% CI]"] = [
            ci(a, lo, hi) for a, lo, hi in zip(s["target_marginal"], s["target_marginal_lo"], s["target_marginal_hi"])]
        table["cost / target DE lost"] = [pct(x) for x in s["marginal_recovered"]]
        d.table(pd.DataFrame(table), f"Conditions: {claim_conditions(r['iterated_ablation'].provenance)}.")
        if "iterated_ablation" in figures:
            d.fig("iterated_ablation", "Iterated ablation: the cost of removing the target as its compensators are "
                                       "ablated with it, against its direct effect lost.")
    else:
        d.p("Not run (see the notes).")


def path_patching(d: Doc, ctx: Context) -> None:
    """Path patching of the top components: direct and indirect paths."""
    r, corr = ctx.results, ctx.corruption
    d.h(2, "Path patching: direct and indirect paths")
    ps = r["path_patch"].summary()
    nz = r["patch_noise"].summary().set_index("component")["score"]
    pp = ps.pivot_table(index="sender", columns="receiver", values="score", aggfunc="first", sort=False)
    d.p(f"Noising (the corrupted activation of each top component, `{corr}` corruption) sent along one set of "
        "paths only, everything else at its clean value. `logits`: the direct path to the unembedding alone; "
        "`all`: every downstream head (queries, keys, values) and MLP, i.e. the indirect paths. Compare with "
        "activation-patching damage (all paths at once).")
    d.table(pd.DataFrame({"component": pp.index,
                          "damage via direct path": [pct(x) for x in pp["logits"]],
                          "damage via downstream components": [pct(x) for x in pp["all"]],
                          "activation-patching damage": [pct(nz.get(c)) for c in pp.index]}),
            f"Conditions: {claim_conditions(r['path_patch'].provenance)}.")


def attribution(d: Doc, ctx: Context) -> None:
    """Attribution patching against exact patching."""
    rep, figures = ctx.rep, ctx.figures
    d.h(2, "Attribution patching vs exact patching")
    if ctx.config.get("exact") == "auto":
        d.p("AtP* (attribution patching with the QK fix and GradDrop) estimates every component's denoising and "
            "noising effects and the total effect of its ablation (`attribution_ablate`; estimates, never "
            "measurements); the report swept exactly only the components those estimates and the direct effects "
            "could not rule out (see the triangulation table). Agreement with exact activation patching, over the "
            "swept components:")
    else:
        d.p("Attribution patching estimates every component's denoising effect from two forwards and one backward "
            "(a first-order estimate, never a measurement). Agreement with exact activation patching:")
    ag = rep.agreement
    d.p(f"Pearson r = {fmt(ag['pearson'])}, Spearman ρ = {fmt(ag['spearman'])} over {ag['n_components']} "
        "components, comparing mean estimates with mean exact effects (metric units)." + f" Method: {ag['method']}.")
    if len(ag["disagreements"]):
        d.table(ag["disagreements"], "The largest disagreements (estimate - exact, metric units).")
    if "attribution_vs_exact" in figures:
        d.fig("attribution_vs_exact", "Attribution estimate (share of the gap) against exact denoising "
                                      "restoration, per component.")


def notes(d: Doc, ctx: Context) -> None:
    """Sections skipped or narrowed, and why."""
    rep = ctx.rep
    d.h(2, "Notes")
    d.items(rep.notes or ["Every section ran."])


def files(d: Doc, ctx: Context) -> None:
    """What each file of the report folder holds."""
    d.h(2, "Files")
    d.table(pd.DataFrame(list(FILES.items()), columns=["file", "contents"]))


def rerun(d: Doc, ctx: Context) -> None:
    """The command that reproduces the report."""
    rep = ctx.rep
    d.h(2, "Re-run")
    d.p("The same seed gives the same numbers (results.json is identical). Command:")
    d.pre(rerun_command(rep))


def provenance(d: Doc, ctx: Context) -> None:
    """The provenance, and the run time per section."""
    prov, rep = ctx.prov, ctx.rep
    d.h(2, "Provenance")
    d.pre(json.dumps(_jsonable(prov), indent=1))
    if rep.timings:
        d.p("Run time: " + ", ".join(f"{k} {v:.1f} s" for k, v in rep.timings.items())
            + f"; total {sum(rep.timings.values()):.1f} s.")


#: The document's sections, in order. A new section: write ``def my_section(d: Doc, ctx: Context) -> None``
#: above and add it here.
SECTIONS: list[Callable[[Doc, Context], None]] = [
    title,
    key_findings,
    task_and_baseline,
    triangulation_table,
    conditions_section,
    patch_vs_ablate,
    hydra_effect,
    layer_head_maps,
    compensation_graph,
    paired_confirmations,
    iterated_ablation,
    why_it_repairs,
    path_patching,
    attribution,
    notes,
    files,
    rerun,
    provenance,
]


def build_doc(rep: Any, figures: Mapping[str, Path], max_rows: int = 40) -> Doc:
    """The report as a :class:`Doc`: every section of :data:`SECTIONS`, in order.

    ``figures``: {name: png path} of the figures drawn (sections skip missing ones);
    ``max_rows``: rows of the triangulation table shown (all are in tables/triangulation.csv).
    """
    ctx = Context.of(rep, figures, max_rows)
    d = Doc()
    for section in SECTIONS:
        section(d, ctx)
    return d


__all__ = ["FILES", "SECTIONS", "Context", "build_doc"]
