"""Attribution of ablation: a first-order estimate of every component's ablation total effect at once.

For a component c with activation a_c in the clean run and ablation replacement v_c (zero, the mean over
the reference, or a resampled prompt's activation; the same values :func:`~hydra_probe.effects.ablate`
uses), per prompt:

    estimate = -(v_c - a_c) . dm/da_c |clean run     (of TE = m(clean) - m(c ablated))

summed over every position and the component's columns, with AtP*'s QK fix (every downstream layer's
attention recomputed for the replacement's change of its queries and keys) and GradDrop (the largest mean
magnitude over the gradients with one block's write dropped) by default. It is what ``triangulate(exact=
"auto")`` reads for the ablation side of a verdict: a component whose ablation costs the metric through
downstream paths (its direct effect small, the corruption not moving it) is not ruled out. An ablation is
a large change, so this is a screen, not a measurement: compare with ``ablate`` (:meth:`agreement`).
On every backend (nnsight and remote too: the gradient reads and the QK fix run as traces).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..checks import public
from ..components import select
from ..errors import InputError, OptionError
from ..results import Result, provenance
from .ablation import Ablation
from .attribution import METHODS, _check_method, estimates
from .common import SAME_CONDITIONS, as_model, check_same_conditions, make_runner, value_name

METHOD = "attribution of ablation (first-order estimate)"
METHOD_STAR = "AtP* of ablation (QK fix and GradDrop; estimate)"


class AttributionAblation(Result):
    """Columns: ``component``, ``prompt``, ``estimate`` (first-order estimate of the ablation's total effect
    ``clean_metric - ablated_metric``), ``clean_metric`` (and ``dropped_layer`` with AtP*: the GradDrop read
    chosen, -1 none)."""

    kind = "attribution_ablation"

    @property
    def method_label(self) -> str:
        return METHOD_STAR if self.provenance.get("estimator") == "atp*" else METHOD

    def summary(self) -> pd.DataFrame:
        """Per component: ``n``, mean ``estimate`` with its t interval, and ``method``."""
        from ..stats import t_interval

        rows = []
        for c, g in self._frame.groupby("component", sort=False):
            m, lo, hi = t_interval(g["estimate"].to_numpy())
            rows.append({"component": c, "n": len(g), "estimate": m, "estimate_lo": lo, "estimate_hi": hi,
                         "method": self.method_label})
        return pd.DataFrame(rows)

    def agreement(self, exact: Ablation) -> dict[str, Any]:
        """Agreement with exact ablation of the same components under the same conditions (model, task, n,
        metric, value, reference task, resample seed: else :class:`InputError`): ``pearson`` and
        ``spearman`` of the mean estimates against the mean total effects, ``n_components``, and
        ``largest_miss`` (the largest |mean estimate - mean total effect|) with its ``component``."""
        from scipy import stats as sps

        if not isinstance(exact, Ablation):
            raise InputError(f"agreement() compares with an Ablation result (hp.ablate(...)); got "
                             f"{type(exact).__name__}.")
        resample = ("seed",) if self.provenance.get("value") == "resample" else ()
        check_same_conditions(self.provenance, exact.provenance, [*SAME_CONDITIONS, "value", "reference", *resample],
                              "compare an ablation of the same model, task, metric and value (reference task, "
                              "resample seed).")
        ex = exact.to_frame().groupby("component", sort=False)["total_effect"].mean()
        est = self._frame.groupby("component", sort=False)["estimate"].mean()
        both = pd.concat([est, ex], axis=1, join="inner")
        if both.empty:
            raise InputError("the ablation has no component in common with the estimates; ablate the same ones.")
        diff = (both["estimate"] - both["total_effect"]).abs()
        ok = len(both) >= 2 and both["estimate"].std() > 0 and both["total_effect"].std() > 0
        return {"pearson": float(sps.pearsonr(both["estimate"], both["total_effect"])[0]) if ok else float("nan"),
                "spearman": float(sps.spearmanr(both["estimate"], both["total_effect"])[0]) if ok else float("nan"),
                "n_components": len(both), "largest_miss": float(diff.max()), "component": str(diff.idxmax()),
                "method": self.method_label}


@public
def attribution_ablate(model: Any, task: Any, components: Any = "heads", value: Any = "mean", *,
                       method: str = "atp*", qk_fix: bool = True, metric: Any = "logit_diff", seed: int = 0,
                       progress: bool | None = None) -> AttributionAblation:
    """First-order estimates of each component's ablation total effect (see the module doc).

    ``components``: heads, ``ATTN{l}`` and MLPs (or selectors); ``value``: as in
    :func:`~hydra_probe.effects.ablate` (``"zero"``, ``"mean"``, ``"resample"`` with ``seed``, or a reference
    Task); ``method``: ``"atp*"`` (QK fix and GradDrop; ``qk_fix=False`` GradDrop alone) or ``"atp"`` (the
    plain estimate). One forward and backward of the clean prompts (every position), GradDrop's
    vector-Jacobian products and the QK fix serve every component at once.
    """
    model = as_model(model)
    comps = select(model, components)
    if any(c.kind == "resid" for c in comps):
        raise OptionError("RESID positions are not ablatable components; estimate heads, ATTN layers or MLPs.")
    vname = value_name(value)
    if not isinstance(qk_fix, bool):
        raise OptionError(f"qk_fix must be True or False; got {qk_fix!r}.")
    runner, m = make_runner(model, task, metric, value, seed, progress)  # validates value and metric; runs nothing
    _check_method(method, m, "noise", None, of="an ablation")  # its gradient is the clean run's, as noising's
    star = method == "atp*"
    plan = [(c, None) for c in comps]
    final, dropped, clean_m = estimates(runner, model, task, plan, "clean", vname, None, star, star and qk_fix,
                                        f"{'AtP*' if star else 'attribution'} (ablation, {vname})",
                                        changed_rows_only=False)
    n = len(task)
    rows = []
    for i, (c, _) in enumerate(plan):
        # the estimate of m(ablated) - m(clean) is (v - a) . grad: the total effect is its negative
        row = {"component": c.name, "prompt": range(n), "estimate": (-final[i]).numpy(), "clean_metric": clean_m.numpy()}
        if star:
            row["dropped_layer"] = dropped[i]
        rows.append(pd.DataFrame(row))
    prov = provenance(model, task, metric=m, value=value, seed=seed, method=METHOD_STAR if star else METHOD,
                      **({"estimator": "atp*", "qk_fix": qk_fix} if star else {}))
    return AttributionAblation(pd.concat(rows, ignore_index=True), prov)


__all__ = ["METHODS", "AttributionAblation", "attribution_ablate"]
