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
with exact activation patching. Runs on the local (hook) path for every
backend.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from ..checks import public
from ..components import Component, select
from ..errors import InputError
from ..interventions import check_direction, site_of
from ..models.adapter import check_fired
from ..models.sites import Site
from ..results import Result, provenance
from .common import as_model, make_runner, positions_of
from .patching import ActivationPatch, check_separable
from .path import normalised_summary

METHOD = "attribution (first-order estimate)"


class AttributionPatch(Result):
    """Columns: ``component``, ``prompt``, ``estimate`` (first-order estimate of
    ``patched_metric - baseline_metric``), ``direction``, ``baseline_metric``,
    ``clean_metric``, ``corrupted_metric`` (and ``position`` for per-position
    residual rows, -1 meaning all positions)."""

    kind = "attribution_patch"

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
        out["method"] = METHOD
        out.attrs["score"] = ("estimated restoration (denoise) or damage (noise): a first-order (attribution "
                              "patching) estimate, normalised on the mean clean and corrupted metrics")
        return out

    def agreement(self, exact: ActivationPatch, top: int = 5) -> dict[str, Any]:
        """Agreement of the estimates with exact activation patching of the same components.

        Per component (and position), the exact effect is the mean over
        prompts of ``patched_metric - baseline_metric`` and the estimate the
        mean estimate. Returns a dict: ``pearson``, ``spearman`` (NaN with
        fewer than two components or no spread), ``n_components``, and
        ``disagreements``: a frame of the ``top`` largest absolute
        differences with ``component``, ``estimate``, ``exact``,
        ``difference`` (= estimate - exact).
        """
        from scipy import stats as sps

        if not isinstance(exact, ActivationPatch):
            raise InputError(f"agreement() compares with an ActivationPatch result; got {type(exact).__name__}.")
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
        return {"pearson": pearson, "spearman": spearman, "n_components": len(both),
                "disagreements": dis.reset_index(drop=True), "method": METHOD}


def _site(c: Component, head_dim: int) -> tuple[Site, slice]:
    site, cols = site_of(c, head_dim)
    return site, slice(*cols) if cols else slice(None)


@public
def attribution_patch(model: Any, task: Any, components: Any = "heads", direction: str = "denoise", *,
                      metric: Any = "logit_diff", positions: Any = None, per_position: bool | None = None,
                      progress: bool | None = None) -> AttributionPatch:
    """First-order estimates of activation patching for every component (see the module doc).

    ``components``: heads, ``ATTN{l}``, MLPs, ``RESID{l}`` or selectors
    (``"heads"``, ``"mlps"``, ``"layers"``, ``"resid"``, ``"all"``). With
    ``per_position`` (default when a residual component is asked for) each
    position gets its own row, with positions numbered as activation
    patching numbers them (from the end when prompt lengths differ).
    """
    model = as_model(model)
    model.require_local("attribution_patch")
    check_direction(direction)
    comps = select(model, components)
    pos = positions_of(positions)
    runner, m = make_runner(model, task, metric, progress=progress, positions=pos)
    ad = runner.ad
    source, other = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    per_pos = any(c.kind == "resid" for c in comps) if per_position is None else per_position
    T_min = min(task.lengths)
    pos_list = list(range(-T_min, 0)) if per_pos and len(set(task.lengths)) > 1 else list(range(T_min))
    plan = [(c, p) for c in comps for p in pos_list] if per_pos and pos is None else [(c, None) for c in comps]
    sites = {_site(c, model.head_dim)[0] for c in comps}
    n = len(task)
    est = torch.zeros(len(plan), n, dtype=torch.float64)
    base_metric = torch.zeros(n, dtype=torch.float64)
    for g, idx in enumerate(runner.groups):
        Po = runner.local_prefix(g, other)
        ids = task.batch(idx, source)
        T = ids.shape[1]
        mask = torch.zeros(T, dtype=torch.float64)
        if pos is None:
            mask[:] = 1
        else:
            mask[list(pos)] = 1
        deltas: dict[Site, torch.Tensor] = {}
        acts: dict[Site, torch.Tensor] = {}

        def make(site: Site, acts=acts, deltas=deltas):
            def edit(x: torch.Tensor) -> torch.Tensor:
                acts[site] = x.detach()
                deltas[site] = torch.zeros_like(x, requires_grad=True)
                return x + deltas[site]
            return edit

        edits = {s: make(s) for s in sites}
        with runner.model.evaluating(), torch.enable_grad():
            with ad.hooks(edits) as fired:
                logits = ad.last_logits(ids)
            check_fired(fired, edits)
            a = task.answer_ids[idx]
            b = task.alternative_ids[idx]
            clean_lg = runner.clean_logits()[idx] if runner.metric.needs_clean else None
            mvals = runner.metric(logits, a, b, clean_lg)
            order = sorted(sites, key=lambda s: s.order)
            grads = torch.autograd.grad(mvals.sum(), [deltas[s] for s in order], allow_unused=True)
        grad = {s: (torch.zeros_like(deltas[s]) if gr is None else gr).detach() for s, gr in zip(order, grads)}
        base_metric[torch.tensor(idx)] = mvals.detach().to(torch.float64).cpu()
        it = torch.tensor(idx)
        for i, (c, p) in enumerate(plan):
            site, cols = _site(c, model.head_dim)
            other_act = Po.resid[site.layer] if site.kind == "resid_pre" else Po.captures[site]
            diff = (other_act[..., cols] - acts[site][..., cols]).to(torch.float64)
            prod = (diff * grad[site][..., cols].to(torch.float64)).sum(-1)  # (B, T)
            w = mask
            if p is not None:
                w = torch.zeros(T, dtype=torch.float64)
                w[p] = 1
            est[i, it] = (prod * w.to(prod.device)).sum(-1).cpu()
    clean_m = base_metric if source == "clean" else runner.baseline("clean").metric
    corr_m = base_metric if source == "corrupted" else runner.baseline("corrupted").metric
    check_separable(clean_m.numpy(), corr_m.numpy())
    rows = []
    for i, (c, p) in enumerate(plan):
        rows.append(pd.DataFrame({"component": c.name, "prompt": range(n), "estimate": est[i].numpy(),
                                  "direction": direction, "baseline_metric": base_metric.numpy(),
                                  "clean_metric": clean_m.numpy(), "corrupted_metric": corr_m.numpy(),
                                  "position": -1 if p is None else p}))
    frame = pd.concat(rows, ignore_index=True)
    if not per_pos:
        frame = frame.drop(columns="position")
    prov = provenance(model, task, metric=m, direction=direction, positions=None if pos is None else list(pos),
                      method=METHOD)
    return AttributionPatch(frame, prov)
