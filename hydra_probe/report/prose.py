"""The report's prose: claims with their conditions, one sentence per component, key findings.

Assembly only: every number comes from the report's table, baseline, Hydra
slope and result summaries.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ..claims import VERDICT_RULE, VERDICTS
from ..formatting import ci, fmt, pct

VALUE_TEXT = {
    "zero": "zero ablation (the component's output set to 0)",
    "mean": "mean ablation (the per-position mean of the component's output over the task's clean prompts; "
            "positions count from the start, so prompts of different lengths are averaged over the positions "
            "they share)",
    "resample": "resample ablation (the component's output from another prompt of the task, seeded)",
}


def claim_conditions(prov: dict[str, Any]) -> str:
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
    de = ci(row["direct_effect"], row["direct_effect_lo"], row["direct_effect_hi"])
    if not _number(row["total_effect"]):  # exact="auto" ruled the ablation out
        s = (f"**{c}** ({row['verdict']}). It writes {de} directly (direct effect). Its {val} ablation was not run: "
             "the AtP* estimate of its total effect and its direct effect are below half the threshold of the "
             "verdict scale (exact='auto'), so TE, DE lost and self-repair are not measured.")
    else:
        s = (f"**{c}** ({row['verdict']}). {str(val).capitalize()}-ablating it in the clean prompts lowers `{metric}` "
             f"by {ci(row['total_effect'], row['total_effect_lo'], row['total_effect_hi'])} (total effect, TE); it "
             f"writes {de} directly (direct effect) and the ablation removes {fmt(row['de_lost'])} of that (DE lost).")
        s += _repair_clause(row)
    if bool(row["backed_up"]):
        s += (f" **Backed up**: {row['backups']}; ablating it alone hides that much of its role, so its verdict is "
              "masked by self-repair.")
    den = (f"Denoising (its clean activation patched into the `{corr}`-corrupted run) restores "
           f"{pct(row['restoration'])} of the clean-corrupted gap" if _number(row["restoration"]) else
           "Denoising was not run (its AtP* restoration estimate is below half the threshold, exact='auto')")
    noi = (f"noising (its corrupted activation in the clean run) removes {pct(row['damage'])}"
           if _number(row["damage"]) else
           "noising was not run (its AtP* damage estimate is below half the threshold, exact='auto')")
    s += f" {den}; {noi}."
    if _number(row.get("attribution")):
        s += f" Attribution patching estimates {pct(row['attribution'])} restoration (a first-order estimate)."
    return s


def _number(x: Any) -> bool:
    """Whether ``x`` is a measured number (not NaN: exact="auto" ruled that measurement out, or absent)."""
    return isinstance(x, float) and not math.isnan(x)


def _repair_clause(row: pd.Series) -> str:
    """What self-repair does to an ablated component's total effect (one or two sentences)."""
    if row["lower_bound"] is True or row["lower_bound"] == 1:
        who = row["compensators"] or "no single downstream component significantly (see the contributions table)"
        return (f" **The total effect is only a lower bound**: downstream components restore "
                f"{ci(row['self_repair'], row['self_repair_lo'], row['self_repair_hi'])} "
                f"({pct(row['fraction_repaired'])} of DE lost; final-norm share {fmt(row['norm_term'])}"
                + (f"; {pct(row['fraction_repaired_top'])} on the quarter of prompts where its direct effect is "
                   "highest" if _number(row.get("fraction_repaired_top")) else "")
                + f"); compensators: {who}.")
    if row["self_repair"] < 0 and row["self_repair_hi"] < 0:
        return (f" Downstream components amplify the loss (self-repair {fmt(row['self_repair'])} < 0), so the "
                "total effect exceeds the direct effect lost.")
    return " Self-repair is not significant here."


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
    return "\n".join(findings(rep)).replace("**", "").replace("`", "")


def masked_findings(t: pd.DataFrame) -> list[str]:
    """The components masked by self-repair with the backups that paired or iterated ablation confirmed (one
    item), and those masked on self-repair alone (another); nothing when there are none."""
    out = []
    m = t[t["verdict"] == "masked by self-repair"]
    backed = m[m["backed_up"].astype(bool)]
    if len(backed):
        out.append(f"Masked by self-repair, with confirmed backups ({len(backed)}): " + "; ".join(
            f"{r.component} (TE {fmt(r.total_effect)}, DE lost {fmt(r.de_lost)}, self-repair {fmt(r.self_repair)}; "
            f"backed up by {r.backups})" for r in backed.itertuples()) + ".")
    rest = m[~m["backed_up"].astype(bool)]
    if len(rest):
        out.append(f"Masked by self-repair, backups not confirmed by paired ablation ({len(rest)}): " + "; ".join(
            f"{r.component} (TE {fmt(r.total_effect)}, DE lost {fmt(r.de_lost)}"
            + (f"; compensators {r.compensators}" if r.compensators else "") + ")" for r in rest.itertuples()) + ".")
    return out


def findings(rep: Any) -> list[str]:
    """Key findings, one item each: the masked components and their backups first, then the baseline, the
    Hydra slope, lower bounds, verdict counts, confirmations and the iterated ablation."""
    b, prov, t = rep.baseline, rep.provenance, rep.to_frame()
    out = masked_findings(t)
    out += [f"Model {prov.get('model')}, task {prov.get('task')} (corruption {prov.get('corruption')}, "
           f"n = {prov.get('n')} prompt pairs), metric {prov.get('metric')}: clean {fmt(b['clean_metric'])}, "
           f"corrupted {fmt(b['corrupted_metric'])}, gap {fmt(b['gap'])}."]
    h = rep.hydra
    if h and not math.isnan(h.get("slope", float("nan"))):
        out.append(f"Hydra slope {ci(h['slope'], h['slope_lo'], h['slope_hi'])} (OLS of total effect on DE lost "
                   f"over {h['n']} components, R² {fmt(h['r2'])}): " + hydra_reading(h, prov.get("value"))
                   + (" A weak fit: read it as a rough average." if h.get("r2", 0) < 0.3 else ""))
    is_lb = t["lower_bound"].eq(True)  # NaN: a component not ablated (exact="auto")
    nlb = int(is_lb.sum())
    lb = t[is_lb].sort_values("self_repair", ascending=False, kind="stable")
    n_abl = int(t["total_effect"].notna().sum())  # NaN: not ablated (exact="auto")
    line = (f"{nlb} of {n_abl}{' ablated' if n_abl < len(t) else ''} components have a total effect that is only a "
            "lower bound (self-repair > 0 beyond its 95% interval)")
    if nlb:
        line += ": " + "; ".join(
            f"{r.component} (TE {fmt(r.total_effect)}, self-repair {fmt(r.self_repair)}"
            + (f", by {r.compensators}" if r.compensators else "") + ")" for r in lb.head(5).itertuples())
        line += "" if nlb <= 5 else f"; and {nlb - 5} more"
    out.append(line + ".")
    counts = t["verdict"].value_counts()
    out.append("Verdicts: " + ", ".join(f"{v} {int(counts.get(v, 0))}" for v in VERDICTS) + ".")
    n_est = int(t["measured"].eq("").sum()) if "measured" in t else 0
    n_part = int((~t["exact"].astype(bool)).sum()) - n_est if "exact" in t else 0
    if n_est or n_part:
        out[-1] += (f" {n_est} of the {int(counts.get(VERDICTS[-1], 0))} 'agree: minor' are estimated (exact='auto': "
                    f"AtP* and the direct effect rule every measurement out; not swept exactly), {len(t) - n_est} "
                    f"components swept" + (f" ({n_part} in some measurements only: AtP* rules the others out)"
                                           if n_part else "") + ".")
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



def verdict_rule_text(rep: Any) -> str:
    """:data:`~hydra_probe.claims.VERDICT_RULE` with this report's threshold, baseline and scale."""
    b = rep.baseline
    return (VERDICT_RULE.replace("(default 0.1)", f"(here {rep.config['threshold']})")
            + f"\nHere: clean {fmt(b['clean_metric'])}, corrupted {fmt(b['corrupted_metric'])}, gap {fmt(b['gap'])}, "
            f"scale {fmt(b['verdict_scale'])}.")


def rerun_command(rep: Any) -> str:
    """The CLI command that reproduces this report (IOI tasks) or the Python call (other tasks)."""
    cfg, ti = rep.config, rep.task_info
    model = rep.model_info.get("name", "")
    model = "default" if model == "hydra_probe/default-ioi" else model
    comps = cfg["components"] if isinstance(cfg["components"], str) else ",".join(cfg["components"])
    common = (f"--value {cfg['value']} --metric {cfg['metric']} --scale {cfg['scale']} --components {comps} "
              f"--seed {cfg['seed']}")
    common += f" --exact {cfg.get('exact', 'all')}"  # reports written before exact= existed swept everything
    if cfg.get("conditions"):  # the section of compare_conditions (hydra-probe report --conditions)
        common += f" --conditions {cfg['conditions']}"
    if ti.get("name") == "ioi" and ti.get("seed") == cfg["seed"]:
        return (f"hydra-probe report --model {model} --task ioi --n-prompts {ti['n']} "
                f"--corruption {ti['corruption']} {common} --out hydra_report/")
    return (f"hydra-probe report --model {model} --task task.jsonl {common} --out hydra_report/\n"
            "# task.jsonl: the pairs stored under task.pairs in results.json, one JSON object a line")



__all__ = ["VALUE_TEXT", "claim_conditions", "component_sentence", "findings", "findings_text", "hydra_reading",
           "rerun_command", "verdict_rule_text"]
