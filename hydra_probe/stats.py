"""Statistics on per-prompt values: intervals, paired tests, FDR, the Hydra slope.

Pure functions of arrays and frames; nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps


def t_interval(x: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean. One value gives (x, nan, nan)."""
    a = np.asarray(x, dtype=float)
    m = float(a.mean()) if a.size else float("nan")
    if a.size < 2:
        return m, float("nan"), float("nan")
    se = float(a.std(ddof=1) / np.sqrt(a.size))
    if se == 0:
        return m, m, m
    h = float(sps.t.ppf(0.5 + level / 2, a.size - 1)) * se
    return m, m - h, m + h


def bootstrap_interval(x: Sequence[float] | np.ndarray, level: float = 0.95, n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean (seeded)."""
    a = np.asarray(x, dtype=float)
    rng = np.random.default_rng(seed)
    if a.size < 2:
        return float(a.mean()) if a.size else float("nan"), float("nan"), float("nan")
    means = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(1)
    lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return float(a.mean()), float(lo), float(hi)


def one_sample_p(x: Sequence[float] | np.ndarray, alternative: str = "greater") -> float:
    """p-value of a one-sample t test of mean > 0 (``alternative="greater"``) or != 0 (paired differences).

    Fewer than two values: nan (one prompt is never significant). Two or more equal values (no spread, e.g.
    an exact hand-set model): 0 when they lie on the alternative's side, else 1.
    """
    a = np.asarray(x, dtype=float)
    if a.size < 2:
        return float("nan")
    if np.allclose(a, a[0]):
        return 0.0 if (a[0] > 0 if alternative == "greater" else a[0] != 0) else 1.0
    return float(sps.ttest_1samp(a, 0.0, alternative=alternative).pvalue)


def bh(pvalues: Sequence[float], alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg (statsmodels): (rejected, corrected p) ; NaNs stay NaN / False."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    rej = np.zeros(p.shape, dtype=bool)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        r, qq, _, _ = multipletests(p[ok], alpha=alpha, method="fdr_bh")
        rej[ok], q[ok] = r, qq
    return rej, q


def summarise(frame: pd.DataFrame, key: str, values: Sequence[str], level: float = 0.95,
              method: str = "t") -> pd.DataFrame:
    """Per-``key`` mean, interval (``method`` "t" or "bootstrap") and n of each value column."""
    rows = []
    f = t_interval if method == "t" else bootstrap_interval
    for k, g in frame.groupby(key, sort=False):
        row: dict[str, Any] = {key: k, "n": len(g)}
        for v in values:
            m, lo, hi = f(g[v].to_numpy(), level)
            row[v] = m
            row[f"{v}_lo"] = lo
            row[f"{v}_hi"] = hi
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["interval"] = f"{int(level * 100)}% {'Student-t' if method == 't' else 'percentile bootstrap'} interval of the mean"
    return out


def hydra_slope(total_effect: Sequence[float], de_lost: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """OLS of total effect on direct effect lost across components (statsmodels).

    Returns slope, its interval, intercept, R^2 and n. A slope below 1 says
    single ablations understate components' roles by that factor.
    """
    import statsmodels.api as sm

    y = np.asarray(total_effect, dtype=float)
    x = np.asarray(de_lost, dtype=float)
    if y.size < 3 or np.allclose(x, x[0]):
        return {"slope": float("nan"), "slope_lo": float("nan"), "slope_hi": float("nan"),
                "intercept": float("nan"), "r2": float("nan"), "n": int(y.size)}
    fit = sm.OLS(y, sm.add_constant(x)).fit()
    lo, hi = fit.conf_int(alpha=1 - level)[1]
    return {"slope": float(fit.params[1]), "slope_lo": float(lo), "slope_hi": float(hi),
            "intercept": float(fit.params[0]), "r2": float(fit.rsquared), "n": int(y.size)}


def grouped_t(frame: pd.DataFrame, keys: Sequence[str], value: str, level: float = 0.95) -> pd.DataFrame:
    """Vectorised per-group mean, Student-t interval and two-sided one-sample p of ``value``.

    One row per group (first-appearance order) with ``keys``, ``n``, ``mean``,
    ``lo``, ``hi``, ``p``. Matches :func:`t_interval` and the two-sided t test
    of mean != 0 used by ``SelfRepair.contribution_summary``: one value gives
    nan bounds and a nan p (one prompt is never significant); a constant group
    of two or more gives ``lo == hi == mean`` and p = 0 (nonzero mean) or 1
    (zero mean).
    """
    g = frame.groupby(list(keys), sort=False)[value]
    agg = g.agg(["count", "mean"]).reset_index()
    n = agg["count"].to_numpy(dtype=float)
    m = agg["mean"].to_numpy(dtype=float)
    sd = g.std(ddof=1).to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = sd / np.sqrt(n)
        df = np.maximum(n - 1, 1)
        h = sps.t.ppf(0.5 + level / 2, df) * se
        lo = np.where(n < 2, np.nan, np.where(se == 0, m, m - h))
        hi = np.where(n < 2, np.nan, np.where(se == 0, m, m + h))
        p = 2 * sps.t.sf(np.abs(m / se), df)
    constant = (n >= 2) & ~(sd > 0)
    p = np.where(constant, np.where(np.abs(m) > 0, 0.0, 1.0), p)
    p = np.where(n < 2, np.nan, p)
    res = agg[list(keys)].copy()
    res["n"] = n.astype(int)
    res["mean"], res["lo"], res["hi"], res["p"] = m, lo, hi, p
    return res
