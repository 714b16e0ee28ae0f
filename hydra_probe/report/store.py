"""results.json of a report: written from a report, read back into the parts of one (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import networkx as nx
import pandas as pd

from ..errors import InputError
from ..results import _KINDS, Result, _jsonable, frame_from_json, frame_to_json, package_version
from .prose import rerun_command, verdict_rule_text

KIND = "triangulation_report"


def _result_json(res: Any) -> dict[str, Any]:
    return {"kind": res.kind, "provenance": _jsonable(res.provenance), "frame": frame_to_json(res.to_frame()),
            "extras": {k: frame_to_json(v) for k, v in res.extras.items()}}


def results_json(rep: Any, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """Everything needed to check and re-run the report (no timings: re-runs give identical files).

    ``tables``: the report's tables by stem (:func:`.tables.derived_tables`); the per-prompt
    contribution and patch-vs-ablate tables are left out (their summaries and the result frames hold them).
    """
    head = _jsonable({  # the frames below are JSON-ready already (frame_to_json): not walked again
        "kind": KIND,
        "version": package_version(),
        "provenance": rep.provenance,
        "config": rep.config,
        "model": rep.model_info,
        "task": {**rep.task_info, "pairs": rep.task_pairs},
        "rerun": rerun_command(rep),
        "baseline": rep.baseline,
        "verdict_rule": verdict_rule_text(rep),
        "hydra_slope": rep.hydra,
        "notes": rep.notes,
    })
    return {
        **head,
        "results": {k: _result_json(v) for k, v in rep.results.items()},
        "tables": {k: frame_to_json(v) for k, v in tables.items() if not k.startswith(("self_repair_contributions",
                                                                                        "patch_vs_ablate"))
                   or k.endswith("summary")},
        "graph": None if rep.graph is None else _jsonable(nx.node_link_data(rep.graph, edges="edges")),
        "attribution_agreement": _jsonable(_agreement_json(rep.agreement)),
    }


def _agreement_json(ag: Any) -> Any:
    if ag is None:
        return None
    return {k: frame_to_json(v) if isinstance(v, pd.DataFrame) else v for k, v in ag.items()}


def _agreement_from_json(obj: Any) -> Any:
    if obj is None:
        return None
    return {k: frame_from_json(v) if isinstance(v, dict) and "columns" in v and "data" in v else v
            for k, v in obj.items()}


def _result_from_json(obj: dict[str, Any]) -> Result:
    cls = _KINDS.get(obj["kind"], Result)
    res = cls.__new__(cls)
    Result.__init__(res, frame_from_json(obj["frame"]), obj["provenance"],
                    {k: frame_from_json(v) for k, v in obj.get("extras", {}).items()})
    return res


def read_report(folder: Any) -> dict[str, Any]:
    """The parts of a report (the keyword arguments of ``TriangulationReport``) from a report folder's
    results.json (or the file itself). Raises :class:`~hydra_probe.errors.InputError` on a missing or
    foreign file."""
    p = Path(folder) / "results.json" if Path(folder).is_dir() else Path(folder)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read a report from {p} ({e}); give a folder written by report.save().") from None
    if obj.get("kind") != KIND:
        raise InputError(f"{p} is not a triangulation report's results.json.")
    tables = obj["tables"]
    task = dict(obj["task"])
    pairs = task.pop("pairs")
    return {"results": {k: _result_from_json(v) for k, v in obj["results"].items()},
            "config": obj["config"], "task_info": task, "task_pairs": pairs,
            "graph": None if obj["graph"] is None else nx.node_link_graph(obj["graph"], edges="edges"),
            "edges_tested": frame_from_json(tables["edges_tested"]) if "edges_tested" in tables else None,
            "hydra": obj["hydra_slope"], "notes": obj["notes"],
            "agreement": _agreement_from_json(obj["attribution_agreement"]), "model_info": obj["model"]}


__all__ = ["read_report", "results_json"]
