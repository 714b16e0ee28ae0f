"""``exact="auto"`` checks its own screen on the components it swept exactly.

The plan (``triangulation._exact_plan``) rules a measurement out where its estimated share is below a cut, half
the threshold: that is right while AtP* captures at least half of any effect that reaches the threshold. Every
swept component has both numbers, so after each exact sweep the report measures how much AtP* fell short there,
in the plan's own units:

* denoise: restoration, ``|mean AtP*| / gap`` against the exact ``|(patched - corrupted) / (clean - corrupted)|``;
* noise: damage, the same with the noising estimate and ``|(clean - patched) / (clean - corrupted)|``;
* ablation: the larger of the total effect on the verdict scale's side (signed) and the direct effect's magnitude
  over the scale, against the larger of the exact total effect (signed) and the exact DE lost's magnitude.

Only swept components whose exact share reaches the threshold (those whose verdict the measurement can change)
are read: the shortfall of each is ``1 - estimate / exact``. Where the largest shortfall ``s`` exceeds what the
cut allows (``1 - cut / threshold``), the cut is lowered to ``threshold * (1 - s)`` (to nothing, every component,
where ``s`` reaches 1: an estimate of the wrong sign or zero) and the components that reach it are swept too; the
check then runs again on the larger set, until it adds nothing. A component left out then reads below the
threshold unless AtP* captures less of its effect than of any swept component's that reached the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd


def patching_shares(result: Any) -> pd.Series:
    """An activation patching result's exact shares by component: ``|restoration|`` (denoise) or ``|damage|``
    (noise), its summary's ``score``."""
    return result.summary().set_index("component")["score"].abs()


def ablation_shares(result: Any, signed: float) -> pd.Series:
    """A self-repair result's exact shares by component: the larger of ``total_effect / signed`` and ``|de_lost /
    signed|`` (``signed``: the verdict scale)."""
    sr = result.to_frame().groupby("component", sort=False)[["total_effect", "de_lost"]].mean()
    return pd.concat([sr["total_effect"] / signed, (sr["de_lost"] / signed).abs()], axis=1).max(axis=1)


def largest_shortfall(est: pd.Series, exact: pd.Series, threshold: float) -> tuple[float, str | None]:
    """(largest ``1 - est / exact`` over the components of ``exact`` whose exact share reaches ``threshold``, that
    component); (0.0, None) where none reaches it. ``est``: the plan's estimated shares of one measurement."""
    big = exact[exact >= threshold]
    if big.empty:
        return 0.0, None
    short = 1.0 - est.reindex(big.index).fillna(0.0) / big
    return max(0.0, float(short.max())), str(short.idxmax())


def widened(est: pd.Series, swept: Sequence[str], threshold: float, shortfall: float) -> list[str]:
    """The components of ``est`` (in its order) not in ``swept`` whose estimated share reaches ``threshold * (1 -
    shortfall)`` (every one where ``shortfall`` reaches 1)."""
    cut = threshold * (1.0 - shortfall)
    done = set(swept)
    return [c for c in est.index if c not in done and (cut <= 0 or est[c] >= cut)]


def check_text(checks: dict[str, dict[str, Any]], allowed: float) -> str:
    """One sentence on the check (``config["exact_check"]``: per measurement ``shortfall``, ``component`` and the
    components ``added``); ``allowed``: the shortfall the plan's cut allows."""
    parts = [f"{k} {c['shortfall']:.2f} ({c['component']})" if c["component"] else f"{k}: none swept reached it"
             for k, c in checks.items()]
    added = {k: c["added"] for k, c in checks.items() if c["added"]}
    text = ("Checked on the swept components whose exact share reaches the threshold, AtP* fell short of the exact "
            f"share by at most (1 - estimate / exact): {'; '.join(parts)}")
    if not added:
        return text + f"; within the {allowed:.2f} the cut allows."
    more = "; ".join(f"{k}: {len(v)} more ({', '.join(v[:8])}{', ...' if len(v) > 8 else ''})" for k, v in added.items())
    return (text + f". Where that exceeded the {allowed:.2f} the cut allows, the cut was lowered to the threshold times "
            f"(1 - shortfall), to nothing where the shortfall reached 1, and what reached it was swept too ({more}); "
            "a component still estimated there reads below the threshold unless AtP* captures less of its effect "
            "than of any swept one that reached it.")
