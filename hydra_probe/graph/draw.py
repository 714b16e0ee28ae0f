"""Drawing a compensation graph: layers as columns, heads stacked, the norm on the right.

Reads a graph; computes nothing. matplotlib is imported inside the function
and the figure is built on an Agg canvas without pyplot, so no global state
(backend, style, rcParams) changes.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

from .build import NORM

COLOURS = {"compensation": "#0072B2", "amplification": "#D55E00"}  # Okabe-Ito blue / vermillion
_STYLE = {"confirmed": ("-", 1.0), "untested": ("-", 0.6), "refuted": ("--", 0.6)}


def layout(G: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Node positions: x = layer; heads stacked by index (head 0 on top), then the
    whole attention layer, the MLP at the bottom, joint groups below; NORM far right."""
    H = 1 + max([d.get("head", 0) for _, d in G.nodes(data=True) if d.get("kind") == "head"] or [0])
    L = int(G.graph.get("n_layers", 1 + max([d.get("layer", 0) for n, d in G.nodes(data=True) if n != NORM] or [0])))
    has_attn = any(d.get("kind") == "attn" for _, d in G.nodes(data=True))
    mlp_y = -float(H + 1) if has_attn else -float(H)
    pos: dict[str, tuple[float, float]] = {}
    groups = 0
    for n, d in G.nodes(data=True):
        kind, layer = d.get("kind"), float(d.get("layer", 0))
        if kind == "head":
            pos[n] = (layer, -float(d.get("head", 0)))
        elif kind == "attn":
            pos[n] = (layer, -float(H))
        elif kind == "mlp":
            pos[n] = (layer, mlp_y)
        elif kind == "norm" and str(n).startswith("POSTNORM"):   # a block's post-attention norm, after its layer
            pos[n] = (layer + 0.5, -float(H) + 0.5)
        elif kind == "norm" and n != NORM:                         # SOFTCAP, beside NORM
            pos[n] = (float(L), mlp_y / 2 - 1)
        elif kind == "norm" or n == NORM:
            pos[n] = (float(L), mlp_y / 2)
        else:
            pos[n] = (layer + 0.35, mlp_y - 1 - groups)
            groups += 1
    return pos


def draw_graph(G: nx.DiGraph, ax: Any = None, max_nodes: int = 40, *, max_edges: int = 80,
               title: str | None = None) -> Any:
    """Draw ``G`` and return the matplotlib ``Figure``.

    Every node is a marker (coloured by its clean direct effect ``de`` where
    known, outlined when it was ablated); the ``max_edges`` strongest edges
    (by ``|weight|``) are drawn with width by ``|weight|``, colour by sign
    (blue compensation, vermillion amplification) and line style by
    verification (solid confirmed, faint untested, dashed refuted). At most
    ``max_nodes`` nodes are labelled: those with the strongest drawn edges
    first, then the largest ``|de|``, so graphs of 100+ heads stay readable.
    ``ax``: an existing matplotlib Axes to draw into (its figure is returned).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch

    pos = layout(G)
    H = 1 + max([d.get("head", 0) for _, d in G.nodes(data=True) if d.get("kind") == "head"] or [0])
    L = int(max(x for x, _ in pos.values())) if pos else 0
    if ax is None:
        fig = Figure(figsize=(max(6.0, 0.75 * (L + 1) + 2.5), max(4.0, 0.32 * (H + 3) + 1.5)), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
    else:
        fig = ax.figure

    edges = sorted(G.edges(data=True), key=lambda e: -abs(e[2].get("weight", 0.0)))[:max_edges]
    wmax = max([abs(d.get("weight", 0.0)) for _, _, d in edges] or [1.0]) or 1.0
    for u, v, d in edges:
        w = abs(d.get("weight", 0.0))
        ls, alpha = _STYLE.get(d.get("verified", "untested"), ("-", 0.6))
        rad = 0.25 if pos[u][0] == pos[v][0] else 0.12
        # add_artist, not add_patch: the limits are set below, so no data-limit update (a bezier split per arrow)
        ax.add_artist(FancyArrowPatch(pos[u], pos[v], arrowstyle="-|>", mutation_scale=8 + 6 * w / wmax,
                                     connectionstyle=f"arc3,rad={rad}", linewidth=0.4 + 3.6 * w / wmax,
                                     linestyle=ls, alpha=alpha, shrinkA=5, shrinkB=5, zorder=1,
                                     color=COLOURS.get(d.get("sign"), "grey")))

    des = [d["de"] for _, d in G.nodes(data=True) if isinstance(d.get("de"), (int, float))]
    dmax = max([abs(x) for x in des] or [1.0]) or 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-dmax, vmax=dmax)
    cmap = "RdBu_r"
    sm = ScalarMappable(norm=norm, cmap=cmap)
    nodes = list(G.nodes(data=True))
    xs = [pos[n][0] for n, _ in nodes]
    ys = [pos[n][1] for n, _ in nodes]
    cols = [sm.to_rgba(d["de"]) if isinstance(d.get("de"), (int, float)) else (0.85, 0.85, 0.85, 1.0)
            for _, d in nodes]
    outline = ["black" if d.get("ablated") else (0.6, 0.6, 0.6, 1.0) for _, d in nodes]
    sizes = [70 if d.get("kind") in ("norm", "mlp", "attn", "group") else 40 for _, d in nodes]
    markers = {"norm": "s", "mlp": "D"}
    for mk in ("o", "s", "D"):
        idx = [i for i, (_, d) in enumerate(nodes) if markers.get(d.get("kind"), "o") == mk]
        if idx:
            ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], s=[sizes[i] for i in idx], marker=mk,
                       c=[cols[i] for i in idx], edgecolors=[outline[i] for i in idx], linewidths=0.8, zorder=2)

    strength: dict[str, float] = {}
    for u, v, d in edges:
        for n in (u, v):
            strength[n] = strength.get(n, 0.0) + abs(d.get("weight", 0.0))
    ranked = sorted(strength, key=lambda n: -strength[n])
    ranked += sorted((n for n, d in nodes if n not in strength and isinstance(d.get("de"), (int, float))),
                     key=lambda n: -abs(G.nodes[n]["de"]))
    for n in ranked[:max_nodes]:
        x, y = pos[n]
        ax.annotate(n, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7, zorder=3,
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.7))

    kinds = {d.get("kind") for _, d in nodes}
    yt = [-h for h in range(H)] if "head" in kinds else []
    yl = [f"H{h}" for h in range(H)] if "head" in kinds else []
    if "attn" in kinds:
        yt.append(-H)
        yl.append("ATTN")
    if "mlp" in kinds:
        yt.append(-(H + 1) if "attn" in kinds else -H)
        yl.append("MLP")
    if H > 16:  # keep head ticks legible
        keep = [i for i, lab in enumerate(yl) if not lab.startswith("H") or int(lab[1:]) % 2 == 0]
        yt, yl = [yt[i] for i in keep], [yl[i] for i in keep]
    ax.set_yticks(yt, yl, fontsize=7)
    ax.set_xticks(range(L + 1), [f"L{i}" for i in range(L)] + ["NORM"], fontsize=7)
    ax.set_xlim(-0.6, L + 0.8)
    ax.set_ylim(min(ys + [-float(H)]) - 0.8, 0.8)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    handles = [Line2D([], [], color=COLOURS["compensation"], lw=2, label="compensation (weight > 0)"),
               Line2D([], [], color=COLOURS["amplification"], lw=2, label="amplification (weight < 0)"),
               Line2D([], [], color="grey", lw=1.5, ls="-", label="confirmed / untested (faint)"),
               Line2D([], [], color="grey", lw=1.5, ls="--", label="refuted")]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncols=2,
              frameon=False)
    if des:
        fig.colorbar(sm, ax=ax, shrink=0.5, pad=0.01).set_label("clean direct effect (node colour)", fontsize=7)
    g = G.graph
    ax.set_title(title if title is not None else
                 f"Compensation graph: {g.get('model', '?')} on {g.get('task', '?')}\n"
                 f"ablation value={g.get('value', '?')}, metric={g.get('metric', '?')}, n={g.get('n', '?')}, "
                 f"edges = mean change of downstream DE", fontsize=8)
    return fig
