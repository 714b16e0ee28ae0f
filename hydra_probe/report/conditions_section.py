"""The report section "Does the claim survive another counterfactual?" (a :class:`ConditionComparison`).

* :func:`parse_conditions` turns ``--conditions all|LIST`` into the lists of
  :func:`~hydra_probe.claims.conditions.compare_conditions`, the report's own
  corruption, ablation value and metric first (the reference condition, whose
  verdict is the report's claim).
* :func:`conditions_grid` draws the component x condition grid of verdicts.
* :func:`conditions_blocks` appends the section to a :class:`~.blocks.Doc`;
  :func:`conditions_section` is the report's section (``section(d, ctx)``;
  it writes nothing when the report has no ``"conditions"`` result).
* :func:`conditions_tables` gives the section's tables (written as CSV).

Assembly only: every number and verdict comes from the comparison's frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..claims.conditions import FACTORS, corruptions_of
from ..errors import OptionError
from ..formatting import fmt
from ..interventions import ABLATION_VALUES
from ..metrics import METRICS
from .figures import VERDICT_COLOURS, _caption, _style, _title, new_figure

TITLE = "Does the claim survive another counterfactual?"

#: Short names of the verdicts in grid cells.
SHORT = {"agree: important": "important", "masked by self-repair": "masked", "necessity only": "necessity",
         "restoration only": "restoration", "agree: minor": "minor"}

#: The metrics ``--conditions all`` adds to the report's own (read from the same forwards).
ALL_METRICS = ("logit_diff", "logprob")


def parse_conditions(spec: str, task: Any, value: str, metric: str) -> dict[str, list[str]]:
    """``"all"`` or a comma-separated list of corruption, ablation-value and metric names -> the lists of
    ``compare_conditions`` (keys ``corruptions``, ``values``, ``metrics``).

    The report's own corruption (the task's), ``value`` and ``metric`` come first (the reference
    condition). ``all``: every corruption the task can make, every ablation value, and the metrics
    logit_diff and logprob. A list adds the named choices; a factor it does not name stays at the
    report's own. Raises :class:`~hydra_probe.errors.OptionError` for an unknown name.
    """
    own_c = task.corruption
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise OptionError("--conditions is empty; give 'all' or a list such as abc,zero,logprob.")
    if items == ["all"]:
        return {"corruptions": list(corruptions_of(task)),
                "values": [value] + [v for v in ABLATION_VALUES if v != value],
                "metrics": [metric] + [m for m in ALL_METRICS if m != metric]}
    out = {"corruptions": [own_c], "values": [value], "metrics": [metric]}
    known_c = set(corruptions_of(task))
    from ..tasks.ioi import CORRUPTIONS

    for it in items:
        if it in ABLATION_VALUES:
            key = "values"
        elif it in METRICS:
            key = "metrics"
        elif it in known_c or it in CORRUPTIONS:
            key = "corruptions"
        else:
            raise OptionError(f"--conditions: {it!r} is neither a corruption ({', '.join(sorted(known_c | set(CORRUPTIONS)))}), "
                              f"an ablation value ({', '.join(ABLATION_VALUES)}) nor a metric ({', '.join(METRICS)}); "
                              "give 'all' or a comma-separated list of those.")
        if it not in out[key]:
            out[key].append(it)
    return out


def _order(cmp: Any, components: Sequence[str] | None) -> list[str]:
    names = list(dict.fromkeys(cmp.to_frame()["component"]))
    return names if components is None else [c for c in components if c in names]


def conditions_grid(cmp: Any, components: Sequence[str] | None = None, *, caption: str = "") -> Any:
    """Component (rows) x condition (columns) grid of verdicts, coloured as in the evidence map; the reference
    condition's column is outlined. Returns a matplotlib Figure."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    comps = _order(cmp, components)
    grid = cmp.grid(comps)
    verdicts = list(VERDICT_COLOURS)
    codes = grid.apply(lambda col: col.map(lambda v: verdicts.index(v) if v in verdicts else -1))
    with _style():
        w = min(16.0, 2.2 + 0.55 * grid.shape[1])
        fig = new_figure(w, 1.6 + 0.32 * grid.shape[0])
        ax = fig.add_subplot()
        ax.imshow(codes.to_numpy(), cmap=ListedColormap([VERDICT_COLOURS[v] for v in verdicts]), vmin=0,
                  vmax=len(verdicts) - 1, aspect="auto")
        ax.set_yticks(range(len(comps)), comps)
        ax.set_xticks(range(grid.shape[1]), list(grid.columns), rotation=60, ha="right")
        ax.set_xlabel(grid.columns.name or "condition")
        ref = cmp.reference
        varying = [k for k in FACTORS if cmp.to_frame()[k].nunique() > 1] or ["metric"]
        ref_key = " / ".join(str(ref[k]) for k in varying)
        if ref_key in list(grid.columns):
            j = list(grid.columns).index(ref_key)
            ax.add_patch(Rectangle((j - 0.5, -0.5), 1, len(comps), fill=False, linewidth=1.6, edgecolor="black"))
        ax.set_xticks([x - 0.5 for x in range(1, grid.shape[1])], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, len(comps))], minor=True)
        ax.grid(which="minor", color="white", linewidth=1.0)
        ax.tick_params(which="minor", length=0)
        for s in ax.spines.values():
            s.set_visible(False)
        present = [v for v in verdicts if (grid == v).any().any()]
        ax.legend(handles=[Patch(color=VERDICT_COLOURS[v], label=v) for v in present], loc="upper left",
                  bbox_to_anchor=(1.0, 1.0), frameon=False, title="verdict", title_fontsize=7)
        _title(ax, "Verdict per component under each condition (outlined: the report's own)")
        _caption(fig, caption)
    return fig


def conditions_tables(cmp: Any) -> dict[str, pd.DataFrame]:
    """The section's tables by file stem: the frame, the summary, the grid and the per-prompt frames."""
    return {"conditions": cmp.to_frame(), "conditions_summary": cmp.summary(),
            "conditions_grid": cmp.grid().reset_index(),
            "conditions_per_prompt_ablation": cmp.per_prompt("ablation"),
            "conditions_per_prompt_patching": cmp.per_prompt("patching")}


def conditions_blocks(d: Any, cmp: Any, top: Sequence[str] | None = None, figures: Mapping[str, Path] | None = None,
                      *, level: int = 2, report_verdicts: Mapping[str, str] | None = None) -> None:
    """Append the section to the Doc ``d``: how to read it, the grid (figure and table), the summary and one
    sentence per top component. ``report_verdicts`` ({component: verdict} of the triangulation table) are
    checked against the reference condition's."""
    p = cmp.provenance
    f = cmp.to_frame()
    comps = _order(cmp, top)
    ref = cmp.reference
    d.h(level, TITLE)
    n_cond = len(f.drop_duplicates(list(FACTORS)))
    d.p(f"A verdict is made under one counterfactual: one corruption, one ablation value, one metric. Here every "
        f"component's evidence and verdict are measured again under {n_cond} conditions: corruptions "
        f"{', '.join(f'`{c}`' for c in p['corruptions'])} × ablation values {', '.join(f'`{v}`' for v in p['values'])} "
        f"× metrics {', '.join(f'`{m}`' for m in p['metrics'])}"
        + (f" × prompt families {', '.join(f'`{x}`' for x in p['families'])}" if len(p["families"]) > 1 else "")
        + f", with the report's verdict rule and threshold ({fmt(p['threshold'])}; TE and DE lost against each "
        "condition's own scale, restoration and damage against its own clean - corrupted gap)"
        + (". The report's paired and iterated ablations (run once, under its own value and metric) count as "
           "backup evidence in every condition with that value and metric" if p.get("backups") else "")
        + f". The reference condition (outlined) is the report's own: corruption `{ref['corruption']}`, "
        f"value `{ref['value']}`, metric `{ref['metric']}`. A claim that holds across a row does not depend on these "
        "choices; where a row changes colour, the summary names the factor that changes it (two conditions that "
        "differ only in that factor disagree); `direction` means denoising alone and noising alone would give "
        "different verdicts.")
    nonlin = [m for m in p["metrics"] if not f.loc[f["metric"] == m, "linear"].all()]
    if nonlin:
        d.p(f"{', '.join(f'`{m}`' for m in nonlin)} {'is' if len(nonlin) == 1 else 'are'} not linear in the logits: "
            "direct effect lost and self-repair are undefined there, so those verdicts rest on the total effect, "
            "restoration and damage (a component can be \"masked by self-repair\" only under a linear metric).")
    unmoved = f.loc[f["note"].str.contains("unchanged", regex=False), ["corruption", "metric"]].drop_duplicates()
    if len(unmoved):
        d.p("Patching scores are undefined where a corruption leaves the metric's mean unchanged: "
            + ", ".join(f"`{c}` with `{m}`" for c, m in unmoved.itertuples(index=False)) + ".")
    if figures is not None and "conditions_grid" in figures:
        d.fig("conditions_grid", f"Verdict of each top component under each condition ({p['model']}).")
    grid = cmp.grid(comps).apply(lambda col: col.map(lambda v: SHORT.get(v, v))).reset_index()
    d.table(grid, f"Verdicts (short names: {', '.join(f'{s} = {v}' for v, s in SHORT.items())}); columns: "
                  f"{cmp.grid().columns.name}. All rows in tables/conditions_grid.csv.")
    s = cmp.summary().set_index("component").loc[comps].reset_index()
    d.table(pd.DataFrame({"component": s["component"], "claim (reference)": s["verdict"],
                          "holds in": [f"{h} of {n}" for h, n in zip(s["holds"], s["n_conditions"])],
                          "verdicts": s["verdicts"], "changed by": s["factors"]}),
            "Per component: the reference verdict, in how many conditions it holds, every verdict it gets, and the "
            "factors that change it.")
    d.h(level + 1, "Under which choices does each claim hold?")
    d.items(cmp.sentences(comps))
    if report_verdicts:
        at = f
        for k in FACTORS:
            at = at[at[k] == ref[k]]
        mism = [c for c in comps if c in report_verdicts
                and report_verdicts[c] != at.loc[at["component"] == c, "verdict"].iloc[0]]
        if mism:
            d.p("Note: under the reference condition the verdict of " + ", ".join(mism) + " differs from the "
                "triangulation table's (the table also weighs evidence measured once, e.g. confirmed backups).")


def conditions_section(d: Any, ctx: Any) -> None:
    """The report's section (``section(d, ctx)``); nothing when the report has no ``"conditions"`` result."""
    cmp = ctx.results.get("conditions")
    if cmp is None:
        return
    verdicts = dict(zip(ctx.table["component"], ctx.table["verdict"]))
    conditions_blocks(d, cmp, ctx.top, ctx.figures, report_verdicts=verdicts)


__all__ = ["ALL_METRICS", "SHORT", "TITLE", "conditions_blocks", "conditions_grid", "conditions_section",
           "conditions_tables", "parse_conditions"]
