"""Does the claim survive another counterfactual? Every verdict across corruptions, ablation values and metrics.

A *condition* is one choice of corruption (how the corrupted prompts are
made), ablation value (``zero``, ``mean``, ``resample``) and metric. For each
condition and component, :func:`compare_conditions` measures

* the total effect of ablating the component with that value (clean run), and
  where the metric is linear in the logits the direct effect lost and the
  self-repair (frozen final-norm scale); for a non-linear metric (``logprob``,
  ``prob``, ...) these are undefined and left NaN (``linear`` is False and
  ``note`` says so);
* denoising restoration and noising damage with that corruption;
* the verdict, by :func:`hydra_probe.claims.verdicts.classify` (the rule of
  the report), and the verdict each patching direction alone would give.

The numbers of a cell are those of the single-condition analyses
(``self_repair`` or ``ablate``, ``activation_patch`` in both directions) run
on their own with that corruption, value and metric. Work is shared where the
runner allows: clean prompts are the same for every corruption, so their
unedited forwards and means are computed once per prompt family
(``Runner.share_clean_runs``), each ablation value is run once (all values in
one stacked sweep), each corruption's patching once per direction (its
corrupted forwards are the only new unedited runs), and every metric is read
from the same forwards (a further linear metric needs its own readout, so its
ablations run again).

Prompt families: pass a mapping ``{name: task}`` (or use
:func:`compare_tasks`); the family is then one more factor of the summary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..checks import public
from ..components import select, select_groups
from ..effects.ablation import Ablation, ablation_copies
from ..effects.common import as_model, check_scale, check_task, check_writers, make_runner
from ..effects.patching import ActivationPatch, check_separable
from ..effects.self_repair import SelfRepair, decompose
from ..errors import MetricError, OptionError, TaskError
from ..interventions import ABLATION_VALUES, interventions_for
from ..metrics import Metric, get_metric
from ..results import Result, package_version
from ..tasks.ioi import CORRUPTIONS as IOI_CORRUPTIONS
from .verdicts import VERDICTS, classify, verdict_scale

#: The factors a condition is made of, in the order they vary in the frame.
FACTORS = ("family", "corruption", "value", "metric")

#: Every corruption some built-in task family can make (a task can always use its own).
KNOWN_CORRUPTIONS = tuple(IOI_CORRUPTIONS)

_NONLINEAR_NOTE = ("{metric} is not linear in the logits: direct effect lost and self-repair are undefined "
                   "(NaN) and the verdict rests on total effect, restoration and damage")


class ConditionComparison(Result):
    """One row per component x condition (family, corruption, value, metric).

    Columns: ``component``, ``family``, ``corruption``, ``value``,
    ``metric``, ``linear``; ``total_effect`` (metric units, clean minus
    ablated) with ``_lo``/``_hi`` (95% t interval across prompts);
    ``de_lost``, ``self_repair`` with intervals and ``lower_bound`` (NaN /
    False where the metric is not linear); ``restoration`` (denoising score)
    and ``damage`` (noising score), shares of the gap, with intervals;
    ``clean_metric``, ``corrupted_metric``, ``gap`` (means) and
    ``verdict_scale`` (what TE and DE lost are compared with, see
    :func:`~hydra_probe.claims.verdicts.verdict_scale`); ``confirmed_backups``,
    ``iterated_cost``, ``iterated_backups`` where ``backups=`` gave them;
    ``necessity``, ``restoring``, ``backed_up``, ``masked``, ``verdict``,
    ``backups`` (the report's rule, :func:`~hydra_probe.claims.verdicts.classify`);
    ``verdict_denoise`` / ``verdict_noise`` (the verdict with only one
    patching direction as restoration-style evidence); ``note``.

    :meth:`per_prompt` gives the per-prompt frames; :meth:`summary` one row
    per component; :meth:`sentences` one sentence per component.
    """

    kind = "conditions"

    #: In memory only (not saved): the per-condition result objects, keyed ``(family, value, metric)``
    #: (SelfRepair or Ablation) and ``(family, corruption, metric, direction)`` (ActivationPatch).
    results: Mapping[tuple, Result] = MappingProxyType({})

    def per_prompt(self, which: str = "ablation") -> pd.DataFrame:
        """Per-prompt frames: ``"ablation"`` (``component``, ``family``, ``value``, ``metric``,
        ``prompt``, ``clean_metric``, ``ablated_metric``, ``total_effect`` and, for linear metrics,
        ``clean_de``, ``de_lost``, ``self_repair``, ``norm_term``) or ``"patching"`` (``component``,
        ``family``, ``corruption``, ``metric``, ``direction``, ``prompt``, ``patched_metric``,
        ``clean_metric``, ``corrupted_metric``)."""
        if which not in ("ablation", "patching"):
            raise OptionError(f"per_prompt takes 'ablation' or 'patching'; got {which!r}.")
        return self.extras[which].copy()

    @property
    def reference(self) -> dict[str, str]:
        """The reference condition (the first of each factor as given): its verdict is the claim."""
        return dict(self.provenance["reference"])

    def summary(self) -> pd.DataFrame:
        """One row per component: the reference verdict and how it fares across conditions.

        Columns: ``component``; ``verdict`` (under the reference condition);
        ``holds`` (conditions with that verdict) of ``n_conditions``;
        ``verdicts`` (each verdict and in how many conditions, most frequent
        first); ``disagree`` (not one verdict everywhere, counting the
        single-direction verdicts); ``factors`` (comma-separated: each factor
        such that two conditions differing only in it get different verdicts,
        and ``direction`` where denoising and noising alone disagree);
        ``changes`` (for each such factor, the verdict under each of its levels).
        """
        f = self._frame
        ref = self.reference
        varying = [k for k in FACTORS if f[k].nunique() > 1]
        rows = []
        for comp, g in f.groupby("component", sort=False):
            at_ref = g
            for k in FACTORS:
                at_ref = at_ref[at_ref[k] == ref[k]]
            claim = at_ref["verdict"].iloc[0] if len(at_ref) else g["verdict"].iloc[0]
            counts = Counter(g["verdict"])
            order = sorted(counts, key=lambda v: (-counts[v], VERDICTS.index(v) if v in VERDICTS else 99))
            factors, changes = [], []
            for k in varying:
                others = [o for o in FACTORS if o != k]
                split = g.groupby(others, sort=False)["verdict"].nunique()
                if (split > 1).any():
                    factors.append(k)
                    by = g.groupby(k, sort=False)["verdict"].agg(lambda s: "/".join(dict.fromkeys(s)))
                    changes.append(f"{k}: " + "; ".join(f"{lvl} → {v}" for lvl, v in by.items()))
            direction = bool((g["verdict_denoise"] != g["verdict_noise"]).any())
            if direction:
                factors.append("direction")
                d = g[g["verdict_denoise"] != g["verdict_noise"]].iloc[0]
                changes.append(f"direction: denoise → {d['verdict_denoise']}; noise → {d['verdict_noise']}")
            rows.append({"component": comp, "verdict": claim, "holds": int((g["verdict"] == claim).sum()),
                         "n_conditions": len(g), "verdicts": ", ".join(f"{v} ({counts[v]})" for v in order),
                         "disagree": len(counts) > 1 or direction, "factors": ", ".join(factors),
                         "changes": " | ".join(changes)})
        out = pd.DataFrame(rows)
        out.attrs["reference"] = ref
        return out

    def sentences(self, components: Sequence[str] | None = None) -> list[str]:
        """One sentence per component (default: all, in frame order): under which choices its claim holds."""
        f = self._frame
        s = self.summary().set_index("component")
        names = list(s.index) if components is None else list(components)
        varying = [k for k in FACTORS if f[k].nunique() > 1]
        out = []
        for c in names:
            row = s.loc[c]
            g = f[f["component"] == c]
            claim, n = row["verdict"], int(row["n_conditions"])
            holds = g["verdict"] == claim
            if holds.all():
                text = f"{c}: \"{claim}\" under every condition ({_levels_text(g, varying)}; {n} in all)"
                if row["disagree"]:  # only the patching direction changes it
                    text += f"; {row['changes'].split(' | ')[-1]} (one direction alone)"
                out.append(text + ".")
                continue
            parts = [f"{c}: \"{claim}\" in {int(holds.sum())} of {n} conditions"]
            for k in varying:
                by = holds.groupby(g[k], sort=False)
                if by.all().all() or not by.any().any():
                    continue  # this factor alone decides nothing
                always = [str(lvl) for lvl, h in by if h.all()]
                never = [str(lvl) for lvl, h in by if not h.any()]
                if always:
                    parts.append(f"always with {k} {' or '.join(always)}")
                if never:
                    parts.append(f"never with {k} {' or '.join(never)}")
            other = [v for v in row["verdicts"].split(", ") if not v.startswith(claim + " (")]
            if other:
                parts.append(f"otherwise {', '.join(other)}")
            if row["factors"]:
                parts.append(f"changed by {row['factors']}")
            out.append("; ".join(parts) + ".")
        return out

    def top_components(self, k: int = 10) -> list[str]:
        """The ``k`` most important components under the reference condition (importance as in the report: the
        largest of |TE| / scale, |DE lost| / scale, |restoration|, |damage|)."""
        f = self._frame
        for key, lvl in self.reference.items():
            f = f[f[key] == lvl]
        sc = f["verdict_scale"]
        imp = pd.concat([(f["total_effect"] / sc).abs(), (f["de_lost"] / sc).abs(),
                         f["restoration"].abs(), f["damage"].abs()], axis=1).max(axis=1)
        order = imp.sort_values(ascending=False, kind="stable").index
        return list(f.loc[order, "component"].head(k))

    def grid(self, components: Sequence[str] | None = None) -> pd.DataFrame:
        """Component x condition table of verdicts (columns ``family/corruption/value/metric``, varying parts only)."""
        f = self._frame
        varying = [k for k in FACTORS if f[k].nunique() > 1] or ["metric"]
        key = f[varying].astype(str).agg(" / ".join, axis=1)
        t = f.assign(condition=key).pivot_table(index="component", columns="condition", values="verdict",
                                                aggfunc="first", sort=False)
        cols = list(dict.fromkeys(key))
        t = t[cols]
        if components is not None:
            t = t.loc[list(components)]
        t.columns.name = " / ".join(varying)
        return t


def _levels_text(g: pd.DataFrame, varying: Sequence[str]) -> str:
    if not varying:
        return "one condition"
    return "; ".join(f"{k} {', '.join(map(str, dict.fromkeys(g[k])))}" for k in varying)


# ---------------------------------------------------------------------- arguments
def _as_list(x: Any, what: str) -> list:
    if isinstance(x, str):
        x = [x]
    try:
        items = list(x)
    except TypeError:
        raise OptionError(f"{what} must be a list; got {type(x).__name__} {x!r}.") from None
    if not items:
        raise OptionError(f"the list of {what} is empty; give at least one.")
    dup = [i for i, v in enumerate(items) if items.index(v) != i]
    if dup:
        raise OptionError(f"{what} lists {items[dup[0]]!r} twice; list each once.")
    return items


def corruptions_of(task: Any) -> tuple[str, ...]:
    """The corruptions ``task`` can make: its own, plus IOI's when it was built by ``tasks.ioi``."""
    own = (task.corruption,)
    if task.name == "ioi" and "names" in task.meta and "n_prompts" in task.meta:
        return own + tuple(c for c in IOI_CORRUPTIONS if c != task.corruption)
    return own


def check_corruptions(tasks: Mapping[str, Any], corruptions: Sequence[Any]) -> None:
    """Unknown names raise OptionError; names a task cannot make raise TaskError (nothing runs)."""
    own = {t.corruption for t in tasks.values()}
    for c in corruptions:
        if not isinstance(c, str) or (c not in KNOWN_CORRUPTIONS and c not in own):
            raise OptionError(f"unknown corruption {c!r}; known: {', '.join(KNOWN_CORRUPTIONS)} (IOI tasks), or a "
                              f"task's own ({', '.join(sorted(own))}).")
    for fam, t in tasks.items():
        can = corruptions_of(t)
        bad = [c for c in corruptions if c not in can]
        if bad:
            raise TaskError(
                f"the task {fam!r} ({'' if fam == t.name else t.name + ', '}corruption {t.corruption!r}) cannot make "
                f"the corruption "
                f"{', '.join(map(repr, bad))}: it has only {', '.join(map(repr, can))}"
                + (" (its corrupted prompts come with it, e.g. from a JSONL file)" if len(can) == 1 else "")
                + f". Pass corruptions={can!r}, or a task built by tasks.ioi."
            )


def remake(model: Any, task: Any, corruption: str) -> Any:
    """``task`` with the same clean prompts (same order) and ``corruption``'s corrupted prompts."""
    if corruption == task.corruption:
        return task
    from ..tasks.ioi import ioi

    full = ioi(model, n_prompts=task.meta["n_prompts"], corruption=corruption, seed=task.seed,
               names=task.meta["names"])
    where = {(p["clean"], p["answer"], p["alternative"]): i for i, p in enumerate(full.pairs)}
    idx = [where.get((p["clean"], p["answer"], p["alternative"])) for p in task.pairs]
    if any(i is None for i in idx):
        raise TaskError(f"cannot remake the task's prompts with corruption {corruption!r}: its clean prompts are "
                        "not those tasks.ioi draws for its seed and names. Build it with tasks.ioi.")
    out = full.subset(idx)
    out.meta = dict(task.meta, corruption_description=IOI_CORRUPTIONS[corruption])
    return out


def _check_values(values: Sequence[Any]) -> None:
    for v in values:
        if not isinstance(v, str) or v not in ABLATION_VALUES:
            raise OptionError(f"unknown ablation value {v!r}; choose from {', '.join(ABLATION_VALUES)}.")


# ---------------------------------------------------------------------- main entry
@public
def compare_conditions(model: Any, task: Any, components: Any = "heads",
                       corruptions: Sequence[str] | str = ("swap", "abc"),
                       values: Sequence[str] | str = ("zero", "mean", "resample"),
                       metrics: Sequence[Any] | str = ("logit_diff", "logprob"), seed: int = 0, *,
                       scale: str = "frozen", threshold: float = 0.1, backups: pd.DataFrame | None = None,
                       progress: bool | None = None) -> ConditionComparison:
    """Every component's evidence and verdict under every condition (corruption x value x metric).

    Args:
        model: a model wrapper (``hp.load_model``) or anything ``load_model`` takes.
        task: a :class:`~hydra_probe.tasks.Task`, or a mapping ``{family name: Task}`` of prompt
            families (each gets every condition; ``family`` becomes a factor).
        components: heads, MLPs or attention layers (``"heads"``, ``"mlps"``, ``"layers"``,
            ``"all"`` or names); each is ablated and patched on its own.
        corruptions: corruptions to patch with: ``"swap"``, ``"abc"`` (IOI tasks built by
            ``tasks.ioi``) or a task's own corruption (a JSONL task has only its own).
        values: ablation values, from ``"zero"``, ``"mean"``, ``"resample"``.
        metrics: metric names (or :class:`~hydra_probe.metrics.Metric` objects); DE lost and
            self-repair are given for the linear ones only.
        seed: seeds resample donors.
        scale: final-norm scale of DE lost and self-repair (``"frozen"`` or ``"recomputed"``).
        threshold: the verdict threshold t of the report's rule (:data:`~hydra_probe.claims.VERDICT_RULE`):
            TE and DE lost against t x each condition's own verdict scale, restoration and damage against t.
        backups: evidence measured once elsewhere (the report's paired and iterated ablations), to enter the
            rule's "backed up" where it applies: a frame with ``component``, ``value``, ``metric`` and any of
            ``confirmed_backups``, ``iterated_cost``, ``iterated_backups`` (as in the report's table); each row
            joins the cells of its value and metric (those ablations run on clean prompts, so every corruption
            and family). Without it, no cell is "backed up" by paired or iterated evidence.
        progress: progress bars on stderr (default: on a terminal).

    Every argument is checked, and every corrupted task made, before any forward pass. The
    reference condition (its verdict is "the claim" of :meth:`ConditionComparison.summary`) is
    the first family, corruption, value and metric.
    """
    model = as_model(model)
    check_scale(scale)
    tasks = dict(task) if isinstance(task, Mapping) else {getattr(task, "name", "task"): task}
    if not tasks:
        raise OptionError("the mapping of prompt families is empty; give at least one task.")
    for fam, t in tasks.items():
        if not isinstance(fam, str):
            raise OptionError(f"prompt family names must be strings; got {fam!r}.")
        check_task(model, t)
    corruptions = _as_list(corruptions, "corruptions")
    values = _as_list(values, "ablation values")
    metric_list = _as_list(metrics, "metrics")
    _check_values(values)
    ms: list[Metric] = [get_metric(m) for m in metric_list]
    if len({m.name for m in ms}) < len(ms):
        raise OptionError("two metrics share a name; list each metric once.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise OptionError(f"seed must be an integer; got {seed!r}.")
    if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
        raise OptionError(f"threshold must be a fraction of the clean - corrupted gap in (0, 1); got {threshold!r}.")
    if backups is not None and not {"component", "value", "metric"} <= set(getattr(backups, "columns", ())):
        raise OptionError("backups must be a DataFrame with columns component, value, metric and any of "
                          "confirmed_backups, iterated_cost, iterated_backups.")
    comps = select(model, components)
    if any(c.kind == "resid" for c in comps):
        check_writers(comps, "ablation")
    groups = select_groups(model, [c.name for c in comps])
    check_corruptions(tasks, corruptions)
    linear = [m for m in ms if m.linear]
    primary = linear[0] if linear else ms[0]
    plans = []
    for fam, t in tasks.items():
        by_c = {c: remake(model, t, c) for c in corruptions}
        # one runner per corruption (metric: the primary one); validates resample donors, runs nothing
        runners = {c: make_runner(model, tc, primary, "resample" if "resample" in values else None, seed, progress)[0]
                   for c, tc in by_c.items()}
        extra = {m.name: make_runner(model, by_c[corruptions[0]], m, None, seed, progress)[0]
                 for m in linear[1:]}
        plans.append((fam, by_c, runners, extra))

    results: dict[tuple, Result] = {}
    rows, abl_frames, patch_frames = [], [], []
    for fam, by_c, runners, extra in plans:
        r0 = runners[corruptions[0]]
        for r in [*list(runners.values())[1:], *extra.values()]:
            r.share_clean_runs(r0)  # the clean prompts are the same: only corrupted runs are new
        # baselines first: where a corruption does not move a metric, patching scores are undefined
        base, separable = {}, {}
        for c, r in runners.items():
            clean, corr = r.baseline("clean", readout=bool(linear) and c == corruptions[0]), r.baseline("corrupted")
            base[c] = (clean, corr)
            for m in ms:
                cm, km = (_metric_of(r, m, primary, o) for o in (clean, corr))
                try:
                    check_separable(cm.numpy(), km.numpy())
                    separable[(c, m.name)] = True
                except MetricError:
                    separable[(c, m.name)] = False
        abl = _ablations(model, fam, by_c[corruptions[0]], runners[corruptions[0]], extra, groups, values, ms,
                         primary, scale, seed, base[corruptions[0]][0])
        pat = _patching(model, fam, by_c, runners, comps, ms, primary, base)
        results.update(abl)
        results.update(pat)
        for (_, v, mname), res in abl.items():
            f = res.to_frame()
            keep = [k for k in ("component", "prompt", "clean_metric", "ablated_metric", "total_effect", "clean_de",
                                "de_lost", "self_repair", "norm_term") if k in f.columns]
            abl_frames.append(f[keep].assign(family=fam, value=v, metric=mname))
        for (_, c, mname, _d), res in pat.items():
            patch_frames.append(res.to_frame().assign(family=fam, corruption=c, metric=mname))
        summaries = {key: res.summary() for key, res in {**abl, **pat}.items()}
        for c in corruptions:
            for v in values:
                for m in ms:
                    rows.append(_cell(fam, c, v, m, summaries[(fam, v, m.name)],
                                      summaries[(fam, c, m.name, "denoise")], summaries[(fam, c, m.name, "noise")],
                                      pat[(fam, c, m.name, "denoise")], threshold, separable[(c, m.name)],
                                      _backups_for(backups, v, m.name)))
    frame = pd.concat(rows, ignore_index=True)
    ab = pd.concat(abl_frames, ignore_index=True)
    ab = ab[["component", "family", "value", "metric"] + [k for k in ab.columns
                                                          if k not in ("component", "family", "value", "metric")]]
    pt = pd.concat(patch_frames, ignore_index=True)
    pt = pt[["component", "family", "corruption", "metric", "direction", "prompt", "patched_metric",
             "clean_metric", "corrupted_metric"]]
    first = next(iter(tasks.values()))
    prov = {"model": model.name, "dtype": str(model.adapter.dtype).replace("torch.", ""),
            "task": {fam: t.name for fam, t in tasks.items()}, "families": list(tasks),
            "corruptions": list(corruptions), "values": list(values), "metrics": [m.name for m in ms],
            "components": components if isinstance(components, str) else [c.name for c in comps],
            "scale": scale, "seed": int(seed), "threshold": float(threshold), "backups": backups is not None,
            "n": {f: len(t) for f, t in tasks.items()},
            "task_seed": first.seed, "version": package_version(),
            "reference": {"family": next(iter(tasks)), "corruption": corruptions[0], "value": values[0],
                          "metric": ms[0].name},
            "shared": "clean forwards and means shared by all corruptions and metrics; ablation values stacked in "
                      "one sweep per family; every metric read from the same forwards (further linear metrics "
                      "re-run the ablations for their readout)"}
    out = ConditionComparison(frame, prov, {"ablation": ab, "patching": pt})
    out.results = results
    return out


def compare_tasks(model: Any, tasks: Mapping[str, Any], components: Any = "heads", **kw: Any) -> ConditionComparison:
    """:func:`compare_conditions` over prompt families ``{name: task}`` (``family`` is a factor)."""
    if not isinstance(tasks, Mapping):
        raise OptionError(f"compare_tasks takes a mapping {{family name: task}}; got {type(tasks).__name__}.")
    return compare_conditions(model, tasks, components, **kw)


# ---------------------------------------------------------------------- pieces
def _metric_of(runner: Any, m: Metric, primary: Metric, out: Any) -> torch.Tensor:
    """Metric ``m`` (n,) float64 of a run output, read from its final residual unless it is the runner's own."""
    return _metrics_of(runner, m, primary, [out])[0]


def _metrics_of(runner: Any, m: Metric, primary: Metric, outs: Sequence[Any]) -> list[torch.Tensor]:
    """Metric ``m`` of several run outputs (one unembedding for all): [(n,) float64]."""
    if m.name == primary.name:
        return [o.metric for o in outs]
    ad, task = runner.ad, runner.task
    n = len(task)
    with torch.no_grad():
        x = torch.cat([o.resid for o in outs]).to(ad.dtype).to(ad.device)
        k = len(outs)
        clean = runner.clean_logits().repeat(k, 1) if m.needs_clean else None
        a, b = (ids.repeat(k).to(ad.device) for ids in (task.answer_ids, task.alternative_ids))
        v = runner.metric_of(x, a, b, clean, metric=m)
    return list(v.detach().to(torch.float64).cpu().view(k, n))


def _provenance(model: Any, task: Any, m: Metric, **kw: Any) -> dict[str, Any]:
    from ..results import provenance

    return provenance(model, task, metric=m, **kw)


def _ablations(model, fam, task, runner, extra, groups, values, ms, primary, scale, seed, base) -> dict:
    """Per (family, value, metric): a SelfRepair (linear metric) or Ablation result; all values in one sweep."""
    copies = [c for v in values for c in ablation_copies(model, groups, v, None)]
    out: dict[tuple, Result] = {}
    n, G = len(task), len(groups)
    sweeps = {primary.name: (runner, base, runner.run("clean", copies, readout=primary.linear, label="ablations"))}
    for name, r in extra.items():
        b = r.baseline("clean", readout=True)
        sweeps[name] = (r, b, r.run("clean", copies, readout=True, label=f"ablations ({name})"))
    for vi, v in enumerate(values):
        for m in ms:
            r, b, outs = sweeps.get(m.name, sweeps[primary.name])
            outs_v = outs[vi * G:(vi + 1) * G]
            prov = _provenance(model, task, m, value=v, scale=scale if m.linear else None, seed=seed, positions=None)
            if m.linear:
                ro = r.readout
                main, con = [], []
                for g, o in zip(groups, outs_v):
                    fr, c = decompose(g, ro, parallel=model.parallel_residual, clean_run=b, ablated_run=o,
                                      scale=scale, softcap=model.adapter.softcap is not None)
                    main.append(fr)
                    con.append(c)
                out[(fam, v, m.name)] = SelfRepair(pd.concat(main, ignore_index=True), prov,
                                                   {"contributions": pd.concat(con, ignore_index=True)})
            else:
                clean = _metric_of(r, m, primary, b)
                rows = []
                for g, ab in zip(groups, _metrics_of(r, m, primary, outs_v)):
                    rows.append(pd.DataFrame({"component": g.name, "prompt": range(n), "clean_metric": clean.numpy(),
                                              "ablated_metric": ab.numpy(), "total_effect": (clean - ab).numpy()}))
                out[(fam, v, m.name)] = Ablation(pd.concat(rows, ignore_index=True), prov)
    return out


def _patching(model, fam, by_c, runners, comps, ms, primary, base) -> dict:
    """Per (family, corruption, metric, direction): an ActivationPatch result; each direction swept once."""
    out: dict[tuple, Result] = {}
    for c, r in runners.items():
        task = by_c[c]
        n = len(task)
        clean_o, corr_o = base[c]
        for direction, source, value in (("denoise", "corrupted", "clean"), ("noise", "clean", "corrupted")):
            copies = [interventions_for([comp], value, model.head_dim, None) for comp in comps]
            outs = r.run(source, copies, label=f"activation patch ({direction}, {c})")
            for m in ms:
                clean, corr = _metrics_of(r, m, primary, [clean_o, corr_o])
                rows = [pd.DataFrame({"component": comp.name, "prompt": range(n), "direction": direction,
                                      "patched_metric": pm.numpy(), "clean_metric": clean.numpy(),
                                      "corrupted_metric": corr.numpy()})
                        for comp, pm in zip(comps, _metrics_of(r, m, primary, outs))]
                prov = _provenance(model, task, m, direction=direction, positions=None)
                out[(fam, c, m.name, direction)] = ActivationPatch(pd.concat(rows, ignore_index=True), prov)
    return out


_CELL_COLUMNS = ("total_effect", "total_effect_lo", "total_effect_hi", "de_lost", "de_lost_lo", "de_lost_hi",
                 "self_repair", "self_repair_lo", "self_repair_hi", "lower_bound")


def _backups_for(backups: pd.DataFrame | None, value: str, metric: str) -> pd.DataFrame | None:
    """The rows of ``backups`` measured under ``value`` and ``metric`` (indexed by component), or None."""
    if backups is None:
        return None
    b = backups[(backups["value"] == value) & (backups["metric"] == metric)]
    cols = [k for k in ("confirmed_backups", "iterated_cost", "iterated_backups") if k in b.columns]
    return b.set_index("component")[cols] if len(b) and cols else None


def _cell(fam: str, c: str, v: str, m: Metric, s: pd.DataFrame, den: pd.DataFrame, noi: pd.DataFrame,
          patch: ActivationPatch, threshold: float, separable: bool = True,
          backups: pd.DataFrame | None = None) -> pd.DataFrame:
    """The rows of one condition from the summaries of its ablation (``s``) and patching results
    (``den``, ``noi``; ``patch`` gives the baselines), with ``backups`` evidence (indexed by component)
    where it applies: evidence per component and the verdicts."""
    t = pd.DataFrame({"component": s["component"]})
    for k in _CELL_COLUMNS:
        t[k] = s[k].to_numpy() if k in s.columns else (False if k == "lower_bound" else np.nan)
    t["lower_bound"] = t["lower_bound"].astype(bool)
    for summ, name in ((den, "restoration"), (noi, "damage")):
        sc = summ.set_index("component")
        for suffix in ("", "_lo", "_hi"):
            t[name + suffix] = t["component"].map(sc["score" + suffix]).to_numpy() if separable else np.nan
    g = patch.to_frame().drop_duplicates("prompt")
    clean, corr = float(g["clean_metric"].mean()), float(g["corrupted_metric"].mean())
    t["clean_metric"], t["corrupted_metric"], t["gap"] = clean, corr, clean - corr
    vs = verdict_scale(clean, corr)
    t["verdict_scale"] = vs
    if backups is not None:
        for k in backups.columns:
            t[k] = t["component"].map(backups[k]).to_numpy()
    v_all = classify(t, threshold, vs)
    v_den = classify(t.assign(damage=np.nan), threshold, vs)["verdict"]
    v_noi = classify(t.assign(restoration=np.nan), threshold, vs)["verdict"]
    for col in v_all.columns:
        t[col] = v_all[col]
    t["verdict_denoise"], t["verdict_noise"] = v_den, v_noi
    notes = [] if m.linear else [_NONLINEAR_NOTE.format(metric=m.name)]
    if not separable:
        notes.append(f"the corruption {c!r} leaves the mean {m.name} unchanged: restoration and damage are undefined "
                     "(NaN) and the verdict rests on the ablation")
    t["note"] = "; ".join(notes)
    t.insert(1, "family", fam)
    t.insert(2, "corruption", c)
    t.insert(3, "value", v)
    t.insert(4, "metric", m.name)
    t.insert(5, "linear", bool(m.linear))
    return t


__all__ = ["FACTORS", "KNOWN_CORRUPTIONS", "ConditionComparison", "compare_conditions", "compare_tasks",
           "corruptions_of", "remake"]
