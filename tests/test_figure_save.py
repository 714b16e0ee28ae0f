"""Saving figures: one layout pass and one draw per file give the files matplotlib's own savefig gives;
the heatmaps of deep models label a readable subset of layers and keep a tick on every one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hydra_probe.report import figures as F


def _table(layers: int, heads: int, seed: int = 0) -> pd.DataFrame:
    """A triangulation-like table: ``layers`` x (``heads`` heads + the MLP), two measures."""
    rng = np.random.default_rng(seed)
    rows = [{"component": f"L{layer}H{h}", "layer": layer, "head": h, "kind": "head"}
            for layer in range(layers) for h in range(heads)]
    rows += [{"component": f"MLP{layer}", "layer": layer, "head": np.nan, "kind": "mlp"} for layer in range(layers)]
    t = pd.DataFrame(rows)
    t["direct_effect"] = rng.normal(size=len(t))
    t["total_effect"] = rng.normal(size=len(t))
    return t


@pytest.mark.parametrize(("n", "want"), [
    (1, [0]), (12, list(range(12))), (16, list(range(16))),
    (17, list(range(0, 17, 2))),                      # the last (16) is on the step already
    (30, [*range(0, 30, 2), 29]),                     # every 2nd layer, then the last
    (48, [*range(0, 48, 5), 47]),                     # step 5 (not 3): nice numbers
    (200, [*range(0, 200, 20), 199]),
])
def test_tick_subset(n, want):
    assert F.tick_subset(n) == want


def test_tick_subset_always_keeps_both_ends_and_at_most_17_labels():
    for n in range(1, 400):
        keep = F.tick_subset(n)
        assert keep[0] == 0 and keep[-1] == n - 1 and keep == sorted(set(keep)) and len(keep) <= 17


def test_deep_heatmap_labels_a_subset_and_ticks_every_layer():
    fig = F.heatmaps(_table(30, 20), {"direct_effect": "DE", "total_effect": "TE"})
    ax = fig.axes[0]
    y = [int(v) for v in ax.get_yticks()]
    assert y == [*range(0, 30, 2), 29] and [t.get_text() for t in ax.get_yticklabels()] == [str(v) for v in y]
    assert sorted(y + [int(v) for v in ax.get_yticks(minor=True)]) == list(range(30))  # a tick on every layer
    x = [t.get_text() for t in ax.get_xticklabels()]
    assert x == [*(str(h) for h in range(0, 20, 2)), "19", "MLP"]  # 20 heads thinned, the MLP always named
    assert len(ax.get_xticks()) + len(ax.get_xticks(minor=True)) == 21


def test_shallow_heatmap_labels_every_layer_and_head():
    ax = F.heatmaps(_table(12, 12), {"direct_effect": "DE"}).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(v) for v in range(12)]
    assert [t.get_text() for t in ax.get_xticklabels()] == [*(str(h) for h in range(12)), "MLP"]
    assert len(ax.get_yticks(minor=True)) == 0


def test_save_figure_writes_what_savefig_with_its_layout_engine_writes(tmp_path):
    """The layout runs once (then the engine is removed): the same PNG and SVG bytes as the former way, savefig
    with the constrained layout engine for the PNG, then with the "none" placeholder (the PNG's layout) for the
    SVG, which drew the figure twice per file."""
    t = _table(3, 4)

    def make():
        return F.heatmaps(t, {"direct_effect": "DE", "total_effect": "TE"}, caption="model | task | metric")

    fig = make()
    out = F.save_figure(fig, tmp_path / "new", "h")
    assert fig.get_layout_engine() is None
    ref = make()
    assert ref.get_layout_engine() is not None
    (tmp_path / "ref").mkdir()
    with F._style():
        ref.savefig(tmp_path / "ref" / "h.png", dpi=130, metadata={"Software": None})
        ref.set_layout_engine("none")
        ref.savefig(tmp_path / "ref" / "h.svg", dpi=130, metadata={"Date": None})
    for ext in ("png", "svg"):
        assert out[ext].read_bytes() == (tmp_path / "ref" / f"h.{ext}").read_bytes(), ext
    unlaid = make()  # guard: without the layout pass the file differs (so the equality above means something)
    unlaid.set_layout_engine(None)
    with F._style():
        unlaid.savefig(tmp_path / "unlaid.png", dpi=130, metadata={"Software": None})
    assert (tmp_path / "unlaid.png").read_bytes() != out["png"].read_bytes()
