"""Issue 14: a stacked forward that leaves the rows before some position as the unedited run has them runs the
later rows only (``Runner.suffix_rows``; ``Adapter.run_blocks(first_row=)``, :mod:`hydra_probe.models.suffix`).

Clean and corrupted IOI prompts share every token before the second subject, so patching between them changes
nothing before it; the route runs the rows from there on, each attention taking the unedited run's keys and
values of the earlier rows. Every family's tiny float64 model gives the same activation patching (both
directions, per-position residual patches, positions given) as the plain computation, the route is shown to
run, a cut one row too late changes the numbers, and a model whose check fails runs every row.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tiny
import torch

import hydra_probe as hp
import hydra_probe.models.suffix as sx
from hydra_probe.models.adapter import Adapter
from hydra_probe.runner import Runner

ALL = tiny.FAMILIES + tiny.NEW_FAMILIES


@functools.lru_cache(maxsize=None)
def build(family: str):
    m = tiny.model64(family)
    return m, tiny.ioi(m, 6, corruption="abc")


@pytest.fixture
def rows(monkeypatch):
    """The ``first_row`` of every ``Adapter.run_blocks`` call."""
    seen: list[int] = []
    real = Adapter.run_blocks

    def spy(self, *a, **k):
        seen.append(k.get("first_row", 0))
        return real(self, *a, **k)

    monkeypatch.setattr(Adapter, "run_blocks", spy)
    return seen


def patching(m, t):
    out = []
    for d in ("denoise", "noise"):
        f = hp.activation_patch(m, t, "all", d, progress=False).to_frame()
        out.append(f.select_dtypes("number").to_numpy())
    f = hp.activation_patch(m, t, ["RESID1", "L0H1", "MLP1"], "denoise", per_position=True, progress=False)
    out.append(f.to_frame().select_dtypes("number").to_numpy())
    f = hp.activation_patch(m, t, "heads", "noise", positions=[-1, -3], progress=False)
    out.append(f.to_frame().select_dtypes("number").to_numpy())
    for which in ("qkv", "k"):  # path patching: deliveries of the senders' changes (k: GQA shadow copies)
        f = hp.path_patch(m, t, ["L0H1", "MLP0"], [["logits"], ["all"], ["L2H1"]], "noise", receiver_input=which,
                          progress=False)
        out.append(f.to_frame().select_dtypes("number").to_numpy())
    return out


def both(m, t, monkeypatch):
    got = {}
    for flag in (False, True):
        monkeypatch.setattr(Runner, "suffix_rows", flag)
        got[flag] = patching(m, t)
    return got


@pytest.mark.parametrize("family", ALL)
def test_later_rows_only_equal_every_row(family, monkeypatch, rows):
    m, t = build(family)
    got = both(m, t, monkeypatch)
    for a, b in zip(got[False], got[True]):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)
    assert max(rows) > 0, "the later-rows route never ran"
    assert m.adapter._suffix_ok.get(m.adapter.config._attn_implementation) is True


def test_ablations_run_every_row(rows):
    m, t = build("llama")
    rows.clear()
    hp.ablate(m, t, "heads", "zero", progress=False)
    assert set(rows) == {0}  # a zero ablation changes the first row


def test_a_cut_one_row_too_late_changes_the_numbers(monkeypatch):
    """Negative control: starting one row after the first changed position loses that row's change."""
    m, t = build("llama")
    monkeypatch.setattr(Runner, "suffix_rows", False)
    plain = hp.activation_patch(m, t, "heads", "denoise", progress=False).to_frame()["patched_metric"].to_numpy()
    monkeypatch.setattr(Runner, "suffix_rows", True)
    real = Runner._first_edited_row
    monkeypatch.setattr(Runner, "_first_edited_row", lambda self, *a: real(self, *a) + 1)
    late = hp.activation_patch(m, t, "heads", "denoise", progress=False).to_frame()["patched_metric"].to_numpy()
    assert np.abs(late - plain).max() > 1e-6


def test_a_model_failing_the_check_runs_every_row(monkeypatch, rows):
    """Without the earlier rows' keys the route's own check fails: every row runs, with the plain numbers."""
    m = tiny.model64("qwen2")
    t = tiny.ioi(m, 6, corruption="abc")
    monkeypatch.setattr(Runner, "suffix_rows", False)
    plain = hp.activation_patch(m, t, "heads", "denoise", progress=False).to_frame()["patched_metric"].to_numpy()
    monkeypatch.setattr(Runner, "suffix_rows", True)
    monkeypatch.setattr(sx, "prefix_keys_function", lambda *a, **k: __import__("contextlib").nullcontext(False))
    import hydra_probe.models.adapter as adm
    monkeypatch.setattr(adm, "prefix_keys_function", sx.prefix_keys_function)
    rows.clear()
    got = hp.activation_patch(m, t, "heads", "denoise", progress=False).to_frame()["patched_metric"].to_numpy()
    np.testing.assert_allclose(got, plain, rtol=1e-10, atol=1e-12)
    assert m.adapter._suffix_ok == {"sdpa": False}
    assert max(rows) > 0 and set(rows[1:]) == {0}  # only the check ran the later rows


def test_suffix_call_cuts_known_arguments_only():
    T, r = 7, 3
    mask = torch.zeros(2, 1, T, T)
    cos = torch.randn(1, T, 4)
    args, kw = sx.suffix_call((None,), {"attention_mask": mask, "position_ids": torch.arange(T)[None],
                                        "position_embeddings": (cos, cos), "use_cache": False}, r, T)
    assert kw["attention_mask"].shape == (2, 1, T - r, T) and kw["position_ids"].tolist() == [[3, 4, 5, 6]]
    assert kw["position_embeddings"][0].shape == (1, T - r, 4) and kw["use_cache"] is False
    assert sx.suffix_call((), {"alibi": torch.zeros(2, 1, T)}, r, T) is None
    assert sx.suffix_call((torch.zeros(1),), {}, r, T) is None


def attribution(m, t):
    out = []
    for d, comps in (("denoise", "all"), ("noise", "heads")):
        out.append(hp.attribution_patch(m, t, comps, d, method="atp*", progress=False).to_frame()["estimate"])
    out.append(hp.attribution_patch(m, t, ["RESID1", "L0H1"], "denoise", per_position=True,
                                    progress=False).to_frame()["estimate"])
    return [o.to_numpy() for o in out]


@pytest.mark.parametrize("family", ALL)
def test_attribution_on_the_later_rows_equals_every_row(family, monkeypatch, rows):
    """AtP and AtP* (QK fix, GradDrop) with the gradient forward, GradDrop and the composed QK fix on the rows from
    the first clean/corrupted difference on equal the plain computation (where the model's RMSNorm rounds in
    float32 even in a float64 model, the QK fix's earlier keys come from the model, not composed: the composed
    route's tolerance, tests/test_atp_fast.py)."""
    m, t = build(family)
    qk_rows: list[int] = []
    real = Adapter._suffix_attention

    def spy(self, prefix, layer, first, state, **kw):
        qk_rows.append(first)
        return real(self, prefix, layer, first, state, **kw)

    monkeypatch.setattr(Adapter, "_suffix_attention", spy)
    got = {}
    for flag in (False, True):
        monkeypatch.setattr(Runner, "suffix_rows", flag)
        rows.clear()
        got[flag] = attribution(m, t)
        # the QK fix's composed route (lone heads of blocks without a post-attention norm) ran on the later rows
        assert bool(qk_rows) == (flag and not m.adapter.has_post_attn_norm)
    tol = 1e-9 if m.adapter.table.norm_kind == "layernorm" else 1e-4
    for a, b in zip(got[False], got[True]):
        np.testing.assert_allclose(b, a, rtol=0, atol=tol * max(float(np.abs(a).max()), 1e-12))
    assert max(rows) > 0


def test_attribution_rows_cut_one_too_late_change_the_estimates(monkeypatch):
    """Negative control: zeroing the gradient at the first differing position too loses its estimate."""
    m, t = build("llama")
    monkeypatch.setattr(Runner, "suffix_rows", True)
    plain = attribution(m, t)
    real = Runner.first_difference
    monkeypatch.setattr(Runner, "first_difference", lambda self, g: real(self, g) + 1)
    late = attribution(m, t)
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, late)) > 1e-6


def test_grouped_query_calls_use_torchs_kernel_with_the_same_numbers(monkeypatch):
    """On the later rows a masked grouped-query sdpa call runs torch's grouped-query kernel (no repeated keys);
    the numbers are transformers' own (its repeat-the-keys path, forced by refusing the kernel)."""
    m, t = build("qwen2")
    assert m.adapter.n_kv_heads < m.adapter.n_heads
    calls = []
    real = sx._sdpa_gqa
    monkeypatch.setattr(sx, "_sdpa_gqa", lambda *a: (calls.append(1), real(*a))[1])
    got = hp.activation_patch(m, t, "heads", "denoise", progress=False).to_frame()["patched_metric"].to_numpy()
    assert calls
    monkeypatch.setattr(sx, "_plain_gqa", lambda *a: False)
    want = hp.activation_patch(m, t, "heads", "denoise", progress=False).to_frame()["patched_metric"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_a_short_shared_prefix_runs_every_row(rows):
    """A few shared first rows (a template's opening under a mean ablation) are not worth the route: every row."""
    assert [sx.min_shared_rows(T) for T in (4, 15, 16, 40)] == [2, 4, 4, 10]
    m, t = build("llama")
    ad = m.adapter
    P = ad.prefix(t.batch(t.groups()[0], "clean"))
    assert not ad.suffix_ready(P, 0, 1) and not ad.suffix_ready(P, 0, sx.min_shared_rows(P.resid[0].shape[1]) - 1)
    rows.clear()
    hp.ablate(m, t, "heads", "mean", progress=False)
    assert set(rows) == {0}
