"""Writing a triangulation report: report.md, report.html, results.json, tables/*.csv, graph/, figures/.

Assembly only: every number comes from the report's result objects (their
frames and summaries) or from :mod:`hydra_probe.stats`; nothing here runs a
model. The document is built once as a list of blocks and rendered twice,
to Markdown (figures linked from ``figures/``) and to self-contained HTML
(figures embedded as ``data:`` URIs, inline CSS, no scripts, no external
resources).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError, OutputError
from ..io import atomic_folder
from ..results import _jsonable, frame_from_json, frame_to_json, package_version

VALUE_TEXT = {
    "zero": "zero ablation (the component's output set to 0)",
    "mean": "mean ablation (the per-position mean of the component's output over the task's clean prompts; "
            "positions count from the start, so prompts of different lengths are averaged over the positions "
            "they share)",
    "resample": "resample ablation (the component's output from another prompt of the task, seeded)",
}

FILES = {
    "report.md": "this report (Markdown; figures linked from figures/)",
    "report.html": "this report, self-contained (figures embedded; opens offline)",
    "results.json": "every number with its provenance: per-prompt result frames, derived tables, config, version",
    "tables/": "one CSV per analysis (per-prompt frames and summaries)",
    "graph/": "the compensation graph as GraphML, GEXF and node-link JSON",
    "figures/": "every figure as PNG and SVG",
}


# ============================================================================ document model
@dataclass
class Doc:
    """A report as blocks: ("h", level, text) | ("p", text) | ("list", items) | ("pre", text)
    | ("table", frame, caption) | ("fig", name, caption)."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, items: list[str]) -> None:
        self.blocks.append(("list", items))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def table(self, frame: pd.DataFrame, caption: str = "") -> None:
        self.blocks.append(("table", frame, caption))

    def fig(self, name: str, caption: str) -> None:
        self.blocks.append(("fig", name, caption))


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: 3 significant digits; NaN/None as an empty cell."""
    if x is None:
        return ""
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        f = float(x)
        if math.isnan(f):
            return ""
        if f == 0:
            return "0"
        if abs(f) >= 1e5 or abs(f) < 1e-3:
            return f"{f:.2e}"
        return f"{f:.0f}" if abs(f) >= 10 ** digits else f"{f:.{digits}g}"
    return str(x)


def ci(m: Any, lo: Any, hi: Any) -> str:
    """``m [lo, hi]``."""
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return fmt(m)
    return f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]"


def pct(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    v = round(100 * float(x))
    return f"{v + 0:.0f}%"  # + 0 turns -0 into 0


# ============================================================================ markdown
def _md_cell(x: Any) -> str:
    return (x if isinstance(x, str) else fmt(x)).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Doc) -> str:
    out: list[str] = []
    for b in doc.blocks:
        k = b[0]
        if k == "h":
            out.append("#" * b[1] + " " + b[2])
        elif k == "p":
            out.append(b[1])
        elif k == "list":
            out.append("\n".join(f"- {it}" for it in b[1]))
        elif k == "pre":
            out.append("```\n" + b[1].rstrip("\n") + "\n```")
        elif k == "table":
            f, cap = b[1], b[2]
            lines = ["| " + " | ".join(map(_md_cell, f.columns)) + " |",
                     "|" + "|".join("---" for _ in f.columns) + "|"]
            lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in f.itertuples(index=False)]
            out.append((f"*{cap}*\n\n" if cap else "") + "\n".join(lines))
        elif k == "fig":
            out.append(f"![{b[2]}](figures/{b[1]}.png)\n\n*{b[2]}* ([SVG](figures/{b[1]}.svg))")
    return "\n\n".join(out) + "\n"


# ============================================================================ html
CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45;background:#fff}
h1{font-size:1.6em;border-bottom:2px solid #0072B2;padding-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;
border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.8em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;vertical-align:top}
td{white-space:nowrap}td.text{white-space:normal;text-align:left;min-width:8em}
th{background:#f3f6f9}td:first-child,th:first-child{text-align:left}tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption,.caption{font-size:.85em;color:#555}pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.8em}
code{background:#f6f8fa;padding:0 .2em}
"""


def _inline(text: str) -> str:
    """Escape, then render `code` and **bold** spans."""
    s = html.escape(text)
    parts = s.split("`")
    s = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = s.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


_NUMBER = re.compile(r"^[-+]?(\d|\.\d)")


def to_html(doc: Doc, figures: dict[str, Path], title: str) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"]
    for b in doc.blocks:
        k = b[0]
        if k == "h":
            out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
        elif k == "p":
            out.append(f"<p>{_inline(b[1])}</p>")
        elif k == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(it)}</li>" for it in b[1]) + "</ul>")
        elif k == "pre":
            out.append(f"<pre>{html.escape(b[1])}</pre>")
        elif k == "table":
            f, cap = b[1], b[2]
            rows = ["<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in f.columns) + "</tr>"]
            def td(v: Any) -> str:
                if isinstance(v, str):
                    wrap = not _NUMBER.match(v) and (" " in v or len(v) > 24)  # prose wraps, numbers do not
                    cls = ' class="text"' if wrap else ""
                    return f"<td{cls}>{html.escape(v)}</td>"
                return f"<td>{html.escape(fmt(v))}</td>"

            rows += ["<tr>" + "".join(td(v) for v in r) + "</tr>" for r in f.itertuples(index=False)]
            out.append((f'<p class="caption">{_inline(cap)}</p>' if cap else "") + "<table>" + "".join(rows)
                       + "</table>")
        elif k == "fig":
            p = figures.get(b[1])
            if p is None:
                continue
            data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{_inline(b[2])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ============================================================================ derived tables (assembly)
def patch_ablate_frames(rep: Any, components: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per prompt and summarised: metric on the clean, corrupted, clean-patched and ablated runs."""
    from ..stats import summarise

    den = rep.results["patch_denoise"].to_frame()
    sr = rep.results["self_repair"].to_frame()
    parts = []
    for c in components:
        d = den[den["component"] == c]
        s = sr[sr["component"] == c]
        for run, vals in (("clean", d["clean_metric"]), ("corrupted", d["corrupted_metric"]),
                          ("clean-patched", d["patched_metric"]), ("ablated", s["ablated_metric"])):
            parts.append(pd.DataFrame({"component": c, "run": run, "prompt": np.arange(len(vals)),
                                       "metric": vals.to_numpy()}))
    per = pd.concat(parts, ignore_index=True)
    per["key"] = per["component"] + "|" + per["run"]
    summ = summarise(per, "key", ["metric"])
    summ[["component", "run"]] = summ["key"].str.split("|", expand=True)
    summ = summ[["component", "run", "n", "metric", "metric_lo", "metric_hi"]]
    return per.drop(columns="key"), summ


def derived_tables(rep: Any) -> dict[str, pd.DataFrame]:
    """Every table of the report (also written as CSV), by file stem."""
    r = rep.results
    t: dict[str, pd.DataFrame] = {"triangulation": rep.to_frame()}
    t["baseline"] = pd.DataFrame([rep.baseline])
    t["direct_effects"] = r["direct_effects"].to_frame()
    t["direct_effects_constant"] = r["direct_effects"].constant
    t["self_repair"] = r["self_repair"].to_frame()
    t["self_repair_summary"] = r["self_repair"].summary()
    t["self_repair_contributions"] = r["self_repair"].contributions()
    t["self_repair_contributions_summary"] = rep.contribution_summary()
    t["activation_patch_denoise"] = r["patch_denoise"].to_frame()
    t["activation_patch_denoise_summary"] = r["patch_denoise"].summary()
    t["activation_patch_noise"] = r["patch_noise"].to_frame()
    t["activation_patch_noise_summary"] = r["patch_noise"].summary()
    if "attribution" in r:
        t["attribution_patch"] = r["attribution"].to_frame()
    if "paired_ablation" in r:
        t["paired_ablation"] = r["paired_ablation"].to_frame()
        t["paired_ablation_summary"] = r["paired_ablation"].summary()
    if len(rep.edges_tested):
        t["edges_tested"] = rep.edges_tested
    if "iterated_ablation" in r:
        t["iterated_ablation"] = r["iterated_ablation"].to_frame()
        t["iterated_ablation_summary"] = r["iterated_ablation"].summary()
    if "path_patch" in r:
        t["path_patch"] = r["path_patch"].to_frame()
        t["path_patch_summary"] = r["path_patch"].summary()
    if rep.hydra:
        t["hydra_slope"] = pd.DataFrame([rep.hydra])
    top = rep.top_components()
    per, summ = patch_ablate_frames(rep, top)
    t["patch_vs_ablate"] = per
    t["patch_vs_ablate_summary"] = summ
    if rep.graph is not None:
        from ..graph import edge_frame, node_frame

        t["graph_edges"] = edge_frame(rep.graph)
        t["graph_nodes"] = node_frame(rep.graph)
    return t


# ============================================================================ text
def _claim(prov: dict[str, Any]) -> str:
    """The conditions of a claim: metric, ablation value or patch direction, scale, corruption, n."""
    parts = [f"metric `{prov.get('metric')}`"]
    if prov.get("value") is not None:
        parts.append(f"ablation value `{prov.get('value')}`")
    d = prov.get("direction")
    if d in ("denoise", "noise"):
        parts.append(f"direction `{d}`")
    if prov.get("scale") is not None:
        parts.append(f"scale `{prov.get('scale')}`")
    parts += [f"corruption `{prov.get('corruption')}`", f"n = {prov.get('n')}"]
    return ", ".join(parts)


def component_sentence(row: pd.Series, prov: dict[str, Any], rep: Any) -> str:
    """One plain claim per component, with its conditions."""
    c = row["component"]
    val, metric, corr = prov.get("value"), prov.get("metric"), prov.get("corruption")
    s = (f"**{c}** ({row['verdict']}). {str(val).capitalize()}-ablating it in the clean prompts lowers `{metric}` by "
         f"{ci(row['total_effect'], row['total_effect_lo'], row['total_effect_hi'])} (total effect, TE); it writes "
         f"{ci(row['direct_effect'], row['direct_effect_lo'], row['direct_effect_hi'])} directly (direct effect) "
         f"and the ablation removes {fmt(row['de_lost'])} of that (DE lost).")
    if bool(row["lower_bound"]):
        who = row["compensators"] or "no single downstream component significantly (see the contributions table)"
        s += (f" **The total effect is only a lower bound**: downstream components restore "
              f"{ci(row['self_repair'], row['self_repair_lo'], row['self_repair_hi'])} "
              f"({pct(row['fraction_repaired'])} of DE lost; final-norm share {fmt(row['norm_term'])}"
              + (f"; {pct(row['fraction_repaired_top'])} on the quarter of prompts where its direct effect is "
                 "highest" if isinstance(row.get("fraction_repaired_top"), float)
                 and not math.isnan(row["fraction_repaired_top"]) else "")
              + f"); compensators: {who}.")
    elif row["self_repair"] < 0 and row["self_repair_hi"] < 0:
        s += (f" Downstream components amplify the loss (self-repair {fmt(row['self_repair'])} < 0), so the "
              "total effect exceeds the direct effect lost.")
    else:
        s += " Self-repair is not significant here."
    s += (f" Denoising (its clean activation patched into the `{corr}`-corrupted run) restores "
          f"{pct(row['restoration'])} of the clean-corrupted gap; noising (its corrupted activation in the clean run) "
          f"removes {pct(row['damage'])}.")
    if isinstance(row.get("attribution"), float) and not math.isnan(row["attribution"]):
        s += f" Attribution patching estimates {pct(row['attribution'])} restoration (a first-order estimate)."
    return s


def hydra_reading(h: dict[str, Any], value: Any) -> str:
    """What the Hydra slope says, in one sentence (it reads differently below and above 1)."""
    if h["slope"] < 1:
        return (f"on average single {value} ablations show about {pct(h['slope'])} of the direct effect they remove; "
                "downstream compensation hides the rest.")
    return (f"total effects exceed the direct effect removed ({fmt(h['slope'])}x on average): these components act "
            "largely through downstream components, so the slope mixes indirect effects with self-repair; the "
            "per-component self-repair shows where a total effect is a lower bound.")


def findings_text(rep: Any) -> str:
    """Key findings as plain text (``TriangulationReport.summary()``)."""
    return "\n".join(_findings(rep)).replace("**", "").replace("`", "")


def _findings(rep: Any) -> list[str]:
    b, prov, t = rep.baseline, rep.provenance, rep.to_frame()
    out = [f"Model {prov.get('model')}, task {prov.get('task')} (corruption {prov.get('corruption')}, "
           f"n = {prov.get('n')} prompt pairs), metric {prov.get('metric')}: clean {fmt(b['clean_metric'])}, "
           f"corrupted {fmt(b['corrupted_metric'])}, gap {fmt(b['gap'])}."]
    h = rep.hydra
    if h and not math.isnan(h.get("slope", float("nan"))):
        out.append(f"Hydra slope {ci(h['slope'], h['slope_lo'], h['slope_hi'])} (OLS of total effect on DE lost "
                   f"over {h['n']} components, R² {fmt(h['r2'])}): " + hydra_reading(h, prov.get("value"))
                   + (" A weak fit: read it as a rough average." if h.get("r2", 0) < 0.3 else ""))
    nlb = int(t["lower_bound"].sum())
    lb = t[t["lower_bound"].astype(bool)].sort_values("self_repair", ascending=False, kind="stable")
    line = (f"{nlb} of {len(t)} components have a total effect that is only a lower bound "
            "(self-repair > 0 beyond its 95% interval)")
    if nlb:
        line += ": " + "; ".join(
            f"{r.component} (TE {fmt(r.total_effect)}, self-repair {fmt(r.self_repair)}"
            + (f", by {r.compensators}" if r.compensators else "") + ")" for r in lb.head(5).itertuples())
        line += "" if nlb <= 5 else f"; and {nlb - 5} more"
    out.append(line + ".")
    counts = t["verdict"].value_counts()
    out.append("Verdicts: " + ", ".join(f"{v} {int(counts.get(v, 0))}" for v in
                                        ("agree: important", "masked by self-repair", "necessity only",
                                         "restoration only", "agree: minor")) + ".")
    if len(rep.edges_tested):
        e = rep.edges_tested
        conf = e[e["verified"] == "confirmed"]
        out.append(f"Paired ablations confirm {len(conf)} of {len(e)} tested compensation edges"
                   + (": " + ", ".join(f"{a}->{b_}" for a, b_ in zip(conf["source"], conf["target"])) if len(conf)
                      else "") + ".")
    if "iterated_ablation" in rep.results:
        s = rep.results["iterated_ablation"].summary()
        d0 = s["target_de_lost"].iloc[0]
        if "target_marginal" in s:
            out.append(f"Iterated ablation of {s['ablated'].iloc[0]}: removing it costs {fmt(s['total_effect'].iloc[0])} "
                       f"alone and {fmt(s['target_marginal'].iloc[-1])} once {', '.join(s['added'].iloc[1:])} are "
                       f"ablated too (its DE lost is {fmt(d0)}; {fmt(100 * s['marginal_recovered'].iloc[0])}% -> "
                       f"{fmt(100 * s['marginal_recovered'].iloc[-1])}%).")
        else:
            out.append(f"Iterated ablation of {s['ablated'].iloc[0]}: total effect {fmt(s['total_effect'].iloc[0])} "
                       f"alone, {fmt(s['total_effect'].iloc[-1])} with {', '.join(s['added'].iloc[1:])} "
                       f"(its DE lost is {fmt(d0)}).")
    return out


# ============================================================================ the document
def build_doc(rep: Any, figures: dict[str, Path], max_rows: int = 40) -> Doc:
    prov, cfg, b, t = rep.provenance, rep.config, rep.baseline, rep.to_frame()
    r = rep.results
    top = rep.top_components()
    metric, val, corr = prov.get("metric"), prov.get("value"), prov.get("corruption")
    d = Doc()
    d.h(1, f"Triangulation report: {prov.get('model')} on {prov.get('task')}")
    d.p(f"hydra_probe {prov.get('version')}. Every claim below is made under the conditions stated with it: "
        + _claim(prov) + ". Necessity-style evidence (ablation) and restoration-style evidence (activation, path and "
        "attribution patching) are set side by side for each component.")

    d.h(2, "Key findings")
    d.items(_findings(rep))

    # -------------------------------------------------------------- setup
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
            ("gap (clean - corrupted)", fmt(b["gap"]))]
    if metric == "logit_diff":
        rows += [("clean accuracy (answer above alternative)", pct(b["clean_accuracy"])),
                 ("corrupted accuracy", pct(b["corrupted_accuracy"]))]
    d.table(pd.DataFrame(rows, columns=["", "value"]))
    if rep.task_pairs:
        ex = rep.task_pairs[0]
        d.p(f"Example pair: clean `{ex['clean']}` / corrupted `{ex['corrupted']}`; answer `{ex['answer']}`, "
            f"alternative `{ex['alternative']}`.")

    # -------------------------------------------------------------- the table
    d.h(2, "Triangulation table")
    d.p("One row per component, most important first (importance = the largest of |TE|/gap, |DE lost|/gap, "
        "restoration, damage). Metric units unless marked %; intervals are 95% Student-t intervals of the mean "
        f"across prompts. **TE** = `{metric}`(clean) - `{metric}`(clean, component {val}-ablated); **DE** = direct "
        "effect on the clean run; **SR** = self-repair = DE lost - TE, positive when downstream components restore "
        "what the ablation removed; **lower bound** = SR > 0 beyond its interval, so TE understates the role; "
        f"**restoration** = denoising score (clean activation into the `{corr}`-corrupted run); **damage** = "
        "noising score (corrupted activation into the clean run); both as a share of the gap. **attribution** = "
        "first-order estimate of restoration (never used in the verdict). SR/DE lost is left blank where DE lost is "
        "under 1% of the gap.")
    d.pre(rep_verdict_rule(rep))
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
        "lower bound": ["yes" if x else "" for x in show["lower_bound"]],
        "compensators": show["compensators"],
        "restoration": [pct(x) for x in show["restoration"]],
        "damage": [pct(x) for x in show["damage"]],
        "attribution": [pct(x) for x in show["attribution"]],
        "verdict": show["verdict"],
    })
    d.table(tab, f"Conditions: {_claim(prov)}." + (f" Top {max_rows} of {len(t)} rows; all in tables/triangulation.csv."
                                                   if len(t) > max_rows else ""))
    d.h(3, "Claims for the top components")
    d.items([component_sentence(row, prov, rep) for _, row in t.head(len(top)).iterrows()])
    if "evidence_map" in figures:
        d.fig("evidence_map", "Necessity (TE / gap) against restoration (denoising score), coloured by verdict; "
                              f"dotted lines at the threshold {cfg['threshold']}.")

    # -------------------------------------------------------------- patch vs ablate
    d.h(2, "Patch clean A vs ablate A")
    d.p(f"For each top component A: the metric on the clean run, the `{corr}`-corrupted run, the corrupted run with "
        f"A's clean activation patched in (clean-patched: does A alone restore the behaviour?), and the clean run "
        f"with A {val}-ablated (ablated: is A needed?). Bars: mean with 95% interval; dots: prompts.")
    if "patch_vs_ablate" in figures:
        d.fig("patch_vs_ablate", f"Patch clean A vs ablate A ({_claim(prov)}).")

    # -------------------------------------------------------------- Hydra
    d.h(2, "Hydra effect: total effect against direct effect lost")
    h = rep.hydra
    if h and not math.isnan(h.get("slope", float("nan"))):
        d.p(f"Regressing the single-ablation total effect on the direct effect lost across the {h['n']} components "
            f"(OLS, statsmodels) gives a slope of {ci(h['slope'], h['slope_lo'], h['slope_hi'])}, intercept "
            f"{fmt(h['intercept'])}, R² {fmt(h['r2'])}. A slope of 1 means an ablation costs the metric what the "
            "component wrote directly; below 1, downstream compensation hides that share of each component's role "
            "from single ablations; above 1, components act mostly through downstream components (indirect "
            "effects), which the slope does not separate from self-repair. Here: " + hydra_reading(h, val)
            + " Points below the identity line (blue where self-repair is significant) are components whose TE "
            "is a lower bound on what they write.")
    else:
        d.p("The Hydra slope is undefined here (fewer than three components or no variation in DE lost).")
    if "te_vs_de_lost" in figures:
        d.fig("te_vs_de_lost", "Total effect vs direct effect lost per component, with the identity line and the "
                               "Hydra fit.")

    # -------------------------------------------------------------- heatmaps
    d.h(2, "Layer x head maps")
    d.p("Each measure on the model's layout (rows: layers; columns: heads, and ATTN/MLP where analysed). Each panel "
        "has its own symmetric colour scale: direct effect, total effect and self-repair in metric units; restoration, "
        "damage and attribution as shares of the clean-corrupted gap.")
    if "heatmaps" in figures:
        d.fig("heatmaps", f"Per-component measures ({_claim(prov)}).")

    # -------------------------------------------------------------- compensation
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
            if f"interaction_{part}" in e:
                table[f"I: {part}"] = [fmt(x) for x in e[f"interaction_{part}"]]
        table["verdict"] = e["verified"]
        d.table(pd.DataFrame(table), f"Conditions: {_claim(prov)}.")
    else:
        d.p("No compensation edge was tested (see the notes).")

    # -------------------------------------------------------------- iterated
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
        if "target_marginal" in s:
            table["cost of removing the target [95% CI]"] = [
                ci(a, lo, hi) for a, lo, hi in zip(s["target_marginal"], s["target_marginal_lo"],
                                                   s["target_marginal_hi"])]
            table["cost / target DE lost"] = [pct(x) for x in s["marginal_recovered"]]
        else:
            table["TE / target DE lost"] = [pct(x) for x in s["recovered"]]
        d.table(pd.DataFrame(table), f"Conditions: {_claim(r['iterated_ablation'].provenance)}.")
        if "iterated_ablation" in figures:
            d.fig("iterated_ablation", "Iterated ablation: the cost of removing the target as its compensators are "
                                       "ablated with it, against its direct effect lost.")
    else:
        d.p("Not run (see the notes).")

    # -------------------------------------------------------------- path patching
    d.h(2, "Path patching: direct and indirect paths")
    if "path_patch" in r:
        ps = r["path_patch"].summary()
        nz = r["patch_noise"].summary().set_index("component")["score"]
        pp = ps.pivot_table(index="sender", columns="receiver", values="score", aggfunc="first", sort=False)
        d.p(f"Noising (the corrupted activation of each top component, `{corr}` corruption) sent along one set of "
            "paths only, everything else at its clean value. `logits`: the direct path to the unembedding alone; "
            "`all`: every downstream head (queries, keys, values) and MLP, i.e. the indirect paths. Compare with "
            "activation-patching damage (all paths at once).")
        d.table(pd.DataFrame({"component": pp.index,
                              "damage via direct path": [pct(x) for x in pp.get("logits", pd.Series(index=pp.index))],
                              "damage via downstream components": [pct(x) for x in
                                                                   pp.get("all", pd.Series(index=pp.index))],
                              "activation-patching damage": [pct(nz.get(c)) for c in pp.index]}),
                f"Conditions: {_claim(r['path_patch'].provenance)}.")
    else:
        d.p("Not run (see the notes).")

    # -------------------------------------------------------------- attribution
    d.h(2, "Attribution patching vs exact patching")
    if "attribution" in r:
        d.p("Attribution patching estimates every component's denoising effect from two forwards and one backward "
            "(a first-order estimate, never a measurement). Agreement with exact activation patching:")
        ag = rep.agreement
        if isinstance(ag, dict):
            d.p(f"Pearson r = {fmt(ag.get('pearson'))}, Spearman ρ = {fmt(ag.get('spearman'))} over "
                f"{ag.get('n_components')} components, comparing mean estimates with mean exact effects (metric "
                "units)." + (f" Method: {ag['method']}." if ag.get("method") else ""))
            dis = ag.get("disagreements")
            if isinstance(dis, pd.DataFrame) and len(dis):
                d.table(dis, "The largest disagreements (estimate - exact, metric units).")
        elif ag is not None:
            d.p(str(ag))
        if "attribution_vs_exact" in figures:
            d.fig("attribution_vs_exact", "Attribution estimate (share of the gap) against exact denoising "
                                          "restoration, per component.")
    else:
        d.p("Not run (see the notes).")

    # -------------------------------------------------------------- notes, files, provenance
    d.h(2, "Notes")
    d.items(rep.notes or ["Every section ran."])
    d.h(2, "Files")
    d.table(pd.DataFrame(list(FILES.items()), columns=["file", "contents"]))
    d.h(2, "Re-run")
    d.p("The same seed gives the same numbers (results.json is identical). Command:")
    d.pre(rerun_command(rep))
    d.h(2, "Provenance")
    d.pre(json.dumps(_jsonable(prov), indent=1))
    if rep.timings:
        d.p("Run time: " + ", ".join(f"{k} {v:.1f} s" for k, v in rep.timings.items())
            + f"; total {sum(rep.timings.values()):.1f} s.")
    return d


def rep_verdict_rule(rep: Any) -> str:
    from .triangulation import VERDICT_RULE

    return VERDICT_RULE.replace("(default 0.1)", f"(here {rep.config['threshold']})")


def rerun_command(rep: Any) -> str:
    """The CLI command that reproduces this report (IOI tasks) or the Python call (other tasks)."""
    cfg, ti = rep.config, rep.task_info
    model = rep.model_info.get("name", "")
    model = "default" if model == "hydra_probe/default-ioi" else model
    comps = cfg["components"] if isinstance(cfg["components"], str) else ",".join(cfg["components"])
    common = (f"--value {cfg['value']} --metric {cfg['metric']} --scale {cfg['scale']} --components {comps} "
              f"--seed {cfg['seed']}")
    if ti.get("name") == "ioi" and ti.get("seed") == cfg["seed"]:
        return (f"hydra-probe report --model {model} --task ioi --n-prompts {ti['n']} "
                f"--corruption {ti['corruption']} {common} --out hydra_report/")
    return (f"hydra-probe report --model {model} --task task.jsonl {common} --out hydra_report/\n"
            "# task.jsonl: the pairs stored under task.pairs in results.json, one JSON object a line")


# ============================================================================ results.json
def _result_json(res: Any) -> dict[str, Any]:
    return {"kind": res.kind, "provenance": _jsonable(res.provenance), "frame": frame_to_json(res.to_frame()),
            "extras": {k: frame_to_json(v) for k, v in res.extras.items()}}


def results_json(rep: Any, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """Everything needed to check and re-run the report (no timings: re-runs give identical files)."""
    import networkx as nx

    return _jsonable({
        "kind": "triangulation_report",
        "version": package_version(),
        "provenance": rep.provenance,
        "config": rep.config,
        "model": rep.model_info,
        "task": {**rep.task_info, "pairs": rep.task_pairs},
        "rerun": rerun_command(rep),
        "baseline": rep.baseline,
        "verdict_rule": rep_verdict_rule(rep),
        "hydra_slope": rep.hydra,
        "notes": rep.notes,
        "results": {k: _result_json(v) for k, v in rep.results.items()},
        "tables": {k: frame_to_json(v) for k, v in tables.items() if not k.startswith(("self_repair_contributions",
                                                                                        "patch_vs_ablate"))
                   or k.endswith("summary")},
        "graph": None if rep.graph is None else nx.node_link_data(rep.graph, edges="edges"),
        "attribution_agreement": _agreement_json(rep.agreement),
    })


def _agreement_json(ag: Any) -> Any:
    if not isinstance(ag, dict):
        return None
    return {k: frame_to_json(v) if isinstance(v, pd.DataFrame) else v for k, v in ag.items()}


def _agreement_from_json(obj: Any) -> Any:
    if not isinstance(obj, dict):
        return None
    return {k: frame_from_json(v) if isinstance(v, dict) and "columns" in v and "data" in v else v
            for k, v in obj.items()}


def load_report(folder: Any) -> Any:
    """A :class:`TriangulationReport` from a report folder's results.json (no model needed)."""
    import importlib

    from ..results import _KINDS, Result
    from .triangulation import TriangulationReport

    p = Path(folder) / "results.json" if Path(folder).is_dir() else Path(folder)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read a report from {p} ({e}); give a folder written by report.save().") from None
    if obj.get("kind") != "triangulation_report":
        raise InputError(f"{p} is not a triangulation report's results.json.")
    for mod in ("effects", "effects.attribution", "effects.path", "effects.iterated"):
        try:
            importlib.import_module(f"hydra_probe.{mod}")
        except ImportError:
            pass
    results = {}
    for k, v in obj["results"].items():
        cls = _KINDS.get(v["kind"], Result)
        res = cls.__new__(cls)
        Result.__init__(res, frame_from_json(v["frame"]), v["provenance"],
                        {kk: frame_from_json(vv) for kk, vv in v.get("extras", {}).items()})
        results[k] = res
    graph = None
    if obj.get("graph") is not None:
        import networkx as nx

        graph = nx.node_link_graph(obj["graph"], edges="edges")
    tables = obj.get("tables", {})
    edges = frame_from_json(tables["edges_tested"]) if "edges_tested" in tables else None
    task = dict(obj["task"])
    pairs = task.pop("pairs", [])
    return TriangulationReport(results=results, config=obj["config"], task_info=task, task_pairs=pairs, graph=graph,
                               edges_tested=edges, hydra=obj.get("hydra_slope"), notes=obj.get("notes"),
                               agreement=_agreement_from_json(obj.get("attribution_agreement")),
                               model_info=obj.get("model"))


# ============================================================================ figures
def make_figures(rep: Any, tables: dict[str, pd.DataFrame], folder: Path) -> dict[str, Path]:
    """Draw every figure into ``folder`` (PNG + SVG); returns {name: png path}."""
    from . import figures as F

    prov, t, top = rep.provenance, rep.to_frame(), rep.top_components()
    cap = F.claim_caption(prov)
    figs: dict[str, Any] = {}
    figs["patch_vs_ablate"] = F.patch_vs_ablate(tables["patch_vs_ablate_summary"], tables["patch_vs_ablate"],
                                                caption=cap)
    figs["evidence_map"] = F.evidence_map(t, rep.config["threshold"], label=top, caption=cap)
    figs["te_vs_de_lost"] = F.te_vs_de_lost(t, rep.hydra, label=top, caption=cap)
    figs["heatmaps"] = F.heatmaps(t, caption=cap)
    figs["compensation_bars"] = F.compensation_bars(tables["self_repair_contributions_summary"], t, top, caption=cap)
    if rep.graph is not None:
        from ..graph import draw_graph

        figs["compensation_graph"] = draw_graph(rep.graph)
    if "iterated_ablation" in rep.results:
        figs["iterated_ablation"] = F.iterated_curve(tables["iterated_ablation_summary"], caption=cap)
    if "attribution" in rep.results and t["attribution"].notna().any():
        figs["attribution_vs_exact"] = F.attribution_vs_exact(t, caption=cap)
    out = {}
    for name, fig in figs.items():
        out[name] = F.save_figure(fig, folder, name)["png"]
    return out


# ============================================================================ saving
def check_output_folder(folder: Any, overwrite: bool) -> Path:
    """Refuse an output location that cannot be written safely (before any computation)."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise OutputError(f"the output path {str(p)!r} is a file; choose a folder (e.g. --out hydra_report/).")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise OutputError(f"the output folder {str(p)!r} exists and is not empty; pass --overwrite "
                          "(overwrite=True) to replace it, or choose another folder.")
    parent = p.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {str(parent)!r} (permission denied); choose another --out folder.")
    return p


def save_report(rep: Any, folder: Any, overwrite: bool = False, figures: bool = True) -> Path:
    """Write the full report folder atomically (see :meth:`TriangulationReport.save`)."""
    p = check_output_folder(folder, overwrite)
    tables = derived_tables(rep)
    with atomic_folder(p, overwrite=p.exists()) as tmp:
        tdir = tmp / "tables"
        tdir.mkdir()
        for name, f in tables.items():
            if name.startswith("graph_"):
                continue
            f.to_csv(tdir / f"{name}.csv", index=False)
        if rep.graph is not None:
            from ..graph import save_graph

            gdir = tmp / "graph"
            save_graph(rep.graph, gdir)
            tables["graph_edges"].to_csv(gdir / "edges.csv", index=False)
            tables["graph_nodes"].to_csv(gdir / "nodes.csv", index=False)
        (tmp / "results.json").write_text(json.dumps(results_json(rep, tables), indent=1, allow_nan=False) + "\n",
                                          encoding="utf-8")
        figs = make_figures(rep, tables, tmp / "figures") if figures else {}
        doc = build_doc(rep, figs)
        (tmp / "report.md").write_text(to_markdown(doc), encoding="utf-8")
        title = f"hydra_probe report: {rep.provenance.get('model')} on {rep.provenance.get('task')}"
        (tmp / "report.html").write_text(to_html(doc, figs, title), encoding="utf-8")
    return p


__all__ = ["Doc", "build_doc", "check_output_folder", "derived_tables", "findings_text", "load_report",
           "results_json", "save_report", "to_html", "to_markdown"]
