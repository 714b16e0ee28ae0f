"""The report's tables, by file stem (written as tables/*.csv and into results.json).

Assembly only: each table is a result object's frame or summary, or a join of
them (``patch_vs_ablate``); intervals come from :mod:`hydra_probe.stats`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..graph import edge_frame, node_frame
from ..stats import summarise


def patch_ablate_frames(rep: Any, components: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per prompt and summarised: metric on the clean, corrupted, clean-patched and ablated runs."""
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
    t["attribution_patch"] = r["attribution"].to_frame()
    if "attribution_noise" in r:  # exact="auto": AtP* in the noising direction too
        t["attribution_patch_noise"] = r["attribution_noise"].to_frame()
    if "attribution_ablation" in r:  # exact="auto": AtP* of each component's ablation
        t["attribution_ablation"] = r["attribution_ablation"].to_frame()
        t["attribution_ablation_summary"] = r["attribution_ablation"].summary()
    if "paired_ablation" in r:
        t["paired_ablation"] = r["paired_ablation"].to_frame()
        t["paired_ablation_summary"] = r["paired_ablation"].summary()
    if len(rep.edges_tested):
        t["edges_tested"] = rep.edges_tested
    if "iterated_ablation" in r:
        t["iterated_ablation"] = r["iterated_ablation"].to_frame()
        t["iterated_ablation_summary"] = r["iterated_ablation"].summary()
    t["path_patch"] = r["path_patch"].to_frame()
    t["path_patch_summary"] = r["path_patch"].summary()
    if rep.hydra:
        t["hydra_slope"] = pd.DataFrame([rep.hydra])
    top = rep.top_components()
    per, summ = patch_ablate_frames(rep, top)
    t["patch_vs_ablate"] = per
    t["patch_vs_ablate_summary"] = summ
    if "conditions" in r:  # compare_conditions attached by `hydra-probe report --conditions`
        c = r["conditions"]
        t["conditions"], t["conditions_summary"], t["conditions_grid"] = c.to_frame(), c.summary(), c.grid().reset_index()
    if "repair_mechanisms" in r:  # "Why it repairs"
        t["repair_mechanisms"] = r["repair_mechanisms"].to_frame()
        t["repair_mechanisms_summary"] = r["repair_mechanisms"].summary()
    if "layer_regression" in r:
        t["layer_regression"] = r["layer_regression"].to_frame()
        t["layer_regression_shares"] = r["layer_regression"].shares()
    if "neuron_contributions" in r:
        t["neuron_contributions"] = r["neuron_contributions"].to_frame()
        t["neuron_contributions_summary"] = r["neuron_contributions"].summary(top=20)
    if rep.graph is not None:
        t["graph_edges"] = edge_frame(rep.graph)
        t["graph_nodes"] = node_frame(rep.graph)
    return t



__all__ = ["derived_tables", "patch_ablate_frames"]
