"""Writing a report folder: tables/*.csv, graph/, results.json, figures/, report.md, report.html.

Everything is written into a temporary sibling folder that replaces the
target only when every file is there (:func:`hydra_probe.io.atomic_folder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..graph import draw_graph, save_graph
from ..io import atomic_folder, check_output_folder
from ..results import dumps_json
from . import figures as F
from . import render
from .conditions_section import conditions_grid
from .document import build_doc
from .store import results_json
from .tables import derived_tables
from .why_it_repairs import mechanism_figures


def make_figures(rep: Any, tables: dict[str, pd.DataFrame], folder: Path) -> dict[str, Path]:
    """Draw every figure into ``folder`` (PNG + SVG); returns {name: png path}."""
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
        figs["compensation_graph"] = draw_graph(rep.graph)
    if "iterated_ablation" in rep.results:
        figs["iterated_ablation"] = F.iterated_curve(tables["iterated_ablation_summary"], caption=cap)
    if t["attribution"].notna().any():
        figs["attribution_vs_exact"] = F.attribution_vs_exact(t, caption=cap)
    if "conditions" in rep.results:
        figs["conditions_grid"] = conditions_grid(rep.results["conditions"], top)
    figs.update(mechanism_figures(rep.results, top, caption=cap))  # "Why it repairs" (when it ran)
    return {name: F.save_figure(fig, folder, name)["png"] for name, fig in figs.items()}


def save_report(rep: Any, folder: Any, overwrite: bool = False, figures: bool = True) -> Path:
    """Write the full report folder atomically (see ``TriangulationReport.save``); returns its path."""
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
            gdir = tmp / "graph"
            save_graph(rep.graph, gdir)
            tables["graph_edges"].to_csv(gdir / "edges.csv", index=False)
            tables["graph_nodes"].to_csv(gdir / "nodes.csv", index=False)
        (tmp / "results.json").write_text(dumps_json(results_json(rep, tables)) + "\n", encoding="utf-8")
        figs = make_figures(rep, tables, tmp / "figures") if figures else {}
        doc = build_doc(rep, figs)
        (tmp / "report.md").write_text(render.to_markdown(doc), encoding="utf-8")
        title = f"hydra_probe report: {rep.provenance.get('model')} on {rep.provenance.get('task')}"
        (tmp / "report.html").write_text(render.to_html(doc, figs, title), encoding="utf-8")
    return p


__all__ = ["make_figures", "save_report"]
