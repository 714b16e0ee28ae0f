"""Why it repairs: the mechanisms of self-repair, and the per-layer Hydra regression.

For an ablated component c and each prompt (DESIGN.md section 2), self-repair
``SR = DEL - TE`` splits exactly over what changed downstream:

* each downstream head d (layer l, head h) writes, at the read (last) position,
  ``z_d = sum_j A_j v_j W_O^d`` (A: its attention weights of the last query,
  v_j: the value vectors of its key/value group). Its compensation splits as

      pattern = sum_j (A'_j - A_j) v_j  W_O^d     (the pattern moved, values held clean)
      values  = sum_j A'_j (v'_j - v_j) W_O^d     (the values moved, at the new pattern)

  both read like dDE_d (through the final norm at the clean scale sigma);
  ``order="values_first"`` splits the other way round
  (``values = sum_j A_j (v'_j - v_j)``, ``pattern = sum_j (A'_j - A_j) v'_j``) and
  ``"symmetric"`` is the mean of both orders. With grouped-query attention
  each query head is split with its own pattern and its group's values;
* each downstream MLP is one ``mlp`` row (split over neurons by
  :func:`~hydra_probe.effects.neurons.neuron_contributions`);
* the final-norm scale change is ``norm``; block norms' (``POSTNORM{L}``)
  are ``block_norm``, the logit soft-cap's ``softcap``. With post-attention
  norms (Gemma-2/3, OLMo-2) a head writes ``gamma_l W_O^h z_h / sigma_l``:
  pattern and values are read at the clean sigma_l, whose change is the
  layer's ``block_norm`` row.

Per (component, prompt) the amounts sum to ``self_repair`` exactly. With
``scale="frozen"`` a head's ``pattern + values`` is its
``self_repair(...).contributions()`` ``delta_de`` and an MLP's ``mlp`` row is
its ``delta_de``. With ``scale="recomputed"`` the head and MLP rows stay at the
clean scale (the mechanism does not depend on the scale policy) and each
downstream component's rescaling, ``DE_d(ablated; sigma') - DE_d(ablated; sigma)``,
is a ``norm`` row with that component as ``downstream`` (with post-attention
norms, a head's rescaling by its own layer's scale is a ``block_norm`` row
with the head as ``downstream``); the rows of d still sum to its recomputed
``delta_de``.

Everything comes from the forwards :func:`~hydra_probe.effects.self_repair`
runs (one stacked ablated forward per component, restarted at its layer),
with the attention weights of the last query and the value vectors captured
in the same forwards (attention runs with the eager implementation, which
returns its weights, for the duration of the call). With the nnsight backend
(also ``remote=True``) the same forwards are nnsight traces: each downstream
layer's values and last-query weights are computed in the trace from the
query, key and value its attention call receives (as the eager
implementation computes them, whatever implementation the server runs), and
the split itself is computed here.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..checks import public
from ..components import Group, select_groups
from ..errors import ArchitectureError, InputError, OptionError
from ..models.sites import Site
from ..results import Result, provenance
from .ablation import ablation_copies
from .common import as_model, check_scale, check_writers, make_runner, positions_of, value_name
from .self_repair import Partition, RunReadout, SelfRepair, decompose_run

ORDERS = ("pattern_first", "values_first", "symmetric")
MECHANISMS = ("pattern", "values", "mlp", "norm", "block_norm", "softcap")
_CAPTURE_BYTES = 1 << 28  # captured activations held at once (per run() call), about 256 MiB


class RepairMechanisms(Result):
    """Per ablated component x prompt x mechanism x downstream: ``amount``.

    Columns: ``component``, ``prompt``, ``mechanism`` (one of
    ``pattern``, ``values``, ``mlp``, ``norm``, ``block_norm``, ``softcap``),
    ``downstream`` (the head or MLP, or ``NORM`` / ``POSTNORM{L}`` /
    ``SOFTCAP``), ``amount`` (metric units). Per (component, prompt) the
    amounts sum to the self-repair (:meth:`self_repair_frame`). The split
    order is ``provenance["order"]``. ``component``, ``mechanism`` and
    ``downstream`` are categorical (the labels used, sorted; a saved result
    reads back the same): a run over hundreds of heads has millions of rows.
    """

    kind = "repair_mechanisms"

    def self_repair_frame(self) -> pd.DataFrame:
        """The self-repair rows of the same forwards: ``component``, ``prompt``, ``clean_de``, ``de_lost``,
        ``total_effect``, ``self_repair``, ``norm_term`` (as :func:`~hydra_probe.effects.self_repair`)."""
        return self.extras["self_repair"].copy()

    def contributions(self) -> pd.DataFrame:
        """The self-repair contributions of the same forwards (as ``SelfRepair.contributions()``)."""
        return self.extras["contributions"].copy()

    def as_self_repair(self) -> SelfRepair:
        """The same forwards' self-repair as a :class:`~hydra_probe.effects.SelfRepair` (numbers equal
        ``self_repair(...)``'s to floating-point error; attention ran eager here)."""
        prov = {k: v for k, v in self.provenance.items() if k not in ("order", "split", "attention")}
        return SelfRepair(self.extras["self_repair"], prov, {"contributions": self.extras["contributions"]})

    def mechanisms(self) -> list[str]:
        """The mechanisms with rows in this result, in :data:`MECHANISMS` order."""
        used = {str(x) for x in pd.unique(self._frame["mechanism"])}
        return [mm for mm in MECHANISMS if mm in used]

    def per_mechanism(self) -> pd.DataFrame:
        """Amounts summed over downstream components: ``component``, ``prompt``, one column per mechanism
        (zeros where absent) and ``self_repair``."""
        f = self._frame
        # (component, prompt) keys in first-appearance order, each mechanism's amounts summed into its column
        cc, comps = pd.factorize(f["component"])
        pc, prompts = pd.factorize(f["prompt"])
        key, first, inv = np.unique(cc.astype(np.int64) * len(prompts) + pc, return_index=True,
                                    return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty(len(key), dtype=np.int64)
        rank[order] = np.arange(len(key))
        row = rank[inv.reshape(-1)]
        mc, mu = pd.factorize(f["mechanism"])
        col = np.array([MECHANISMS.index(str(x)) for x in mu], dtype=np.int64)[mc]
        M = len(MECHANISMS)
        wide = np.bincount(row * M + col, weights=f["amount"].to_numpy(dtype=float), minlength=len(key) * M)
        keys = key[order]
        out = pd.DataFrame({"component": np.asarray(comps)[keys // len(prompts)],
                            "prompt": np.asarray(prompts)[keys % len(prompts)]})
        for j, mm in enumerate(MECHANISMS):
            out[mm] = wide.reshape(len(key), M)[:, j]
        sr = self.extras["self_repair"].set_index(["component", "prompt"])["self_repair"]
        out["self_repair"] = sr.reindex(pd.MultiIndex.from_frame(out[["component", "prompt"]])).to_numpy()
        return out

    def summary(self, level: float = 0.95) -> pd.DataFrame:
        """Per component and mechanism: mean amount per prompt (summed over downstream components) with a
        ``level`` Student-t interval across prompts, and ``share`` = mean amount / mean self-repair."""
        from ..stats import grouped_t

        w = self.per_mechanism()
        mechs = self.mechanisms()
        long = w.melt(id_vars=["component"], value_vars=mechs, var_name="mechanism", value_name="amount")
        g = grouped_t(long, ["component", "mechanism"], "amount", level)
        sr = w.groupby("component", sort=False)["self_repair"].mean()
        comps = list(sr.index)
        # components in first-appearance order, mechanisms in MECHANISMS order within each
        g["_c"] = g["component"].map({c: i for i, c in enumerate(comps)})
        g["_m"] = g["mechanism"].map({mm: i for i, mm in enumerate(mechs)})
        g = g.sort_values(["_c", "_m"], kind="stable")
        srv = g["component"].map(sr).to_numpy(dtype=float)
        m = g["mean"].to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(np.abs(srv) > 1e-12, m / srv, np.nan)
        out = pd.DataFrame({"component": g["component"].to_numpy(), "mechanism": g["mechanism"].to_numpy(),
                            "n": g["n"].to_numpy(), "amount": m, "amount_lo": g["lo"].to_numpy(),
                            "amount_hi": g["hi"].to_numpy(), "self_repair": srv, "share": share})
        out.attrs["interval"] = f"{int(level * 100)}% Student-t interval of the mean across prompts"
        return out

    def by_downstream(self, level: float = 0.95) -> pd.DataFrame:
        """Per (component, downstream, mechanism): ``n``, ``mean``, ``lo``, ``hi``, ``p`` (two-sided t test)."""
        from ..stats import grouped_t

        return grouped_t(self._frame, ["component", "downstream", "mechanism"], "amount", level)


def _check_order(order: Any) -> str:
    if order not in ORDERS:
        raise OptionError(f"unknown split order {order!r}; choose 'pattern_first' (pattern with clean values, "
                          "then values at the new pattern), 'values_first' or 'symmetric' (the mean of both).")
    return order


def _mechanism_of(name: str) -> str:
    if re.fullmatch(r"L\d+H\d+", name):
        return "head"
    if name.startswith("MLP"):
        return "mlp"
    if name.startswith("POSTNORM"):
        return "block_norm"
    if name == "SOFTCAP":
        return "softcap"
    return "norm"


@public
def repair_mechanisms(model: Any, task: Any, components: Any = "heads", value: Any = "mean", scale: str = "frozen",
                      order: str = "pattern_first", *, metric: Any = "logit_diff", positions: Any = None,
                      seed: int = 0, progress: bool | None = None) -> RepairMechanisms:
    """The mechanisms of each component's self-repair, exactly (see module doc).

    Args:
        model, task, components, value, scale, metric, positions, seed, progress:
            as :func:`~hydra_probe.effects.self_repair`.
        order: ``"pattern_first"`` (pattern at clean values, then values at
            the new pattern; DESIGN.md's definition), ``"values_first"`` or
            ``"symmetric"`` (the mean of both). Recorded in the provenance.

    Returns:
        :class:`RepairMechanisms` (amounts in metric units per prompt).
    """
    model = as_model(model)
    check_scale(scale)
    _check_order(order)
    vname = value_name(value)
    groups = select_groups(model, components)
    check_writers(groups, "self-repair")
    pos = positions_of(positions)
    ad = model.adapter
    L = ad.n_layers
    with ad.eager_attention():
        runner, m = make_runner(model, task, metric, value, seed, progress, positions=pos)
        ro = runner.readout  # raises for a non-linear metric, before any forward
        fin = ro.components
        col_of = {c.name: i for i, c in enumerate(fin)}
        clean_sites = {Site(l, k) for l in range(1, L) for k in ("values", "attn_last")}
        base = runner.run("clean", [()], readout=True, capture=clean_sites,
                          capture_positions="all" if clean_sites else "last")[0]
        n = len(task)
        clean_rr = RunReadout.of(ro, base, n)
        clean = _CleanHeads(ad, ro, runner.groups, base)
        clean.check(clean_rr, col_of)
        capped = ad.softcap is not None
        copies = ablation_copies(model, groups, vname, pos)
        lmin = [g.layer for g in groups]
        need_v = order != "pattern_first"
        rows = _Rows(col_of, n, scale, ro.has_post_norms)
        srs: list[Any] = [None] * len(groups)
        cons: list[Any] = [None] * len(groups)
        T = max(task.lengths)
        for lm in sorted(set(lmin)):
            todo = [i for i, x in enumerate(lmin) if x == lm]
            sites = {Site(l, "attn_last") for l in range(lm + 1, L)}
            if need_v:
                sites |= {Site(l, "values") for l in range(lm + 1, L)}
            per_copy = (sum(ad.site_width(s) for s in sites) + ad.d_model) * n * T * 8
            size = max(1, _CAPTURE_BYTES // per_copy)
            for k in range(0, len(todo), size):
                chunk = todo[k: k + size]
                outs = runner.run("clean", [copies[i] for i in chunk], readout=True, label="repair mechanisms",
                                  capture=sites, capture_positions="all" if sites else "last")
                for i, o in zip(chunk, outs):
                    abl = RunReadout.of(ro, o, n)
                    parts = Partition.of(groups[i], ro, model.parallel_residual)
                    sr, con = decompose_run(groups[i].name, parts, clean=clean_rr, ablated=abl, scale=scale,
                                         softcap=capped)
                    split = clean.split(o, lm, order) if sites else {}
                    rows.add(i, groups[i], con, split, clean_rr, abl)
                    srs[i], cons[i] = sr, con
    prov = provenance(model, task, metric=m, value=value, scale=scale, seed=seed,
                      positions=None if pos is None else list(pos), order=order, attention="eager",
                      split=("pattern = sum_j (A'_j - A_j) v_j W_O, values = sum_j A'_j (v'_j - v_j) W_O"
                             if order == "pattern_first" else
                             "values = sum_j A_j (v'_j - v_j) W_O, pattern = sum_j (A'_j - A_j) v'_j W_O"
                             if order == "values_first" else "mean of the pattern-first and values-first splits"))
    return RepairMechanisms(rows.frame(), prov,
                            {"self_repair": pd.concat(srs, ignore_index=True),
                             "contributions": pd.concat(cons, ignore_index=True)})


class _CleanHeads:
    """The clean run's pattern and values, read through each head's output matrix and the metric direction."""

    def __init__(self, ad: Any, ro: Any, groups: list[list[int]], base: Any) -> None:
        self.ad, self.ro, self.groups = ad, ro, groups
        self.n = sum(len(g) for g in groups)
        self.L, self.H = ad.n_layers, ad.n_heads
        self.w: dict[tuple[int, int], torch.Tensor] = {}    # (g, l) -> (B, H, dh) W_O^h P(gamma u)
        self.vw: dict[tuple[int, int], torch.Tensor] = {}   # (g, l) -> (B, T, H) v_j . w_h (clean)
        self.A: dict[tuple[int, int], torch.Tensor] = {}    # (g, l) -> (B, T, H) clean weights of the last query
        self.v: dict[tuple[int, int], torch.Tensor] = {}    # (g, l) -> (B, T, n_kv * dh) clean values
        for g, idx in enumerate(groups):
            r = ro.read_vector(ro.u[torch.tensor(idx)])
            for l in range(1, self.L):
                # head writes before any post-attention norm's division: gamma_post * W_O^h z_h
                rl = r if ro.post_gamma is None else r * ro.post_gamma[l]
                w = torch.einsum("hkd,bd->bhk", ro.W_O[l], rl).cpu()
                self.w[g, l] = w
                self.v[g, l] = base.captures[Site(l, "values")][g]
                self.vw[g, l] = self.read_values(self.v[g, l], w)
                self.A[g, l] = base.captures[Site(l, "attn_last")][g].to(torch.float64).cpu()

    def check(self, clean: Any, col_of: dict[str, int]) -> None:
        """The clean heads' writes rebuilt from their weights and values must equal the readout's (else this
        family writes heads through something the split does not model)."""
        for g, idx in enumerate(self.groups):
            for l in range(1, self.L):
                mine = (self.A[g, l] * self.vw[g, l]).sum(1)                                  # (B, H)
                cols = [col_of[f"L{l}H{h}"] for h in range(self.H)]
                ref = clean.pre_post[torch.tensor(idx)][:, cols]
                # a structural mismatch is off by O(1); low-precision weights round by a few eps
                eps = max(torch.finfo(self.ad.dtype).eps, 1e-7)
                rtol = max(1e-3, 16 * eps)
                if not torch.allclose(mine, ref, rtol=rtol, atol=rtol * float(ref.abs().max()) + 1e-6):
                    raise ArchitectureError(
                        f"layer {l}'s head outputs rebuilt from attention weights and values differ from their "
                        f"direct-effect readout (max gap {float((mine - ref).abs().max()):.3g}); the "
                        f"{self.ad.table.family} table writes heads through something the pattern/values split "
                        "does not model, so repair_mechanisms cannot split it."
                    )

    def read_values(self, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """v (B, T, n_kv * dh), w (B, H, dh) -> (B, T, H): each query head's group value read by its w.

        Query heads of one key/value group are consecutive (head h uses group h // (H / n_kv))."""
        B, T, _ = v.shape
        G = self.ad.n_kv_heads
        v = v.to(torch.float64).view(B, T, G, self.ad.head_dim)
        return torch.einsum("bjgk,bgqk->bjgq", v, w.view(B, G, self.H // G, -1)).reshape(B, T, self.H)

    def split(self, o: Any, lmin: int, order: str) -> dict[str, torch.Tensor]:
        """Unscaled ``pattern_pf`` = sum_j (A'-A) v.w and/or ``values_vf`` = sum_j A (v'-v).w: (n, L, H) each."""
        out: dict[str, torch.Tensor] = {}
        if order in ("pattern_first", "symmetric"):
            out["pattern_pf"] = torch.zeros(self.n, self.L, self.H, dtype=torch.float64)
        if order in ("values_first", "symmetric"):
            out["values_vf"] = torch.zeros(self.n, self.L, self.H, dtype=torch.float64)
        for g, idx in enumerate(self.groups):
            it = torch.tensor(idx)
            for l in range(lmin + 1, self.L):
                A0, vw0 = self.A[g, l], self.vw[g, l]
                if "pattern_pf" in out:
                    A1 = o.captures[Site(l, "attn_last")][g].to(torch.float64)
                    out["pattern_pf"][it, l] = ((A1 - A0) * vw0).sum(1)
                if "values_vf" in out:  # (v' - v) in the model's dtype, then read in float64
                    dv = o.captures[Site(l, "values")][g] - self.v[g, l]
                    out["values_vf"][it, l] = (A0 * self.read_values(dv, self.w[g, l])).sum(1)
        return out


_MECH_CODE = {m: i for i, m in enumerate(MECHANISMS)}


class _Rows:
    """The mechanism rows of every ablated group, held as numpy blocks until :meth:`frame` builds the tidy frame
    (categorical ``component``, ``mechanism`` and ``downstream``, sorted categories) in one go."""

    def __init__(self, col_of: dict[str, int], n: int, scale: str, post_norms: bool) -> None:
        self.col_of, self.n, self.scale, self.post_norms = col_of, n, scale, post_norms
        self.down: dict[str, int] = {}              # downstream name -> code
        self.meta: dict[str, tuple[int, int, int, int]] = {}  # name -> (kind, column, layer, head)
        self.blocks: list[tuple[str, np.ndarray, np.ndarray, np.ndarray] | None] = []

    def _meta(self, name: str) -> tuple[int, int, int, int]:
        m = self.meta.get(name)
        if m is None:
            kind = _mechanism_of(name)
            if kind == "head":
                layer, head = map(int, re.fullmatch(r"L(\d+)H(\d+)", name).groups())
                m = (0, self.col_of[name], layer, head)
            elif kind == "mlp":
                m = (1, self.col_of[name], -1, -1)
            else:
                m = (2 + _MECH_CODE[kind], -1, -1, -1)
            self.meta[name] = m
            self.down.setdefault(name, len(self.down))
        return m

    def add(self, i: int, g: Group, con: pd.DataFrame, parts: dict[str, torch.Tensor], clean: RunReadout,
            ablated: RunReadout) -> None:
        """Group ``i``'s rows from its contribution rows (prompt-major) and the split parts.

        ``parts``: unscaled (pre-post-norm) ``pattern_pf`` and/or ``values_vf`` (n, L, H); each head's are read
        like its dDE: divided by its clean post-attention scale and the clean final-norm scale. Per downstream
        d (contribution order) the rows are: ``pattern``, ``values`` (a head) or ``mlp`` (an MLP) or d's own
        mechanism (a norm or cap row); then under ``scale="recomputed"`` a head's ``block_norm`` (post norms)
        and a head's or MLP's ``norm``.
        """
        n, scale = self.n, self.scale
        while len(self.blocks) <= i:
            self.blocks.append(None)
        names = con["downstream"].iloc[: len(con) // n].tolist()
        k = len(names)
        delta = con["delta_de"].to_numpy().reshape(n, k)
        meta = np.array([self._meta(d) for d in names], dtype=np.int64).reshape(k, 4)
        kind, col, layer, head = meta.T
        hd, ml, ot = np.flatnonzero(kind == 0), np.flatnonzero(kind == 1), np.flatnonzero(kind >= 2)
        rec = scale == "recomputed"
        post = rec and self.post_norms
        width = np.where(kind == 0, 2 + int(post) + int(rec), np.where(kind == 1, 1 + int(rec), 1))
        off = np.concatenate([[0], np.cumsum(width)[:-1]])
        K = int(width.sum())
        vals = np.empty((n, K))
        mech = np.empty(K, dtype=np.int64)
        down = np.repeat(np.array([self.down[d] for d in names], dtype=np.int64), width)
        s0, s1, q1 = clean.post_scale.numpy(), ablated.post_scale.numpy(), ablated.pre_post.numpy()
        proj0 = clean.proj.numpy()
        sigma0, sigma1 = clean.sigma.numpy()[:, None], ablated.sigma.numpy()[:, None]
        hm = np.concatenate([hd, ml])
        c = col[hm]
        # each head's and MLP's change at the clean scales (post-attention and final); "frozen": its contribution
        frozen = delta[:, hm] if not rec else (q1[:, c] / s0[:, c] - proj0[:, c]) / sigma0
        fh = frozen[:, : len(hd)]
        if len(hd):
            ch = col[hd]
            read = s0[:, ch] * sigma0
            p_pf = parts["pattern_pf"].numpy()[:, layer[hd], head[hd]] / read if "pattern_pf" in parts else None
            v_vf = parts["values_vf"].numpy()[:, layer[hd], head[hd]] / read if "values_vf" in parts else None
            if p_pf is not None and v_vf is not None:
                pattern = 0.5 * (p_pf + (fh - v_vf))
            elif p_pf is not None:
                pattern = p_pf
            elif v_vf is not None:
                pattern = fh - v_vf
            else:  # pragma: no cover - a downstream head always has captures
                raise InputError(f"no attention captures for {names[hd[0]]}")
            o = off[hd]
            vals[:, o], mech[o] = pattern, _MECH_CODE["pattern"]
            vals[:, o + 1], mech[o + 1] = fh - pattern, _MECH_CODE["values"]
            if rec:  # the head's rescaling: by its layer's post-attention scale, then the final scale
                block = q1[:, ch] * (1 / s1[:, ch] - 1 / s0[:, ch]) / sigma1 if post else np.zeros((n, len(hd)))
                if post:
                    vals[:, o + 2], mech[o + 2] = block, _MECH_CODE["block_norm"]
                vals[:, o + 2 + int(post)] = delta[:, hd] - fh - block
                mech[o + 2 + int(post)] = _MECH_CODE["norm"]
        if len(ml):
            o = off[ml]
            vals[:, o], mech[o] = frozen[:, len(hd):], _MECH_CODE["mlp"]
            if rec:  # the MLP's rescaling by the final scale
                vals[:, o + 1], mech[o + 1] = delta[:, ml] - frozen[:, len(hd):], _MECH_CODE["norm"]
        if len(ot):
            vals[:, off[ot]], mech[off[ot]] = delta[:, ot], kind[ot] - 2
        self.blocks[i] = (g.name, vals, mech, down)

    def frame(self) -> pd.DataFrame:
        """The tidy frame: group-major, then prompt, then the rows of each downstream component in order."""
        n = self.n
        blocks = [b for b in self.blocks if b is not None]
        sizes = np.array([b[1].shape[1] for b in blocks], dtype=np.int64)
        comp = np.repeat(np.arange(len(blocks)), sizes * n)
        prompt = np.concatenate([np.repeat(np.arange(n), s) for s in sizes]) if len(blocks) else np.zeros(0, int)
        mech = np.concatenate([np.tile(b[2], n) for b in blocks]) if blocks else np.zeros(0, int)
        down = np.concatenate([np.tile(b[3], n) for b in blocks]) if blocks else np.zeros(0, int)
        amount = np.concatenate([b[1].reshape(-1) for b in blocks]) if blocks else np.zeros(0)
        return pd.DataFrame({"component": _categorical(comp, [b[0] for b in blocks]), "prompt": prompt,
                             "mechanism": _categorical(mech, list(MECHANISMS)),
                             "downstream": _categorical(down, list(self.down)), "amount": amount})


def _categorical(codes: np.ndarray, names: list[str]) -> pd.Categorical:
    """A categorical of ``names[codes]`` whose categories are the names used, sorted (as a saved frame reads back)."""
    used = np.unique(codes)
    order = sorted(range(len(used)), key=lambda j: names[used[j]])
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[used[order]] = np.arange(len(used))
    return pd.Categorical.from_codes(remap[codes], [names[used[j]] for j in order])


# ---------------------------------------------------------------- the per-layer Hydra regression
class LayerRegression(Result):
    """Per layer: compensation against DE lost across that layer's ablated components.

    Columns: ``layer``, ``n_components``, ``slope``, ``slope_lo``,
    ``slope_hi`` (``level`` interval, statsmodels OLS), ``intercept``, ``r2``,
    ``compensation`` and ``de_lost`` (their sums over the layer's
    components, per-prompt means). :meth:`shares` gives each mechanism's
    share of the layer's self-repair with bootstrap intervals over prompts;
    :meth:`points` the per-component means the regressions are fitted to.
    """

    kind = "layer_regression"

    def shares(self) -> pd.DataFrame:
        """``layer``, ``mechanism``, ``share``, ``share_lo``, ``share_hi`` (sum of the mechanism's amounts over
        the layer's components / their self-repair; percentile bootstrap over prompts)."""
        return self.extras["shares"].copy()

    def points(self) -> pd.DataFrame:
        """``component``, ``layer``, ``de_lost``, ``compensation`` (per-prompt means), one row per component."""
        return self.extras["points"].copy()

    def summary(self) -> pd.DataFrame:
        return self.to_frame()


def _layer_of(name: str) -> int:
    return min(int(x) for x in re.findall(r"(?:L|MLP|ATTN)(\d+)", name))


def layer_regression(result: RepairMechanisms, level: float = 0.95, n_boot: int = 2000,
                     seed: int = 0) -> LayerRegression:
    """The per-layer Hydra regression of a :class:`RepairMechanisms` result.

    For the ablated components of each layer (a joint group counts at its
    lowest layer): OLS of compensation (the sum of the downstream dDE and norm
    rows, i.e. the self-repair) on DE lost, one point per component (means
    over prompts), with slope, ``level`` interval and R^2 (statsmodels; NaN
    with fewer than 3 components). A slope near 1 says the layer's components
    are compensated about as much as they lose.
    """
    from ..stats import hydra_slope

    if not isinstance(result, RepairMechanisms):
        raise InputError(f"layer_regression needs a RepairMechanisms result (hp.repair_mechanisms(...)); "
                         f"got {type(result).__name__}.")
    if not 0 < level < 1:
        raise OptionError(f"level must be in (0, 1), e.g. 0.95; got {level!r}.")
    sr = result.self_repair_frame()
    sr["layer"] = sr["component"].map(_layer_of)
    pts = sr.groupby("component", sort=False).agg(layer=("layer", "first"), de_lost=("de_lost", "mean"),
                                                   compensation=("self_repair", "mean")).reset_index()
    wide = result.per_mechanism()
    wide["layer"] = wide["component"].map(_layer_of)
    mechs = result.mechanisms()
    rng = np.random.default_rng(seed)
    rows, shares = [], []
    for layer, p in pts.groupby("layer", sort=True):
        fit = hydra_slope(p["compensation"].to_numpy(), p["de_lost"].to_numpy(), level)
        rows.append({"layer": int(layer), "n_components": len(p), "slope": fit["slope"], "slope_lo": fit["slope_lo"],
                     "slope_hi": fit["slope_hi"], "intercept": fit["intercept"], "r2": fit["r2"],
                     "compensation": float(p["compensation"].sum()), "de_lost": float(p["de_lost"].sum())})
        per_prompt = wide[wide["layer"] == layer].groupby("prompt")[mechs + ["self_repair"]].sum()
        tot = per_prompt["self_repair"].to_numpy()
        n = len(tot)
        boot = rng.integers(0, n, size=(n_boot, n)) if n > 1 else None
        for mm in mechs:
            x = per_prompt[mm].to_numpy()
            share = x.mean() / tot.mean() if abs(tot.mean()) > 1e-12 else float("nan")
            lo = hi = float("nan")
            if boot is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    b = x[boot].mean(1) / tot[boot].mean(1)
                b = b[np.isfinite(b)]
                if b.size:
                    lo, hi = np.quantile(b, [0.5 - level / 2, 0.5 + level / 2])
            shares.append({"layer": int(layer), "mechanism": mm, "share": float(share), "share_lo": float(lo),
                           "share_hi": float(hi)})
    prov = dict(result.provenance)
    prov.update({"level": level, "n_boot": n_boot, "bootstrap_seed": seed,
                 "regression": "OLS of per-component mean self-repair (compensation) on mean DE lost, per layer"})
    return LayerRegression(pd.DataFrame(rows), prov, {"shares": pd.DataFrame(shares), "points": pts})
