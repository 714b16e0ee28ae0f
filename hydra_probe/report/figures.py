"""Figures of a triangulation report, drawn from result frames only.

Every function takes tidy frames (the triangulation table, result frames or
their summaries), returns a matplotlib ``Figure`` and computes nothing that
is not already in its input. Figures are built on an Agg canvas without
pyplot; styles are applied inside ``matplotlib.rc_context`` so importing or
calling this module changes no global state (backend, style, rcParams).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd

#: Okabe-Ito colours (colour-blind safe).
PALETTE = {"clean": "#009E73", "corrupted": "#D55E00", "clean-patched": "#0072B2", "ablated": "#E69F00",
           "other": "#999999", "NORM": "#CC79A7"}
VERDICT_COLOURS = {"agree: important": "#0072B2", "masked by self-repair": "#D55E00", "necessity only": "#E69F00",
                   "restoration only": "#56B4E9", "agree: minor": "#BBBBBB"}

_RC = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
       "legend.fontsize": 7, "axes.spines.top": False, "axes.spines.right": False, "svg.hashsalt": "hydra_probe",
       "svg.fonttype": "none"}

#: Measures of the layer x head heatmaps: column -> title.
MEASURES = {
    "direct_effect": "direct effect (clean)",
    "total_effect": "total effect (single ablation)",
    "self_repair": "self-repair (DE lost - TE)",
    "restoration": "restoration (denoise)",
    "damage": "damage (noise)",
    "attribution": "attribution estimate (denoise)",
}


def _caption(fig: Any, caption: str) -> None:
    """The claim's conditions above the figure, wrapped to the figure's width."""
    if caption:
        import textwrap

        width = max(40, int(fig.get_figwidth() * 17))
        fig.suptitle("\n".join(textwrap.wrap(caption, width)), fontsize=6.5, color="#555555")


def _title(ax: Any, text: str) -> None:
    """An axes title wrapped to the axes' width (narrow figures never clip it)."""
    import textwrap

    fig = ax.figure
    width_in = fig.get_figwidth() * ax.get_position().width
    ax.set_title("\n".join(textwrap.wrap(text, max(25, int(width_in * 15)))))


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(_RC):
        yield


def new_figure(w: float, h: float) -> Any:
    """A Figure on an Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def claim_caption(prov: dict[str, Any]) -> str:
    """The conditions every claim is made under, as one short line."""
    return (f"{prov.get('model')} | task {prov.get('task')} (corruption {prov.get('corruption')}, n={prov.get('n')}) | "
            f"ablation {prov.get('value')} | metric {prov.get('metric')} | scale {prov.get('scale')}")


# ------------------------------------------------------------------ patch clean A vs ablate A
def patch_vs_ablate(summary: pd.DataFrame, per_prompt: pd.DataFrame | None = None, *, caption: str = "") -> Any:
    """"Patch clean A vs ablate A": the metric under four runs for each top component.

    ``summary``: columns ``component``, ``run`` (``clean``, ``corrupted``,
    ``clean-patched`` = the corrupted run with A's clean activation,
    ``ablated`` = the clean run with A ablated), ``metric``, ``metric_lo``,
    ``metric_hi`` (interval of the mean). ``per_prompt``: optional
    ``component``, ``run``, ``metric`` points drawn over the bars.
    """
    runs = ["clean", "corrupted", "clean-patched", "ablated"]
    comps = list(dict.fromkeys(summary["component"]))
    with _style():
        fig = new_figure(max(5.5, 1.15 * len(comps) + 2.2), 3.6)
        ax = fig.add_subplot()
        width = 0.8 / len(runs)
        for j, r in enumerate(runs):
            s = summary[summary["run"] == r].set_index("component").reindex(comps)
            x = np.arange(len(comps)) + (j - (len(runs) - 1) / 2) * width
            err = np.vstack([s["metric"] - s["metric_lo"], s["metric_hi"] - s["metric"]])
            ax.bar(x, s["metric"], width=width * 0.95, color=PALETTE[r], label=r, yerr=np.nan_to_num(err),
                   capsize=2, error_kw={"linewidth": 0.8}, zorder=2)
            if per_prompt is not None and len(per_prompt):
                p = per_prompt[per_prompt["run"] == r]
                pos = {c: xx for c, xx in zip(comps, x)}
                rng = np.random.default_rng(0)  # fixed jitter: identical figures on re-runs
                xs = p["component"].map(pos).to_numpy() + rng.uniform(-width / 4, width / 4, len(p))
                ax.scatter(xs, p["metric"], s=3, color="black", alpha=0.25, linewidths=0, zorder=3)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(comps)), comps)
        ax.set_ylabel("metric (mean, 95% interval)")
        _title(ax, "Patch clean A vs ablate A: metric on the clean, corrupted, clean-patched and ablated runs")
        ax.legend(ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
        _caption(fig, caption)
    return fig


# ------------------------------------------------------------------ heatmaps
def _grid(table: pd.DataFrame, col: str) -> pd.DataFrame:
    """Layer x (head | ATTN | MLP) grid of ``col`` from the per-component table."""
    f = table.copy()
    f["column"] = [str(int(h)) if k == "head" else k.upper() for k, h in zip(f["kind"], f["head"])]
    g = f.pivot_table(index="layer", columns="column", values=col, aggfunc="first", dropna=False)
    heads = sorted([c for c in g.columns if c.isdigit()], key=int)
    return g[heads + [c for c in ("ATTN", "MLP") if c in g.columns]]


def tick_subset(n: int, max_labels: int = 16) -> list[int]:
    """Positions (of ``n``) to label: all when ``n <= max_labels``, else every k-th for the smallest k of
    2, 5, 10, 20, ... giving at most ``max_labels``, plus the last position (the range's end)."""
    if n <= max_labels:
        return list(range(n))
    step = next(k for e in range(12) for k in (2 * 10**e, 5 * 10**e, 10 ** (e + 1)) if math.ceil(n / k) <= max_labels)
    keep = list(range(0, n, step))
    return keep if keep[-1] == n - 1 else [*keep, n - 1]


def _label_ticks(axis: Any, labels: Sequence[str], always: Sequence[bool] = ()) -> None:
    """One tick per cell on ``axis`` (a grid's x or y axis): the cells with ``always`` True labelled, of the
    others the :func:`tick_subset` (all of them up to 16); the rest get an unlabelled minor tick."""
    n = len(labels)
    fixed = {i for i, a in enumerate(always) if a}
    free = [i for i in range(n) if i not in fixed]
    keep = sorted(fixed | {free[j] for j in tick_subset(len(free))}) if free else sorted(fixed)
    axis.set_ticks(keep, [labels[i] for i in keep])
    if len(keep) < n:
        axis.set_ticks(sorted(set(range(n)) - set(keep)), minor=True)


def heatmaps(table: pd.DataFrame, measures: dict[str, str] | None = None, *, caption: str = "") -> Any:
    """Layer x head heatmaps, one panel per measure (each with its own symmetric colour scale).

    ``table``: the triangulation table (``component``, ``layer``, ``head``,
    ``kind`` and the measure columns). Measures that are absent or all
    missing are left out.
    """
    from matplotlib.colors import TwoSlopeNorm

    measures = measures or MEASURES
    cols = [c for c in measures if c in table.columns and table[c].notna().any()]
    ncol = min(3, len(cols))
    nrow = math.ceil(len(cols) / ncol)
    g0 = _grid(table, cols[0])
    cell = 0.42 if g0.shape[1] <= 12 else 0.22
    w = ncol * max(2.8, cell * g0.shape[1] + 1.4)
    h = nrow * max(2.2, cell * g0.shape[0] + 1.1)
    annotate = g0.size <= 100
    with _style():
        fig = new_figure(w, h)
        axes = fig.subplots(nrow, ncol, squeeze=False)
        for ax, c in zip(axes.flat, cols):
            g = _grid(table, c)
            a = g.to_numpy(dtype=float)
            v = float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 1.0
            v = v or 1.0
            norm = TwoSlopeNorm(vcenter=0.0, vmin=-v, vmax=v)
            im = ax.imshow(np.ma.masked_invalid(a), cmap="RdBu_r", norm=norm, aspect="auto",
                           interpolation="nearest")
            if annotate:
                for (i, j), x in np.ndenumerate(a):
                    if np.isfinite(x):
                        ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=5,
                                color="white" if abs(x) > 0.6 * v else "black")
            _label_ticks(ax.xaxis, list(g.columns), [not c.isdigit() for c in g.columns])  # ATTN, MLP always
            _label_ticks(ax.yaxis, [str(int(x)) for x in g.index])
            ax.set_title(measures[c], y=1.0)  # where auto placement puts it (ticks below); skips re-measuring
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            for s in ax.spines.values():
                s.set_visible(False)
            fig.colorbar(im, ax=ax, shrink=0.8)
        for ax in list(axes.flat)[len(cols):]:
            ax.set_visible(False)
        _caption(fig, caption)
    return fig


# ------------------------------------------------------------------ TE vs DE lost
def te_vs_de_lost(table: pd.DataFrame, hydra: dict[str, float] | None = None, *, label: Sequence[str] = (),
                  caption: str = "") -> Any:
    """Total effect against direct effect lost per component, with the identity line and the Hydra fit.

    Points below the identity line are components whose single ablation
    understates the direct effect they wrote (self-repair > 0).
    """
    with _style():
        fig = new_figure(4.6, 4.0)
        ax = fig.add_subplot()
        x, y = table["de_lost"].to_numpy(float), table["total_effect"].to_numpy(float)
        lb = table["lower_bound"].eq(True).to_numpy()  # NaN: not ablated (exact="auto")
        lo, hi = np.nanmin(np.r_[x, 0.0]), np.nanmax(np.r_[x, 0.0])  # lines span the data's x range only
        pad = 0.08 * (hi - lo or 1.0)
        xx = np.array([lo - pad, hi + pad])
        ax.plot(xx, xx, color="black", linewidth=0.8, linestyle="--", label="identity (TE = DE lost)")
        if hydra and np.isfinite(hydra.get("slope", np.nan)):
            ax.plot(xx, hydra["intercept"] + hydra["slope"] * xx, color="#D55E00", linewidth=1.2,
                    label=f"Hydra fit: slope {hydra['slope']:.2f} [{hydra['slope_lo']:.2f}, {hydra['slope_hi']:.2f}]")
        yerr = np.vstack([y - table["total_effect_lo"].to_numpy(float), table["total_effect_hi"].to_numpy(float) - y])
        ax.errorbar(x, y, yerr=np.nan_to_num(yerr), fmt="none", ecolor="#999999", elinewidth=0.6, zorder=1)
        ax.scatter(x[~lb], y[~lb], s=14, color="#999999", label="self-repair not significant", zorder=2)
        ax.scatter(x[lb], y[lb], s=18, color="#0072B2", label="TE is a lower bound (self-repair > 0)", zorder=3)
        for c in label:
            r = table[table["component"] == c]
            if len(r):
                ax.annotate(c, (float(r["de_lost"].iloc[0]), float(r["total_effect"].iloc[0])), xytext=(4, 3),
                            textcoords="offset points", fontsize=7)
        ax.axhline(0, color="#BBBBBB", linewidth=0.5, zorder=0)
        ax.axvline(0, color="#BBBBBB", linewidth=0.5, zorder=0)
        ax.set_xlabel("direct effect lost (DE lost)")
        ax.set_ylabel("total effect of the single ablation (TE)")
        _title(ax, "Single ablations against the direct effect they remove")
        ax.legend(loc="upper left", frameon=False)
        _caption(fig, caption)
    return fig


# ------------------------------------------------------------------ evidence map
def evidence_map(table: pd.DataFrame, threshold: float, *, label: Sequence[str] = (), caption: str = "") -> Any:
    """Necessity (TE / verdict scale, ``te_norm``) against restoration (denoise score), coloured by verdict."""
    import seaborn as sns

    with _style():
        fig = new_figure(5.6, 4.0)
        ax = fig.add_subplot()
        present = [v for v in VERDICT_COLOURS if (table["verdict"] == v).any()]
        counts = table["verdict"].value_counts()
        data = table.assign(verdict_n=[f"{v} ({counts[v]})" for v in table["verdict"]])
        sns.scatterplot(data=data, x="te_norm", y="restoration", hue="verdict_n", ax=ax, s=22, linewidth=0,
                        hue_order=[f"{v} ({counts[v]})" for v in present],
                        palette={f"{v} ({counts[v]})": VERDICT_COLOURS[v] for v in present}, zorder=2)
        for c in label:
            r = table[table["component"] == c]
            if len(r):
                ax.annotate(c, (float(r["te_norm"].iloc[0]), float(r["restoration"].iloc[0])), xytext=(4, 3),
                            textcoords="offset points", fontsize=7)
        ax.axvline(threshold, color="#777777", linewidth=0.6, linestyle=":")
        ax.axhline(threshold, color="#777777", linewidth=0.6, linestyle=":")
        ax.axvline(0, color="black", linewidth=0.5)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel("necessity: total effect of ablation / verdict scale")
        ax.set_ylabel("restoration: denoising score")
        _title(ax, "Necessity-style vs restoration-style evidence per component")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, title="verdict", title_fontsize=7)
        _caption(fig, caption)
    return fig


# ------------------------------------------------------------------ who compensated
def compensation_bars(contrib: pd.DataFrame, table: pd.DataFrame, components: Sequence[str], *, n_named: int = 4,
                      caption: str = "") -> Any:
    """Who compensated: for each component, its self-repair split into downstream contributions.

    ``contrib``: ``SelfRepair.contribution_summary()`` rows (``component``,
    ``downstream``, ``delta_de``). ``table``: the triangulation table (for
    DE lost and TE). Per component, the ``n_named`` largest contributions
    are named, the rest summed as "other"; markers show DE lost and TE
    (their difference is the self-repair, which the bars add up to).
    """
    comps = [c for c in components if c in set(contrib["component"])]
    with _style():
        fig = new_figure(max(5.5, 1.2 * len(comps) + 3.0), 3.8)
        ax = fig.add_subplot()
        cmap = ["#0072B2", "#56B4E9", "#009E73", "#F0E442", "#E69F00", "#D55E00"]
        for i, c in enumerate(comps):
            g = contrib[contrib["component"] == c].copy()
            g = g.reindex(g["delta_de"].abs().sort_values(ascending=False, kind="stable").index)
            named = g.head(n_named)
            rest = g.iloc[n_named:]["delta_de"].sum()
            parts = list(zip(named["downstream"], named["delta_de"])) + ([("other", rest)] if len(g) > n_named else [])
            pos_base, neg_base = 0.0, 0.0
            for k, (d, v) in enumerate(parts):
                col = PALETTE["NORM"] if d == "NORM" else PALETTE["other"] if d == "other" else cmap[k % len(cmap)]
                b = pos_base if v >= 0 else neg_base
                ax.bar(i, v, bottom=b, width=0.6, color=col, edgecolor="white", linewidth=0.5)
                if abs(v) > 0:
                    ax.text(i + 0.32, b + v / 2, d, fontsize=6, va="center")
                if v >= 0:
                    pos_base += v
                else:
                    neg_base += v
            r = table[table["component"] == c].iloc[0]
            ax.scatter([i - 0.38], [r["de_lost"]], marker="_", s=120, color="black", zorder=3)
            ax.scatter([i - 0.38], [r["total_effect"]], marker="_", s=120, color="#D55E00", zorder=3)
        ax.scatter([], [], marker="_", s=80, color="black", label="DE lost")
        ax.scatter([], [], marker="_", s=80, color="#D55E00", label="total effect")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(comps)), comps)
        ax.set_xlim(-0.7, len(comps) - 0.1)
        ax.set_ylabel("change of downstream direct effect (ΔDE)")
        _title(ax, "Who compensated: self-repair split over downstream components and the final norm")
        ax.legend(loc="upper right", frameon=False)
        _caption(fig, caption)
    return fig


# ------------------------------------------------------------------ iterated ablation
def iterated_curve(summary: pd.DataFrame, *, caption: str = "") -> Any:
    """The target's marginal effect as its compensators are ablated with it, step by step.

    ``summary``: ``IteratedAblation.summary()`` (``step``, ``ablated``,
    ``added``, ``target_marginal`` and ``total_effect`` with intervals,
    ``target_de_lost``).
    """
    with _style():
        fig = new_figure(4.8, 3.4)
        ax = fig.add_subplot()
        x = summary["step"].to_numpy()
        key = "target_marginal" if "target_marginal" in summary else "total_effect"
        y = summary[key].to_numpy(float)
        ax.fill_between(x, summary[f"{key}_lo"].to_numpy(float), summary[f"{key}_hi"].to_numpy(float),
                        color="#0072B2", alpha=0.2, linewidth=0)
        target = str(summary["ablated"].iloc[0])
        ax.plot(x, y, marker="o", color="#0072B2",
                label=f"cost of removing {target}" if key == "target_marginal" else "total effect (TE)")
        if key == "target_marginal":
            ax.plot(x, summary["total_effect"].to_numpy(float), marker="s", color="#999999", linestyle=":",
                    label="TE of everything ablated")
        d = float(summary["target_de_lost"].iloc[0])
        ax.axhline(d, color="black", linestyle="--", linewidth=0.8, label=f"{target}'s DE lost")
        labels = [target] + [f"+{a}" for a in summary["added"].iloc[1:]]
        ax.set_xticks(x, labels, rotation=20)
        ax.set_xlabel("components ablated together (cumulative)")
        ax.set_ylabel("metric units")
        _title(ax, f"Iterated ablation of {target} and its compensators")
        ax.legend(loc="best", frameon=False)
        _caption(fig, caption)
    return fig


# ------------------------------------------------------------------ attribution vs exact
def attribution_vs_exact(table: pd.DataFrame, *, caption: str = "") -> Any:
    """Attribution estimate against exact denoising restoration, with the identity line."""
    with _style():
        fig = new_figure(4.0, 3.8)
        ax = fig.add_subplot()
        x, y = table["restoration"].to_numpy(float), table["attribution"].to_numpy(float)
        lo, hi = np.nanmin(np.r_[x, y, 0.0]), np.nanmax(np.r_[x, y, 0.0])
        ax.plot([lo, hi], [lo, hi], color="black", linestyle="--", linewidth=0.8, label="identity")
        ax.scatter(x, y, s=14, color="#0072B2", zorder=2)
        ax.set_xlabel("exact restoration (activation patching, denoise)")
        ax.set_ylabel("attribution estimate / gap")
        _title(ax, "Attribution patching vs exact patching")
        ax.legend(loc="upper left", frameon=False)
        _caption(fig, caption)
    return fig


def save_figure(fig: Any, folder: Any, name: str, dpi: int = 130) -> dict[str, Any]:
    """Write ``name``.png and ``name``.svg into ``folder``; returns {"png": path, "svg": path}.

    The figure's layout engine (constrained) runs once, at the saving dpi,
    and is then removed: ``savefig`` on a figure with any layout engine (the
    "none" placeholder included) first draws the whole figure without output,
    so each file now costs one draw instead of two. Same files as before.
    """
    from pathlib import Path

    import matplotlib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    with _style():
        engine = fig.get_layout_engine()
        if engine is not None:
            dpi0 = fig.get_dpi()
            fig.set_dpi(dpi)  # measure text as savefig's own layout pass does (the PNG's renderer)
            engine.execute(fig)
            fig.set_dpi(dpi0)
            with matplotlib.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
                fig.set_layout_engine(None)  # no engine at all (not the placeholder), whatever the rcParams
        for ext in ("png", "svg"):
            p = folder / f"{name}.{ext}"
            meta = {"Software": None} if ext == "png" else {"Date": None}
            fig.savefig(p, dpi=dpi, metadata=meta)
            out[ext] = p
    return out


__all__ = ["MEASURES", "PALETTE", "VERDICT_COLOURS", "attribution_vs_exact", "claim_caption", "compensation_bars",
           "evidence_map", "heatmaps", "iterated_curve", "new_figure", "patch_vs_ablate", "save_figure",
           "te_vs_de_lost"]
