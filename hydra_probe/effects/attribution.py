"""Attribution patching: a first-order estimate of activation patching for every component at once.

Nanda 2023; AtP*, Kramar et al. 2024. For a component c with activation a_c
(a head's slice of ``z``, a whole layer's ``z``, an MLP's output, or the
residual stream ``RESID{l}``), per prompt:

    denoise:  estimate = (a_c^clean - a_c^corr) . dm/da_c |corrupted run
    noise:    estimate = (a_c^corr - a_c^clean) . dm/da_c |clean run

summed over positions (all, or ``positions``) and the component's columns.
It estimates ``m(patched) - m(baseline)`` (baseline = corrupted for denoise,
clean for noise). Per length group it costs two forwards (clean and
corrupted) and one backward, for all components together. The gradient is
taken with respect to zero tensors added to the activations in hooks, so it
works when the parameters do not require gradients and leaves no ``.grad``
on them. Always an estimate: :meth:`AttributionPatch.agreement` compares it
with exact activation patching. With ``backend="nnsight"`` (also
``remote=True``) the gradient reads and AtP*'s QK fix run as nnsight traces
(one request per chunk), with the local numbers.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import pandas as pd
import torch

from ..checks import public
from ..components import Component, select
from ..errors import InputError, MetricError, OptionError
from ..interventions import ABLATION_VALUES, Direction, GradientRead, SenderChange, check_direction, site_of
from ..metrics import Metric
from ..models.sites import Site
from ..results import Result, provenance
from .common import SAME_CONDITIONS, as_model, check_same_conditions, make_runner, positions_of
from .patching import ActivationPatch, check_separable
from .path import normalised_summary

METHOD = "attribution (first-order estimate)"
METHOD_STAR = "AtP* (QK fix and GradDrop; estimate)"
AttributionMethod = Literal["atp", "atp*"]
"""How attribution patching estimates.

* ``"atp"``: the plain first-order estimate (Nanda 2023).
* ``"atp*"``: with the QK fix and GradDrop (Kramar et al. 2024; see the module doc).
"""
METHODS: tuple[str, ...] = get_args(AttributionMethod)


class AttributionPatch(Result):
    """Columns: ``component``, ``prompt``, ``estimate`` (first-order estimate of
    ``patched_metric - baseline_metric``), ``direction``, ``baseline_metric``,
    ``clean_metric``, ``corrupted_metric`` (and ``position`` for per-position
    residual rows, -1 meaning all positions)."""

    kind = "attribution_patch"

    @property
    def method_label(self) -> str:
        return METHOD_STAR if self.provenance.get("estimator") == "atp*" else METHOD

    @property
    def exact_agreement(self) -> dict[str, Any] | None:
        """The agreement with exact patching recorded when ``exact=`` was given (see :meth:`agreement`;
        without the ``disagreements`` frame), else None."""
        return self.provenance.get("agreement")

    def _keys(self) -> list[str]:
        return ["component", "position"] if "position" in self._frame.columns else ["component"]

    def summary(self) -> pd.DataFrame:
        """Per component: mean estimate and the *estimated* normalised score.

        ``score`` estimates restoration (denoise) or damage (noise) with the
        same normalisation as activation patching, from
        ``estimated patched metric = baseline_metric + estimate``. Labelled
        by the ``method`` column.
        """
        f = self._frame.copy()
        f["estimated_metric"] = f["baseline_metric"] + f["estimate"]
        out = normalised_summary(f, self._keys(), "estimated_metric")
        est = f.groupby(self._keys(), sort=False)["estimate"].mean().to_numpy()
        out.insert(len(self._keys()) + 2, "estimate", est)
        out["method"] = self.method_label
        out.attrs["score"] = ("estimated restoration (denoise) or damage (noise): a first-order (attribution "
                              "patching) estimate, normalised on the mean clean and corrupted metrics")
        return out

    def agreement(self, exact: ActivationPatch, top: int = 5, top_k: int = 5) -> dict[str, Any]:
        """Agreement of the estimates with exact activation patching of the same components under the same
        conditions (model, task, n, metric, direction: else :class:`InputError`).

        Per component (and position), the exact effect is the mean over
        prompts of ``patched_metric - baseline_metric`` and the estimate the
        mean estimate. Returns a dict: ``pearson``, ``spearman`` (NaN with
        fewer than two components or no spread), ``n_components``, and
        ``disagreements``: a frame of the ``top`` largest absolute
        differences with ``component``, ``estimate``, ``exact``,
        ``difference`` (= estimate - exact); ``top_k`` and ``recall``: how
        many of the ``top_k`` components of largest exact effect (absolute)
        the estimate ranks in its own top ``2 * top_k`` (by absolute value),
        and that count over ``top_k``.
        """
        from scipy import stats as sps

        if not isinstance(exact, ActivationPatch):
            raise InputError(f"agreement() compares with an ActivationPatch result; got {type(exact).__name__}.")
        check_same_conditions(self.provenance, exact.provenance, SAME_CONDITIONS,
                              "compare exact patching of the same model, task and metric.")
        e = exact.to_frame()
        d = self._frame["direction"].iloc[0]
        if e["direction"].iloc[0] != d:
            raise InputError(f"the exact patching ran in direction {e['direction'].iloc[0]!r} but the estimates in "
                             f"{d!r}; run both in the same direction.")
        keys = self._keys()
        if "position" in keys and "position" not in e.columns:
            e["position"] = -1
        base = e["corrupted_metric"] if d == "denoise" else e["clean_metric"]
        e["exact"] = e["patched_metric"] - base
        ex = e.groupby(keys, sort=False)["exact"].mean()
        est = self._frame.groupby(keys, sort=False)["estimate"].mean()
        both = pd.concat([est, ex], axis=1, join="inner").reset_index()
        if both.empty:
            raise InputError("the exact patching result has no component in common with the estimates; patch the "
                             "same components.")
        both["difference"] = both["estimate"] - both["exact"]
        if len(both) >= 2 and both["estimate"].std() > 0 and both["exact"].std() > 0:
            pearson = float(sps.pearsonr(both["estimate"], both["exact"])[0])
            spearman = float(sps.spearmanr(both["estimate"], both["exact"])[0])
        else:
            pearson = spearman = float("nan")
        dis = both.reindex(both["difference"].abs().sort_values(ascending=False).index).head(top)
        k = min(top_k, len(both))
        top_exact = set(both["exact"].abs().sort_values(ascending=False, kind="stable").index[:k])
        top_est = set(both["estimate"].abs().sort_values(ascending=False, kind="stable").index[:2 * k])
        hits = len(top_exact & top_est)
        return {"pearson": pearson, "spearman": spearman, "n_components": len(both),
                "disagreements": dis.reset_index(drop=True), "method": self.method_label,
                "top_k": k, "exact_top_k_in_top_2k": hits, "recall": hits / k if k else float("nan")}


def _site(c: Component, head_dim: int) -> tuple[Site, slice]:
    site, cols = site_of(c, head_dim)
    return site, slice(*cols) if cols else slice(None)


def _check_method(method: Any, metric: Metric, direction: str, exact: Any, of: str = "noising") -> None:
    """Refuse a bad method, a metric the estimate cannot use, or an unusable ``exact`` (before any work).
    ``of``: what the clean-run estimate estimates (``"noising"``, or ``"an ablation"``)."""
    if method not in METHODS:
        raise OptionError(f"unknown attribution method {method!r}; choose 'atp' (first-order estimate) or 'atp*' "
                          "(with the QK fix and GradDrop).")
    if metric.needs_clean and direction == "noise":
        alt = "direction='denoise' or " if of == "noising" else ""
        raise MetricError(f"metric {metric.name!r} is minimal at the clean run, so its gradient there is zero and a "
                          f"first-order estimate of {of} is zero for every component; use {alt}a linear metric such "
                          "as 'logit_diff'.")
    if method == "atp*" and not metric.linear:
        raise MetricError(f"AtP* compares the estimates of gradient paths (GradDrop), which add up only for a metric "
                          f"linear in the logits; {metric.name!r} is not. Use metric='logit_diff' (or 'logit'), or "
                          "method='atp'.")
    if exact is not None:
        if not isinstance(exact, ActivationPatch):
            raise InputError(f"exact= takes an ActivationPatch result (activation_patch(...)); got "
                             f"{type(exact).__name__}.")
        d = exact.to_frame()["direction"].iloc[0]
        if d != direction:
            raise InputError(f"the exact patching ran in direction {d!r} but the estimates are asked in "
                             f"{direction!r}; run both in the same direction.")


@public
def attribution_patch(model: Any, task: Any, components: Any = "heads", direction: Direction = "denoise", *,
                      method: AttributionMethod = "atp", exact: ActivationPatch | None = None, top_k: int = 5,
                      qk_fix: bool = True,
                      metric: Any = "logit_diff", positions: Any = None, per_position: bool | None = None,
                      progress: bool | None = None) -> AttributionPatch:
    """First-order estimates of activation patching for every component (see the module doc).

    ``components``: heads, ``ATTN{l}``, MLPs, ``RESID{l}`` or selectors
    (``"heads"``, ``"mlps"``, ``"layers"``, ``"resid"``, ``"all"``). With
    ``per_position`` (default when a residual component is asked for) each
    position gets its own row, with positions numbered as activation
    patching numbers them (from the end when prompt lengths differ).

    ``method``: ``"atp"`` (the plain first-order estimate) or ``"atp*"``
    (QK fix and GradDrop; needs a metric linear in the logits; residual
    components get GradDrop only). ``exact``: an :class:`ActivationPatch` of
    the same components and direction; the result then records the
    agreement (``result.exact_agreement``: rank correlation and how many of
    the exact ``top_k`` the estimate ranks in its top ``2 * top_k``).
    ``qk_fix=False`` (with ``"atp*"``): GradDrop alone, the softmax
    linearised as in plain AtP; it saves the QK fix (per component, the
    attention of every layer above it recomputed, up to its output
    projection's input, a head's change composed with the q/k
    projections: :meth:`Runner.qk_fix`). GradDrop's reads share one
    forward and backward (:meth:`Runner.gradients`).
    """
    model = as_model(model)
    check_direction(direction)
    comps = select(model, components)
    pos = positions_of(positions)
    runner, m = make_runner(model, task, metric, progress=progress, positions=pos)
    _check_method(method, m, direction, exact)
    star = method == "atp*"
    if not isinstance(qk_fix, bool):
        raise OptionError(f"qk_fix must be True or False; got {qk_fix!r}.")
    qk_on = star and qk_fix
    source, other = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    per_pos = any(c.kind == "resid" for c in comps) if per_position is None else per_position
    T_min = min(task.lengths)
    pos_list = list(range(-T_min, 0)) if per_pos and len(set(task.lengths)) > 1 else list(range(T_min))
    plan = [(c, p) for c in comps for p in pos_list] if per_pos and pos is None else [(c, None) for c in comps]
    label = f"{'AtP*' if star else 'attribution'} ({direction})"
    n = len(task)
    final, dropped, base_metric = estimates(runner, model, task, plan, source, other, pos, star, qk_on, label,
                                            changed_rows_only=True)  # the estimates read clean - corrupted differences
    clean_m = base_metric if source == "clean" else runner.baseline("clean").metric
    corr_m = base_metric if source == "corrupted" else runner.baseline("corrupted").metric
    check_separable(clean_m.numpy(), corr_m.numpy())
    rows = []
    for i, (c, p) in enumerate(plan):
        row = {"component": c.name, "prompt": range(n), "estimate": final[i].numpy(),
               "direction": direction, "baseline_metric": base_metric.numpy(),
               "clean_metric": clean_m.numpy(), "corrupted_metric": corr_m.numpy(),
               "position": -1 if p is None else p}
        if star:
            row["dropped_layer"] = dropped[i]
        rows.append(pd.DataFrame(row))
    frame = pd.concat(rows, ignore_index=True)
    if not per_pos:
        frame = frame.drop(columns="position")
    prov = provenance(model, task, metric=m, direction=direction, positions=None if pos is None else list(pos),
                      method=METHOD_STAR if star else METHOD,
                      **({"estimator": "atp*", "qk_fix": qk_fix} if star else {}))
    result = AttributionPatch(frame, prov)
    if exact is not None:
        ag = result.agreement(exact, top_k=top_k)
        result.provenance["agreement"] = {k: v for k, v in ag.items() if k != "disagreements"}
    return result


def estimates(runner: Any, model: Any, task: Any, plan: list[tuple[Component, int | None]], source: str, other: str,
              pos: tuple[int, ...] | None, star: bool, qk_on: bool, label: str, changed_rows_only: bool
              ) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """The first-order estimates of replacing each plan row's activation in the ``source`` run by its value in
    ``other`` (a run, or an ablation value: :meth:`Runner.ablated_prefix`): ``(final (P, n) float64, dropped
    layer per row (-1: none), the source run's metric (n,))``. ``star``: GradDrop (the largest mean magnitude
    over the reads that drop a layer above the row's, and no drop); ``qk_on``: the QK fix (gradients with
    frozen patterns, plus :func:`_qk_terms`). ``changed_rows_only``: the gradients before the first position
    where the clean and corrupted prompts differ are not computed (only for ``other`` a run)."""
    comps = list(dict.fromkeys(c for c, _ in plan))
    own = tuple(sorted({_site(c, model.head_dim)[0] for c in comps}, key=lambda s: s.order))
    L, n = model.n_layers, len(task)
    # AtP*: the heads' outputs downstream of any component carry the QK fix's pattern changes
    first = min((c.layer for c in comps), default=L)
    zs = tuple(Site(l, "z") for l in range(first + 1, L)) if qk_on else ()
    sites = tuple(sorted(set(own) | set(zs), key=lambda s: s.order))
    drops = sorted({l for c in comps for l in range(c.layer if c.kind == "resid" else c.layer + 1, L)}) if star else []
    reads = [GradientRead(sites, None, qk_on)] + [GradientRead(sites, l, qk_on) for l in drops]
    outs = runner.gradients(source, reads, label=label, changed_rows_only=changed_rows_only)
    if other in ABLATION_VALUES:  # the replacements, formed from the clean run's captures (fetched at every position)
        runner.run("clean", [()], capture=own, capture_positions="all")
        values = {s: [runner.ablated_prefix(g, other).captures[s] for g in range(len(runner.groups))] for s in own}
    else:
        other_run, = runner.run(other, [()], capture=own, capture_positions="all")
        values = other_run.captures
    qk = _qk_terms(runner, model, plan, source, other, pos, label, outs) if qk_on else {}
    est = torch.zeros(len(reads), len(plan), n, dtype=torch.float64)
    by_site: dict[Site, list[int]] = {}
    for i, (c, _) in enumerate(plan):
        by_site.setdefault(_site(c, model.head_dim)[0], []).append(i)
    for g, idx in enumerate(runner.groups):
        T = len(task.clean_ids[idx[0]])
        mask = torch.zeros(T, dtype=torch.float64)
        if pos is None:
            mask[:] = 1
        else:
            mask[list(pos)] = 1
        it = torch.tensor(idx)
        for site, rows in by_site.items():
            # per plan row: its columns of the site (cols, k) and its positions (k, T); one product per read
            diff = (values[site][g].to(outs[0].acts[site][g].device) - outs[0].acts[site][g]).to(torch.float64)
            cols = torch.zeros(diff.shape[-1], len(rows), dtype=torch.float64)
            w = torch.zeros(len(rows), T, dtype=torch.float64)
            for j, i in enumerate(rows):
                c, p = plan[i]
                cols[_site(c, model.head_dim)[1], j] = 1
                if p is None:
                    w[j] = mask
                else:
                    w[j, p] = 1
            # a read that drops a layer at or below these components is never used for them (see the
            # choice of the drop below): not computed; reads above a dropped layer share the full gradient
            first_drop = site.layer if site.kind == "resid_pre" else site.layer + 1
            seen: dict[int, torch.Tensor] = {}
            for r, read in enumerate(outs):
                if r and drops[r - 1] < first_drop:
                    continue
                gr = read.grads[site][g]
                if id(gr) not in seen:
                    prod = (diff * gr.to(torch.float64)) @ cols  # (B, T, k)
                    seen[id(gr)] = torch.einsum("btk,kt->kb", prod, w)
                est[r, torch.tensor(rows)[:, None], it[None, :]] = seen[id(gr)]
    for i, term in qk.items():
        est[:, i] += term
    dropped = [-1] * len(plan)
    final = est[0]
    if star:
        final = est[0].clone()
        for i, (c, _) in enumerate(plan):
            allowed = [0] + [1 + j for j, l in enumerate(drops) if l >= (c.layer if c.kind == "resid" else c.layer + 1)]
            means = est[allowed, i].mean(-1).abs()
            best = allowed[int(torch.argmax(means))]  # the first of equal magnitudes: no drop wins ties
            final[i] = est[best, i]
            dropped[i] = -1 if best == 0 else drops[best - 1]
    return final, dropped, outs[0].metric


def _qk_terms(runner: Any, model: Any, plan: list[tuple[Component, int | None]], source: str, other: str,
              pos: tuple[int, ...] | None, label: str, reads: list[Any]) -> dict[int, torch.Tensor]:
    """AtP*'s QK fix: per plan row i (heads, ATTN and MLP components below the last layer), per gradient read r,
    per prompt, ``sum_l (z'_l - z_l) . g_r[z_l]`` over every downstream layer l, where z'_l is that layer's
    heads' output when the component's change reaches only their queries and keys (each block's input held
    at the baseline run's): a tensor (R, n). :meth:`Runner.qk_fix` computes them all."""
    rows, changes = [], []
    for i, (c, p) in enumerate(plan):
        if c.kind == "resid" or c.layer + 1 >= model.n_layers:
            continue
        rows.append(i)
        changes.append(SenderChange((c,), other, (p,) if p is not None else pos))
    if not changes:
        return {}
    term = runner.qk_fix(source, changes, reads, label=f"{label}: QK fix")
    return {i: term[:, j] for j, i in enumerate(rows)}
