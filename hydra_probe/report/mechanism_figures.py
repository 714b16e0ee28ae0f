"""Figures of "Why it repairs": the mechanisms of self-repair, drawn from result frames only.

Each function takes tidy frames (``RepairMechanisms.summary()``,
``NeuronContributions.summary()``, ``LayerRegression`` frames), returns a
matplotlib ``Figure`` and computes nothing that is not in its input. Figures
are built on an Agg canvas without pyplot, styled inside an rc context (no
global state changes), like :mod:`.figures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .figures import _caption, _style, _title, new_figure

#: One colour per mechanism (Okabe-Ito).
MECHANISM_COLOURS = {"pattern": "#0072B2", "values": "#56B4E9", "mlp": "#009E73", "norm": "#CC79A7",
                     "block_norm": "#E69F00", "softcap": "#999999"}
MECHANISM_LABELS = {"pattern": "attention pattern moved", "values": "values moved", "mlp": "MLPs",
                    "norm": "final-norm scale", "block_norm": "block-norm scales", "softcap": "logit soft-cap"}


def _err(s: pd.DataFrame, col: str) -> np.ndarray:
    return np.nan_to_num(np.vstack([s[col] - s[f"{col}_lo"], s[f"{col}_hi"] - s[col]]).clip(min=0))


def mechanism_bars(summary: pd.DataFrame, components: Sequence[str], *, caption: str = "") -> Any:
    """Per component, its self-repair stacked by mechanism, each part with its interval.

    ``summary``: ``RepairMechanisms.summary()`` (``component``, ``mechanism``,
    ``amount``, ``amount_lo``, ``amount_hi``, ``self_repair``). Positive parts
    stack upwards, negative ones downwards; each part's interval is drawn at
    its end. A black bar marks the mean self-repair (the sum of the parts).
    """
    comps = [c for c in components if c in set(summary["component"])]
    mechs = [m for m in MECHANISM_COLOURS if m in set(summary["mechanism"])]
    with _style():
        fig = new_figure(max(5.0, 0.9 * len(comps) + 3.2), 3.6)
        ax = fig.add_subplot()
        seen: set[str] = set()
        for i, c in enumerate(comps):
            s = summary[summary["component"] == c].set_index("mechanism")
            up = down = 0.0
            for mm in mechs:
                if mm not in s.index:
                    continue
                r = s.loc[mm]
                v = float(r["amount"])
                base = up if v >= 0 else down
                ax.bar(i, v, bottom=base, width=0.6, color=MECHANISM_COLOURS[mm], edgecolor="white", linewidth=0.5,
                       label=None if mm in seen else MECHANISM_LABELS[mm], zorder=2)
                seen.add(mm)
                lo, hi = float(r["amount_lo"]), float(r["amount_hi"])
                if np.isfinite(lo) and np.isfinite(hi):
                    ax.errorbar(i + 0.18 * (mechs.index(mm) - (len(mechs) - 1) / 2) / max(len(mechs), 1),
                                base + v, yerr=[[v - lo], [hi - v]], color="black", linewidth=0.7, capsize=1.5,
                                zorder=3)
                if v >= 0:
                    up += v
                else:
                    down += v
            sr = float(s["self_repair"].iloc[0])
            ax.scatter([i + 0.36], [sr], marker="_", s=140, color="black", zorder=4,
                       label="self-repair" if i == 0 else None)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(comps)), comps)
        ax.set_xlim(-0.7, len(comps) - 0.2)
        ax.set_ylabel("self-repair by mechanism\n(mean, 95% interval)")
        _title(ax, "Why it repairs: each component's self-repair split into moved attention patterns, moved "
                   "values, MLPs and norm scales")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        _caption(fig, caption)
    return fig


def top_neurons(summary: pd.DataFrame, *, mlp: str, component: str, caption: str = "") -> Any:
    """The top neurons of ``mlp`` compensating for ``component``: mean dDE with intervals.

    ``summary``: ``NeuronContributions.summary()`` (``neuron``, ``delta_de``,
    ``delta_de_lo``, ``delta_de_hi``, ``role``). Positive bars compensate
    (e.g. neurons that stopped erasing the answer), negative ones amplify.
    """
    s = summary.iloc[::-1]
    with _style():
        fig = new_figure(5.0, max(2.2, 0.28 * len(s) + 1.2))
        ax = fig.add_subplot()
        colours = np.where(s["delta_de"].to_numpy() > 0, MECHANISM_COLOURS["mlp"], "#D55E00")
        y = np.arange(len(s))
        ax.barh(y, s["delta_de"], color=colours, xerr=_err(s, "delta_de"), capsize=2,
                error_kw={"linewidth": 0.7}, zorder=2)
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_yticks(y, [f"n{int(n)}" for n in s["neuron"]])
        ax.set_xlabel("change of the neuron's direct effect (ΔDE, mean, 95% interval)")
        _title(ax, f"Which neurons of {mlp} respond when {component} is ablated (green compensates, "
                   "orange amplifies)")
        _caption(fig, caption)
    return fig


def layer_regression_figure(points: pd.DataFrame, regression: pd.DataFrame, shares: pd.DataFrame, *,
                            caption: str = "") -> Any:
    """Left: compensation against DE lost per component with each layer's OLS line (slope, R^2 in the legend).
    Right: each mechanism's share of the layer's self-repair with bootstrap intervals.

    ``points``: ``LayerRegression.points()``; ``regression``:
    ``LayerRegression.to_frame()``; ``shares``: ``LayerRegression.shares()``.
    """
    import matplotlib

    layers = list(regression["layer"])
    cmap = matplotlib.colormaps["viridis"]
    colour = {layer: cmap(i / max(len(layers) - 1, 1)) for i, layer in enumerate(layers)}
    with _style():
        fig = new_figure(9.0, 3.8)
        ax, bx = fig.subplots(1, 2)
        for _, r in regression.iterrows():
            p = points[points["layer"] == r["layer"]]
            ax.scatter(p["de_lost"], p["compensation"], s=12, color=colour[r["layer"]], zorder=3)
            if np.isfinite(r["slope"]):
                xs = np.linspace(p["de_lost"].min(), p["de_lost"].max(), 2)
                ax.plot(xs, r["intercept"] + r["slope"] * xs, color=colour[r["layer"]], linewidth=1,
                        label=f"layer {int(r['layer'])}: slope {r['slope']:.2f} "
                              f"[{r['slope_lo']:.2f}, {r['slope_hi']:.2f}], R² {r['r2']:.2f}")
            else:
                ax.plot([], [], color=colour[r["layer"]], label=f"layer {int(r['layer'])}: too few components")
        lim = np.nanmax(np.abs(np.r_[points["de_lost"], points["compensation"], 1e-9]))
        ax.plot([-lim, lim], [-lim, lim], color="#999999", linewidth=0.6, linestyle="--", label="full compensation")
        ax.axhline(0, color="black", linewidth=0.4)
        ax.axvline(0, color="black", linewidth=0.4)
        ax.set_xlabel("direct effect lost (mean per prompt)")
        ax.set_ylabel("compensation = self-repair (mean per prompt)")
        _title(ax, "Per-layer Hydra regression: compensation against DE lost")
        ax.legend(loc="upper left", frameon=False, fontsize=6)
        mechs = [m for m in MECHANISM_COLOURS if m in set(shares["mechanism"])]
        width = 0.8 / max(len(mechs), 1)
        for j, mm in enumerate(mechs):
            s = shares[shares["mechanism"] == mm].set_index("layer").reindex(layers)
            x = np.arange(len(layers)) + (j - (len(mechs) - 1) / 2) * width
            bx.bar(x, s["share"], width=width * 0.95, color=MECHANISM_COLOURS[mm], label=MECHANISM_LABELS[mm],
                   yerr=_err(s, "share"), capsize=1.5, error_kw={"linewidth": 0.6}, zorder=2)
        # a layer whose self-repair is near 0 has unbounded shares: keep the axis readable, label what overflows
        vals = shares["share"].to_numpy(dtype=float)
        vals = vals[np.isfinite(vals)]
        lo = max(-3.0, min(-0.2, vals.min() if vals.size else 0.0)) - 0.1
        hi = min(3.0, max(1.1, vals.max() if vals.size else 1.0)) + 0.1
        bx.set_ylim(lo, hi)
        for j, mm in enumerate(mechs):
            s = shares[shares["mechanism"] == mm].set_index("layer").reindex(layers)
            for i, v in enumerate(s["share"].to_numpy(dtype=float)):
                if np.isfinite(v) and not lo <= v <= hi:
                    x = i + (j - (len(mechs) - 1) / 2) * width
                    bx.text(x, hi if v > hi else lo, f"{v:.1f}", ha="center", va="top" if v > hi else "bottom",
                            fontsize=5.5, rotation=90)
        bx.axhline(0, color="black", linewidth=0.6)
        bx.set_xticks(range(len(layers)), [str(int(x)) for x in layers])
        bx.set_xlabel("layer of the ablated components")
        bx.set_ylabel("share of the layer's self-repair (95% bootstrap interval)")
        _title(bx, "Which mechanism carries each layer's self-repair")
        bx.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        _caption(fig, caption)
    return fig


__all__ = ["MECHANISM_COLOURS", "MECHANISM_LABELS", "layer_regression_figure", "mechanism_bars", "top_neurons"]
