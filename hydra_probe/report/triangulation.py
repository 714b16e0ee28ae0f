"""``triangulate``: run every analysis of one model and task, and collect the result objects.

Orchestration only. Each number in a :class:`TriangulationReport` comes from a
public effect or graph function (``direct_effects``, ``self_repair``,
``activation_patch`` in both directions, ``attribution_patch``,
``path_patch``, ``compensation_graph`` + ``verify_edges``,
``iterated_ablation``) and is held in that function's result object, with
its provenance. The report joins their summaries into one per-component
table and applies a documented verdict rule (:data:`VERDICT_RULE`); it never
recomputes a measurement. The analyses of one call share their unedited runs
(:func:`~hydra_probe.effects.common.shared_runs`): each clean and corrupted
forward, with its captures, runs once per report, and the numbers are those of
the functions called alone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd

from ..checks import public
from ..claims import VERDICT_RULE, VERDICTS, verdict_scale, verdict_table
from ..components import is_norm_row, select
from ..effects import (
    activation_patch,
    attribution_ablate,
    attribution_patch,
    direct_effects,
    iterated_ablation,
    path_patch,
    self_repair,
)
from ..effects.common import as_model, check_scale, check_task, make_runner, shared_runs, value_name
from ..effects.mechanisms import repair_mechanisms
from ..errors import ComponentError, MetricError, OptionError
from ..graph import add_mechanisms, compensation_graph, compensators_of, hydra_slope, verify_edges
from ..metrics import get_metric
from ..results import concat_results
from .exact_check import ablation_shares, check_text, largest_shortfall, patching_shares, widened
from .prose import findings_text
from .store import read_report
from .why_it_repairs import mechanism_step, skip_note
from .writer import save_report

#: The analyses ``triangulate`` runs, in order, with the call each one makes.
ANALYSES = {
    "direct_effects": "direct_effects(model, task, components, scale)",
    "self_repair": "self_repair(model, task, components, value, scale): total effect, DE lost, self-repair (with "
                   "mechanisms: repair_mechanisms(...).as_self_repair(), the same forwards run once for both sections)",
    "patch_denoise": "activation_patch(..., direction='denoise'): clean activation into the corrupted run",
    "patch_noise": "activation_patch(..., direction='noise'): corrupted activation into the clean run",
    "attribution": "attribution_patch(..., method='atp*', both directions) and attribution_ablate(..., value) (AtP* of "
                   "each ablation's total effect) before the exact sweeps, which then run only over the components "
                   "they and the direct effects cannot rule out (exact='auto', the default); with exact='all', "
                   "attribution_patch(..., direction='denoise') after them (first-order estimate of denoising)",
    "graph": "compensation_graph(self_repair) + verify_edges (paired ablations of the strongest edges)",
    "iterated_ablation": "iterated_ablation(target, its compensators)",
    "path_patch": "path_patch(top components -> logits | every head and MLP, noise): direct vs indirect paths",
    "why_it_repairs": "repair_mechanisms(components) + layer_regression + neuron_contributions(top component, "
                      "its most compensating MLP): the mechanisms of self-repair",
}

#: The measurements ``exact="auto"`` sweeps (or rules out) one by one, in the order they run.
MEASUREMENTS = ("denoise", "noise", "ablation")


class Steps:
    """Step messages ("[2/8] self-repair ... 3.1 s") on stderr when enabled (default: on a terminal)."""

    def __init__(self, total: int, enabled: bool | None = None, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = (getattr(self.stream, "isatty", lambda: False)() if enabled is None else bool(enabled))
        self.total, self.k = total, 0
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, key: str, label: str) -> Iterator[None]:
        self.k += 1
        if self.enabled:
            self.stream.write(f"[{self.k}/{self.total}] {label} ...\n")
            self.stream.flush()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = time.perf_counter() - t0
            if self.enabled:
                self.stream.write(f"[{self.k}/{self.total}] {label}: {self.timings[key]:.1f} s\n")
                self.stream.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f"      note: {text}\n")
            self.stream.flush()


class TriangulationReport:
    """Necessity-style and restoration-style evidence, side by side, for one model and task.

    Attributes:
        results: the result objects, by section (``direct_effects``,
            ``self_repair``, ``patch_denoise``, ``patch_noise`` and, when
            available, ``attribution``, ``paired_ablation``,
            ``iterated_ablation``, ``path_patch``). Each keeps its own
            per-prompt frame and provenance.
        graph: the verified compensation graph (``networkx.DiGraph``) or None.
        edges_tested: the paired-ablation tests of the strongest edges
            (``EdgeVerification.tested``).
        hydra: the Hydra slope (OLS of total effect on DE lost across
            components): slope, its interval, intercept, r2, n.
        agreement: attribution vs exact denoising agreement (or None).
        config: the arguments, enough to re-run.
        task_pairs: the task's prompt pairs.
        notes: sections skipped or narrowed, and why.
        timings: seconds per section (not saved in results.json).
    """

    def __init__(self, *, results: dict[str, Any], config: dict[str, Any], task_info: dict[str, Any],
                 task_pairs: list[dict[str, str]], graph: Any = None, edges_tested: pd.DataFrame | None = None,
                 hydra: dict[str, float] | None = None, agreement: Any = None, notes: list[str] | None = None,
                 timings: dict[str, float] | None = None, model_info: dict[str, Any] | None = None) -> None:
        self.results = dict(results)
        self.config = dict(config)
        self.task_info = dict(task_info)
        self.task_pairs = list(task_pairs)
        self.graph = graph
        self.edges_tested = edges_tested if edges_tested is not None else pd.DataFrame()
        self.hydra = dict(hydra or {})
        self.agreement = agreement
        self.notes = list(notes or [])
        self.timings = dict(timings or {})
        self.model_info = dict(model_info or {})
        self._table: pd.DataFrame | None = None
        self._contrib: pd.DataFrame | None = None

    # ------------------------------------------------------------------ views
    @property
    def provenance(self) -> dict[str, Any]:
        """Model, task, corruption, ablation value, metric, scale, n, seed, version (from the self-repair run)."""
        p = dict(self.results["self_repair"].provenance)
        p["direction"] = "ablation (clean run); patching: denoise and noise"
        p["components"] = self.config["components"]
        return p

    @property
    def baseline(self) -> dict[str, float]:
        """Mean clean and corrupted metric, their gap, accuracies, and the scale the verdict rule reads TE and
        DE lost against (:func:`~hydra_probe.claims.verdict_scale`), from the denoising result's frame."""
        g = self.results["patch_denoise"].to_frame().drop_duplicates("prompt")
        clean, corr = _clean_corrupted(g)
        return {"clean_metric": clean, "corrupted_metric": corr, "gap": clean - corr,
                "clean_accuracy": float((g["clean_metric"] > 0).mean()),
                "corrupted_accuracy": float((g["corrupted_metric"] > 0).mean()),
                "verdict_scale": verdict_scale(clean, corr)}

    def to_frame(self) -> pd.DataFrame:
        """The per-component triangulation table (one row per component, ranked by importance).

        Columns: ``component``, ``layer``, ``head``, ``kind``, ``direct_effect``
        (clean, frozen scale) with ``_lo``/``_hi``; ``total_effect`` (single
        ablation) with interval; ``de_lost``; ``self_repair`` with interval;
        ``norm_term``; ``fraction_repaired`` (= SR / DE lost);
        ``de_lost_top``, ``self_repair_top``, ``fraction_repaired_top``: the
        same on the quarter of prompts where the component's clean DE is
        highest (self-repair concentrates there);
        ``lower_bound`` (self-repair positive beyond its interval: the total
        effect understates the role); ``q_self_repair`` (BH);
        ``compensators`` (who supplied the repair, strongest first, at most
        three: downstream components or NORM with positive ΔDE and BH
        q < 0.05, or whose edge a paired ablation confirmed);
        ``restoration`` (denoising score) and ``damage`` (noising score)
        with intervals; ``attribution`` (estimate / gap, comparable with
        restoration); ``confirmed_backups`` (compensators a paired ablation
        confirmed), ``iterated_cost`` (the cost of removing the iterated
        ablation's target once its compensators are ablated too; NaN for
        other components) and ``iterated_backups`` (those compensators);
        ``te_norm``, ``del_norm`` (TE and DE lost / the verdict scale,
        ``baseline["verdict_scale"]``); ``importance`` (the largest of
        |te_norm|, |del_norm|, |restoration|, |damage|); the rule's
        ``necessity``, ``restoring``, ``backed_up``, ``masked``; ``verdict``
        and ``backups`` (the backups behind a "masked" verdict, with their
        evidence). See :data:`VERDICT_RULE`. ``measured``: which of
        :data:`MEASUREMENTS` were swept exactly for the component ("denoise,
        noise, ablation" with ``exact="all"``; with ``"auto"`` a measurement its
        estimate rules out is not made and its cells are NaN); ``exact``: all
        of them were.
        """
        if self._table is None:
            self._table = _assemble(self)
        return self._table.copy()

    def contribution_summary(self) -> pd.DataFrame:
        """``SelfRepair.contribution_summary()`` of the self-repair result (computed once, then cached)."""
        if self._contrib is None:
            self._contrib = self.results["self_repair"].contribution_summary()
        return self._contrib.copy()

    def top_components(self, k: int | None = None) -> list[str]:
        """The ``k`` (default: ``config['top']``) most important components."""
        k = self.config["top"] if k is None else k
        return list(self.to_frame()["component"].head(k))

    def summary(self) -> str:
        """Plain-text key findings: baseline, Hydra slope, and one sentence per top component."""
        return findings_text(self)

    def __repr__(self) -> str:
        p = self.provenance
        return (f"TriangulationReport(model={p.get('model')!r}, task={p.get('task')!r}, "
                f"corruption={p.get('corruption')!r}, n={p.get('n')}, components={len(self.to_frame())}, "
                f"sections={list(self.results)})")

    # ------------------------------------------------------------------ I/O
    def save(self, folder: Any, overwrite: bool = False, *, figures: bool = True) -> Any:
        """Write the report folder atomically: report.md, report.html, results.json, tables/*.csv,
        graph/ exports and figures/*.png|svg. A non-empty ``folder`` needs ``overwrite=True``
        (else :class:`~hydra_probe.errors.OutputError`, and nothing is written). Returns the folder path."""
        return save_report(self, folder, overwrite=overwrite, figures=figures)

    @classmethod
    def load(cls, folder: Any) -> TriangulationReport:
        """Read a report folder's ``results.json`` back (result objects, graph, config)."""
        return cls(**read_report(folder))


#: Self-repair concentrates on the prompts where a component matters most: the table also reports it on
#: this top fraction of prompts by clean direct effect.
TOP_FRACTION = 0.25


def _assemble(rep: TriangulationReport) -> pd.DataFrame:
    """The per-component table: the results' summaries, joined and classified by :func:`verdict_table`."""
    r = rep.results
    de = r["direct_effects"]
    t = verdict_table(
        components=de.to_frame().drop_duplicates("component")[["component", "layer", "head", "kind"]],
        direct=de.summary(), self_repair=r["self_repair"].summary(),
        self_repair_top=r["self_repair"].summary(top_fraction=TOP_FRACTION),
        contributions=rep.contribution_summary(), denoise=r["patch_denoise"].summary(),
        noise=r["patch_noise"].summary(), baseline=rep.baseline, threshold=float(rep.config["threshold"]),
        attribution=r["attribution"].to_frame(),
        edges_tested=rep.edges_tested,
        iterated=r["iterated_ablation"].summary() if "iterated_ablation" in r else None)
    sweeps = exact_sweeps(rep.config)
    made = [[k for k in MEASUREMENTS if sweeps is None or c in sweeps[k]] for c in t["component"]]
    t["measured"] = [", ".join(m) for m in made]
    t["exact"] = [len(m) == len(MEASUREMENTS) for m in made]
    return t


def exact_sweeps(config: dict[str, Any]) -> dict[str, set[str]] | None:
    """Per measurement (:data:`MEASUREMENTS`), the components a report swept exactly; None: every one
    (``exact="all"``). Reports saved before measurements were swept one by one list ``exact_components`` only,
    each swept in every measurement."""
    if config.get("exact") != "auto":
        return None
    got = config.get("exact_sweeps")
    if got is None:
        return {k: set(config.get("exact_components", [])) for k in MEASUREMENTS}
    return {k: set(got.get(k, [])) for k in MEASUREMENTS}


# ---------------------------------------------------------------------- main entry
@public
@shared_runs()  # the analyses share one runner: each unedited run (and its captures) is computed once
def triangulate(model: Any, task: Any, *, value: Any = "mean", scale: str = "frozen", metric: Any = "logit_diff",
                components: Any = "heads", top: int = 5, seed: int = 0, threshold: float = 0.1,
                graph_threshold: float | None = None, graph_top_k: int = 5, iterate: int = 3,
                progress: bool | None = None, mechanisms: bool = True, exact: str = "auto") -> TriangulationReport:
    """Run every analysis on ``model`` and ``task`` and return a :class:`TriangulationReport`.

    Args:
        model: a model wrapper (``hp.load_model``) or anything ``load_model`` takes.
        task: a :class:`~hydra_probe.tasks.Task` (its corruption defines the
            patching runs).
        value: ablation value (``"zero"``, ``"mean"``, ``"resample"`` or a reference Task).
        scale: final-norm scale policy (``"frozen"`` or ``"recomputed"``).
        metric: a linear metric (``"logit_diff"`` or ``"logit"``): direct
            effects and self-repair need one.
        components: the components triangulated (``"heads"``, ``"mlps"``,
            ``"layers"``, ``"all"`` or names).
        top: how many of the most important components get the expensive
            follow-ups (path patching, paired confirmations, figures).
        seed: seeds resample donors (the task has its own seed).
        threshold: the verdict threshold t: TE and DE lost are compared with
            t x the verdict scale (the clean metric, see :data:`VERDICT_RULE`),
            restoration and damage (shares of the gap) with t.
        graph_threshold: keep compensation edges with ``|weight|`` above this
            (default: 0.5 % of ``|gap|``); ``graph_top_k`` per ablated component.
        iterate: compensators added in the iterated ablation of the most
            self-repaired component.
        progress: step messages and progress bars on stderr (default: on a terminal).
        exact: ``"auto"`` (default) first estimates both patching directions with AtP*
            (``attribution_patch(method="atp*")``) and each component's ablation total effect
            (``attribution_ablate(value=value)``, AtP* too), then makes each exact measurement (activation
            patching denoise, noise; the ablation with self-repair and mechanisms) only where its own estimate
            (for the ablation, with the clean direct effect) cannot rule it out, and every measurement of the
            ``top`` components with the largest estimates (see :func:`_exact_plan`). ``to_frame()`` says which
            were made (``measured``; ``exact``: all of them); a measurement not made leaves its columns NaN and
            reads below the threshold, a component with none reads "agree: minor"; the lists are in
            ``config["exact_sweeps"]`` and the bound on what could be missed in ``config["exact_bound"]``,
            printed in the report. ``"all"`` makes every measurement of every component (the exhaustive run).
            The graph, paired and iterated ablation and "Why it repairs" see only the ablated components
            (their downstream compensators are every component).
        mechanisms: run "Why it repairs" (:func:`~hydra_probe.effects.repair_mechanisms` over the
            components, the per-layer regression, and the neurons of the most compensating MLP);
            on every backend, also remotely (a family whose attention weights cannot be read is skipped with
            a note).
    """
    model = as_model(model)
    check_scale(scale)
    vname = value_name(value)
    m = get_metric(metric)
    if not m.linear:
        raise MetricError(f"the triangulation report needs a metric linear in the logits (direct effects and "
                          f"self-repair are defined for it); {m.name!r} is not. Use metric='logit_diff' or 'logit'.")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise OptionError(f"top must be a positive integer; got {top!r}.")
    if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
        raise OptionError(f"threshold must be a fraction in (0, 1) (of the verdict scale for TE and DE lost, "
                          f"of the clean - corrupted gap for restoration and damage); got {threshold!r}.")
    if not isinstance(exact, str) or exact not in ("auto", "all"):
        raise OptionError(f"exact must be 'auto' (the default: exact sweeps only over the components that AtP* and "
                          f"the direct effects cannot rule out) or 'all' (every component); got {exact!r}.")
    if isinstance(iterate, bool) or not isinstance(iterate, (int, np.integer)) or iterate < 0:
        raise OptionError(f"iterate must be an integer >= 0; got {iterate!r}.")
    comps = select(model, components)
    if any(c.kind == "resid" for c in comps):
        raise ComponentError("the report triangulates heads, MLPs or attention layers; RESID positions are not "
                             "ablatable components. Use components='heads', 'mlps', 'layers' or 'all'.")
    names = [c.name for c in comps]
    check_task(model, task)
    make_runner(model, task, metric, value, seed)  # validates value, metric and resample donors; runs nothing

    steps = Steps(total=9 if mechanisms else 8, enabled=progress)
    bars = progress
    results: dict[str, Any] = {}
    notes: list[str] = []
    kw = dict(metric=metric)

    with steps.step("direct_effects", "direct effects"):
        results["direct_effects"] = direct_effects(model, task, names, scale=scale, **kw)
    sweeps, bound = {k: names for k in MEASUREMENTS}, ""
    if exact == "auto":
        with steps.step("attribution", "attribution (AtP*: both patching directions and the ablation; which "
                        "measurements to sweep)"):
            results["attribution"] = attribution_patch(model, task, components=names, direction="denoise",
                                                       method="atp*", **kw)
            # on the local backend its clean-run gradients are handed to the noising direction (one pass)
            results["attribution_ablation"] = attribution_ablate(model, task, names, value=value, seed=seed, **kw)
            results["attribution_noise"] = attribution_patch(model, task, components=names, direction="noise",
                                                             method="atp*", **kw)
        sweeps, bound = _exact_plan(results["direct_effects"].summary(), results["attribution"].to_frame(),
                                    results["attribution_noise"].to_frame(), float(threshold), int(top), vname,
                                    results["attribution_ablation"].to_frame())
    # exact="auto": after each sweep, the cut is checked on the swept components (.exact_check) and the sweep
    # widened where AtP* fell short there by more than the cut allows
    est = (_plan_shares(results["direct_effects"].summary(), results["attribution"].to_frame(),
                        results["attribution_noise"].to_frame(), results["attribution_ablation"].to_frame())
           if exact == "auto" else None)
    checks: dict[str, dict[str, Any]] = {}

    def checked(k: str, result: Any, run: Callable[[list[str]], Any], shares: Callable[[Any], pd.Series]) -> Any:
        """``result`` of measurement ``k`` over ``sweeps[k]``, widened by :mod:`.exact_check` (``run``: the sweep
        of more components; ``shares``: a result's exact shares)."""
        if est is None:
            return result
        added: list[str] = []
        while True:
            short, who = largest_shortfall(est[k], shares(result), float(threshold))
            more = widened(est[k], sweeps[k], float(threshold), short) if short > 1 - RULE_OUT else []
            if not more:
                break
            result = concat_results(result, run(more), names)
            sweeps[k] = [c for c in names if c in set(sweeps[k]) | set(more)]
            added += more
        checks[k] = {"shortfall": short, "component": who, "added": [c for c in names if c in set(added)]}
        return result

    for k, label in (("denoise", "clean -> corrupted"), ("noise", "corrupted -> clean")):
        with steps.step(f"patch_{k}", f"activation patching, {k} ({label}) of {len(sweeps[k])} components"):
            results[f"patch_{k}"] = checked(k, activation_patch(model, task, sweeps[k], k, progress=bars, **kw),
                                            lambda more, k=k: activation_patch(model, task, more, k, progress=bars,
                                                                               **kw), patching_shares)

    # with "Why it repairs", one sweep serves both: repair_mechanisms runs self_repair's ablated forwards (with
    # eager attention; its self-repair equals self_repair's to float32 rounding) and the section reuses it
    pre_mech = None
    one_sweep = mechanisms and skip_note(model) is None and not any(c.startswith("ATTN") for c in names)
    signed = 1.0
    if est is not None:
        signed = verdict_scale(*_clean_corrupted(results["attribution"].to_frame())) or 1.0

    with steps.step("self_repair", f"ablation ({vname}) and self-repair of {len(sweeps['ablation'])} components"):
        sweep = repair_mechanisms if one_sweep else self_repair

        def ablate_more(more: list[str]) -> Any:
            return sweep(model, task, more, value=value, scale=scale, seed=seed, progress=bars, **kw)

        got = checked("ablation", ablate_more(sweeps["ablation"]), ablate_more,
                      lambda r: ablation_shares(r.as_self_repair() if one_sweep else r, signed))
        if one_sweep:
            pre_mech = got
            results["self_repair"] = got.as_self_repair()
        else:
            results["self_repair"] = got
    swept = sweeps["ablation"]
    if exact == "all":
        with steps.step("attribution", "attribution patching (estimate)"):
            results["attribution"] = attribution_patch(model, task, components=names, direction="denoise", **kw)
    agreement = results["attribution"].agreement(results["patch_denoise"])

    cfg = {"value": vname if isinstance(value, str) else f"mean over {getattr(value, 'name', 'reference')}",
           "scale": scale, "metric": m.name, "components": components if isinstance(components, str) else names,
           "top": int(top), "seed": int(seed), "threshold": float(threshold), "graph_top_k": int(graph_top_k),
           "iterate": int(iterate), "mechanisms": bool(mechanisms), "exact": exact}
    if exact == "auto":
        if any(c["added"] for c in checks.values()):  # widened: the bound counts what was swept in the end
            bound = _bound_text(sweeps, names, float(threshold), min(int(top), len(names)), vname, True)
        bound += " " + check_text(checks, 1 - RULE_OUT)
        cfg.update(exact_components=[c for c in names if any(c in v for v in sweeps.values())],
                   exact_sweeps={k: list(v) for k, v in sweeps.items()}, exact_bound=bound, exact_check=checks)
        notes.append(f"exact sweeps: {bound}")
    rep = TriangulationReport(results=results, config=cfg, task_info=_task_info(task), task_pairs=list(task.pairs),
                              agreement=agreement, notes=notes, model_info=_model_info(model))
    gap = rep.baseline["gap"]
    cfg["graph_threshold"] = float(0.005 * abs(gap) if graph_threshold is None else graph_threshold)
    rep.config = cfg
    table = rep.to_frame()
    top_names = list(table["component"].head(top))

    with steps.step("graph", "compensation graph and paired-ablation confirmations"):
        G = compensation_graph(results["self_repair"], threshold=cfg["graph_threshold"], top_k=graph_top_k)
        ver = verify_edges(model, task, G, top=top, value=value, metric=metric, progress=bars)
        graph, tested = ver.graph, ver.tested
        if ver.paired is not None:
            results["paired_ablation"] = ver.paired
        else:
            notes.append("paired ablation: the graph has no compensation edge to confirm.")

    with steps.step("iterated_ablation", "iterated ablation of the most self-repaired component"):
        target, comp_list, why = _iteration_plan(table, graph, iterate, rep.contribution_summary())
        if target is None:
            notes.append(f"iterated ablation: skipped ({why}).")
        else:
            results["iterated_ablation"] = iterated_ablation(model, task, target, comp_list, value=value,
                                                             seed=seed, scale=scale, progress=bars, **kw)
            if why:
                notes.append(f"iterated ablation: {why}.")

    with steps.step("path_patch", f"path patching of the top {len(top_names)} components"):
        # two receiver sets per sender: the logits alone (the direct path) and every head and MLP
        # (all indirect paths through downstream components)
        results["path_patch"] = path_patch(model, task, senders=top_names, receivers=[["logits"], ["all"]],
                                           direction="noise", scale=scale, progress=bars, **kw)

    if mechanisms:
        with steps.step("why_it_repairs", f"why it repairs: mechanisms of self-repair of {len(swept)} components"):
            mech, why = mechanism_step(model, task, components=swept, top=top_names, value=value, scale=scale,
                                       metric=metric, seed=seed, progress=bars, mech=pre_mech)
            results.update(mech)
            notes.extend(why)
            if graph is not None and "repair_mechanisms" in mech:
                graph = add_mechanisms(graph, mech["repair_mechanisms"])

    hydra = hydra_slope(results["self_repair"])
    rep.results, rep.graph, rep.edges_tested, rep.hydra, rep.notes = dict(results), graph, tested, hydra, notes
    rep.timings = steps.timings
    rep._table = None
    return rep


#: ``exact="auto"`` rules a measurement out when its estimate (AtP* restoration or damage; the ablation's AtP* total
#: effect and the clean direct effect) is below this share of the threshold (the rest is the margin for its error).
RULE_OUT = 0.5


def _exact_plan(direct: pd.DataFrame, denoise: pd.DataFrame, noise: pd.DataFrame, threshold: float,
                top: int, value: str = "mean", ablation: pd.DataFrame | None = None
                ) -> tuple[dict[str, list[str]], str]:
    """Which measurements ``exact="auto"`` sweeps exactly, for which components: (``{"denoise": names, "noise":
    names, "ablation": names}`` in component order, the stated bound).

    ``direct``: ``DirectEffects.summary()`` (clean run); ``denoise``, ``noise``: AtP* ``to_frame()`` of each
    direction (with ``clean_metric`` and ``corrupted_metric``); ``value``: the ablation value's name (for the
    text); ``ablation``: ``attribution_ablate(...).to_frame()`` (AtP* of the ablation's total effect; None:
    not estimated). Each measurement is ruled out by its own estimate, as a share (:func:`_plan_shares`):
    activation patching, denoise, by |mean AtP* denoise| / |gap| (estimated restoration); noise by |mean AtP*
    noise| / |gap| (estimated damage); the ablation (TE, DE lost, self-repair) by the larger of mean AtP* ablation
    TE / verdict scale (signed: a TE against the scale's side is never necessity) and |mean clean DE| / |verdict
    scale|. Swept: a measurement whose share is at least ``RULE_OUT * threshold``, and every measurement of the
    ``top`` components with the largest shares (over all four) whatever they are. A measurement not swept reads
    below the threshold, which is all the verdict rule asks of it (R reads restoration and damage; N, L, M and B
    the ablation). The ablation estimate covers TE, including what a component costs through downstream paths
    the corruption does not move; the direct effect covers DE lost (a component masked by self-repair has a
    small TE but a large DE lost, which is its clean DE under zero ablation: DE lost = DE - the DE of the ablation
    value); AtP*'s GradDrop keeps components whose direct and indirect paths cancel. The report then checks the
    cut on the swept components (:mod:`.exact_check`) and sweeps more where AtP* fell short there.
    """
    shares = _plan_shares(direct, denoise, noise, ablation)
    cut = RULE_OUT * threshold
    first = set(pd.concat(list(shares.values()), axis=1).max(axis=1)
                .sort_values(ascending=False, kind="stable").index[:top])
    den = shares["denoise"]
    plan = {k: [c for c in den.index if c in first or s.get(c, 0.0) >= cut] for k, s in shares.items()}
    return plan, _bound_text(plan, list(den.index), threshold, min(top, len(den)), value, ablation is not None)


def _plan_shares(direct: pd.DataFrame, denoise: pd.DataFrame, noise: pd.DataFrame,
                 ablation: pd.DataFrame | None) -> dict[str, pd.Series]:
    """:func:`_exact_plan`'s estimated shares per measurement (``"denoise"``, ``"noise"``, ``"ablation"``), by
    component in the order of ``denoise``."""
    clean, corr = _clean_corrupted(denoise)
    gap, signed = abs(clean - corr) or 1.0, verdict_scale(clean, corr) or 1.0
    scale = abs(signed)
    den = denoise.groupby("component", sort=False)["estimate"].mean().abs() / gap
    noi = noise.groupby("component", sort=False)["estimate"].mean().abs() / gap
    abl = (direct.set_index("component")["direct_effect"].abs() / scale).reindex(den.index)
    if ablation is not None:  # TE counts toward necessity on the side of the scale only (VERDICT_RULE's N)
        te = (ablation.groupby("component", sort=False)["estimate"].mean() / signed).reindex(den.index)
        abl = pd.concat([abl, te], axis=1).max(axis=1)
    return {"denoise": den, "noise": noi, "ablation": abl}


def _clean_corrupted(frame: pd.DataFrame) -> tuple[float, float]:
    """The mean clean and corrupted metric of a per-prompt frame (``prompt``, ``clean_metric``,
    ``corrupted_metric``; each prompt counted once)."""
    g = frame.drop_duplicates("prompt")
    return float(g["clean_metric"].mean()), float(g["corrupted_metric"].mean())


def _bound_text(plan: dict[str, list[str]], names: list[str], threshold: float, top: int, value: str,
                estimated: bool) -> str:
    """The stated bound of a plan (see :func:`_exact_plan`) over the components ``names``: what was swept, by
    which rule, and what could be missed. ``top``: the number of top components swept in every measurement;
    ``estimated``: the ablation side read AtP* of the ablation (else the clean direct effect alone)."""
    cut = RULE_OUT * threshold
    side = (f"AtP* estimate of its {value} ablation's total effect or clean direct effect" if estimated
            else "clean direct effect")
    rule = (f"each measurement of the {top} with the largest estimates, and otherwise activation patching "
            f"(denoise) where the AtP* restoration estimate reaches {cut:.3g} of the gap, (noise) where the AtP* "
            f"damage estimate does, and the {value} ablation (TE, DE lost, self-repair) where the {side} reaches "
            f"{cut:.3g} of the verdict scale (half the threshold {threshold:g})")
    every = [c for c in names if all(c in p for p in plan.values())]
    some = [c for c in names if any(c in p for p in plan.values())]
    n = len(names)
    if len(every) == n:
        return f"all {n} components swept exactly in every measurement: {rule}; none is estimated."
    counts = ", ".join(f"{len(plan[k])} {'ablated' if k == 'ablation' else f'patched ({k})'}" for k in MEASUREMENTS)
    miss = (f"only if AtP* misestimates its restoration or damage by more than {threshold - cut:.3g} of the gap or its "
            f"{value} ablation's total effect by more than {threshold - cut:.3g} of the verdict scale, or its DE lost "
            f"reaches {threshold:g} of the verdict scale through a {value} value with a large direct effect of its own."
            if estimated else
            f"only if AtP* misestimates its restoration or damage by more than {threshold - cut:.3g} of the gap, or its "
            f"{value} ablation costs {threshold:g} of the verdict scale through what its direct effect does not show "
            f"(indirect paths the corruption does not move, or a {value} value with a large direct effect of its own).")
    miss += (" Or if a paired ablation of the exhaustive run confirms a backup of it, however small its TE and DE "
             "lost: that run tests the strongest compensation edges of every component, this one those of the "
             "ablated ones.")
    none = n - len(some)
    rest = (f"The other {none} are estimated in every measurement and read 'agree: minor'. " if none > 1 else
            "The other one is estimated in every measurement and reads 'agree: minor'. " if none else "")
    return (f"{len(every)} of {n} components swept exactly in every measurement and {len(some) - len(every)} in "
            f"some ({counts}): {rule}. A measurement not swept reads below the threshold without being made (blank "
            f"cells). {rest}A component would read otherwise in the exhaustive run (exact='all') {miss}")


def _iteration_plan(table: pd.DataFrame, graph: Any, k: int,
                    contrib: pd.DataFrame) -> tuple[str | None, list[str], str]:
    """Pick the iterated ablation: (target, compensators, note).

    Target: the component with the largest self-repair that is significant (else merely positive) and has
    compensators. Compensators: from the verified graph (confirmed edges first, then untested ones); when no
    candidate has a graph edge, the downstream heads and MLPs with the largest positive mean ΔDE in the
    self-repair decomposition (``contrib``: ``SelfRepair.contribution_summary()``; NORM cannot be ablated).
    """
    if k == 0:
        return None, [], "iterate=0"
    cand = table[table["lower_bound"].eq(True)].sort_values("self_repair", ascending=False, kind="stable")
    if cand.empty:
        cand = table[table["self_repair"] > 0].sort_values("self_repair", ascending=False, kind="stable")
    if cand.empty:
        return None, [], "no component shows positive self-repair"
    for target in cand["component"]:
        if target not in graph:
            continue
        comps = compensators_of(graph, target, confirmed_only=True, k=k)
        if comps:
            return target, comps, ""
        comps = compensators_of(graph, target, confirmed_only=False, k=k)
        if comps:
            return target, comps, f"{target}'s compensators are graph edges not confirmed by paired ablation"
    for target in cand["component"]:
        g = contrib[(contrib["component"] == target) & ~contrib["downstream"].map(is_norm_row)
                    & (contrib["delta_de"] > 0)].sort_values("delta_de", ascending=False, kind="stable")
        if len(g):
            return (target, list(g["downstream"].head(k)),
                    f"{target}'s compensators are the downstream components with the largest positive ΔDE in "
                    "its self-repair decomposition (no graph edge of a self-repaired component passed the "
                    "graph threshold)")
    return None, [], "no self-repaired component has a downstream compensator"


def _task_info(task: Any) -> dict[str, Any]:
    return {"name": task.name, "corruption": task.corruption, "n": len(task), "seed": task.seed,
            "corruption_description": task.meta.get("corruption_description", "")}


def _model_info(model: Any) -> dict[str, Any]:
    return {"name": model.name, "family": model.family, "n_layers": model.n_layers, "n_heads": model.n_heads,
            "d_model": model.d_model}


__all__ = ["ANALYSES", "VERDICTS", "VERDICT_RULE", "TriangulationReport", "triangulate"]
