"""Path patching: a sender's change reaches only the chosen receivers.

Wang et al. 2022; Goldowsky-Dill et al. 2023. The *baseline* run is the clean
run for ``direction="noise"`` (the sender takes its corrupted activation) and
the corrupted run for ``"denoise"`` (the sender takes its clean activation).
The sender's change of its residual-stream write is

    head h:   delta_s = (z_s' - z_s)[h] @ W_O[h]
    ATTN l:   the sum of its heads' changes
    MLP l:    delta_s = mlp_out' - mlp_out

(with a post-attention norm, the change of the layer's normalised write when
the sender's heads take the other run's z, so that the rescaling of the
layer's other heads is part of the sender's change)

at every position (or ``positions`` only), taken from the cached clean and
corrupted forwards (for a sender group, each member's change goes to the
receivers downstream of that member). Path patching then runs ONE forward of the baseline
prompts in which delta_s is added only to the receivers' inputs:

* a receiver head's query, key and/or value (``receiver_input``) is computed
  from ``norm(x + delta_s)`` instead of ``norm(x)``, where x is that head's
  block input *in this same forward* (so changes of upstream receivers
  propagate to downstream receivers);
* a receiver MLP reads ``norm(x_mid + delta_s)``;
* the receiver ``"logits"`` adds delta_s to the final residual. With
  ``scale="frozen"`` the final norm's scale is held at the value it computes
  *without* delta_s in this forward (the final norm is then linear in
  delta_s); with ``"recomputed"`` the norm runs as usual on ``x + delta_s``.

Everything that is not a receiver sees its actual input (it sees receivers'
changed outputs, never delta_s directly), and the sender itself is not
patched, so its direct path to everything else stays at baseline. Receivers
that are not downstream of the sender (upstream, in the sender's own layer,
or in the same parallel-residual layer) receive nothing: the sender has not
written yet when they read. Consequences (tested): sender -> ``"logits"``
with a frozen scale changes the metric by the sender's change of direct
effect at the baseline run's scale; sender -> every downstream head (qkv),
MLP and ``"logits"`` with ``scale="recomputed"`` equals activation patching
of the sender.

Grouped-query attention: the key/value columns of a receiver head are shared
by its group. To let the patched key/value reach the receiver head only, a
*shadow* copy of the batch is stacked beside the main copy; at the
receiver's layer it gets the main copy's block input, the whole group's k/v
(and the receiver's q) patched, and the receiver head's ``z`` (its output
before W_O) is copied from the shadow into the main copy.

Path patching always runs on the local (hook) path, also for models loaded
with ``backend="nnsight"``; its numbers do not depend on the backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..checks import public
from ..components import Component, Group, is_downstream, select, select_groups
from ..errors import ComponentError, OptionError
from ..interventions import check_direction
from ..models.adapter import check_fired
from ..models.sites import Site
from ..results import Result, provenance
from .common import as_model, check_scale, make_runner, positions_of
from .patching import check_separable

RECEIVER_INPUTS = ("q", "k", "v", "qkv")
LOGITS = "logits"


def normalised_summary(frame: pd.DataFrame, keys: list[str], value: str = "patched_metric") -> pd.DataFrame:
    """Per ``keys``: mean of ``value`` and the restoration (denoise) or damage (noise) score.

    Scores are normalised on the mean clean and corrupted metrics over all
    rows, as activation patching does; ``score_lo``/``score_hi`` are a 95 %
    t interval of the per-prompt normalised values.
    """
    from ..stats import t_interval

    clean, corr = frame["clean_metric"].mean(), frame["corrupted_metric"].mean()
    gap = clean - corr
    rows = []
    for k, g in frame.groupby(keys, sort=False):
        k = k if isinstance(k, tuple) else (k,)
        d = g["direction"].iloc[0]
        pm = g[value]
        per = ((pm - corr) / gap if d == "denoise" else (clean - pm) / gap).to_numpy()
        _, lo, hi = t_interval(per)
        rows.append({**dict(zip(keys, k)), "direction": d, "n": len(g), value: pm.mean(),
                     "baseline_metric": g["baseline_metric"].mean(), "score": float(np.mean(per)),
                     "score_lo": lo, "score_hi": hi})
    return pd.DataFrame(rows)


class PathPatch(Result):
    """One row per (sender, receiver set, prompt).

    Columns: ``sender``, ``receiver`` (the receiver set, its items joined by
    ``+``), ``prompt``, ``patched_metric``, ``direction``,
    ``baseline_metric`` (the unpatched baseline run: clean for noise,
    corrupted for denoise), ``clean_metric``, ``corrupted_metric``,
    ``receivers_reached`` (how many items of the receiver set are downstream
    of the sender and so receive its change; 0 means the row is the baseline
    by construction).
    """

    kind = "path_patch"

    def summary(self) -> pd.DataFrame:
        """Per (sender, receiver): mean patched metric and the normalised score.

        ``score`` is restoration ``(m_patched - m_corr) / (m_clean - m_corr)``
        for denoise and damage ``(m_clean - m_patched) / (m_clean - m_corr)``
        for noise, on the means over prompts (as activation patching).
        """
        out = normalised_summary(self._frame, ["sender", "receiver"])
        out.attrs["score"] = ("restoration (denoise) or damage (noise) through the chosen paths only, "
                              "normalised on the mean clean and corrupted metrics")
        return out


# ---------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class ReceiverSet:
    """Receivers that get a sender's change together: heads, MLPs and/or the logits."""

    name: str
    heads: tuple[Component, ...] = ()
    mlps: tuple[Component, ...] = ()
    logits: bool = False


def receiver_sets(model: Any, receivers: Any) -> list[ReceiverSet]:
    """Parse ``receivers`` (see :func:`path_patch`) into receiver sets."""
    if isinstance(receivers, (str, Component)):
        raw: list[list[Any]] = [[receivers]]
    elif isinstance(receivers, Iterable):
        items = list(receivers)
        if not items:
            raise ComponentError("receivers is empty; name components (e.g. 'L2H1', 'MLP2') and/or 'logits'.")
        if any(isinstance(r, (list, tuple)) for r in items):
            raw = [[r] if isinstance(r, (str, Component)) else list(r) for r in items]
        else:
            raw = [items]
    else:
        raise ComponentError(f"cannot read receivers from {type(receivers).__name__}; use names, lists of names "
                             "or 'logits'.")
    out = []
    for items in raw:
        names: list[str] = []
        heads: list[Component] = []
        mlps: list[Component] = []
        logits = False
        parts = [p.strip() for it in items for p in str(it).split("+")]
        if not parts or not all(parts):
            raise ComponentError(f"empty receiver name in {items!r}.")
        for p in parts:
            if p.lower() == LOGITS:
                logits = True
                names.append(LOGITS)
                continue
            comps = select(model, p)
            names.append(comps[0].name if len(comps) == 1 and p not in ("heads", "mlps", "layers", "all") else p)
            for c in comps:
                if c.kind == "resid":
                    raise ComponentError(f"{c.name} cannot be a receiver; receivers are heads, ATTN layers "
                                         "(all their heads), MLPs and 'logits'.")
                if c.kind == "attn":
                    heads += [x for x in select(model, "heads") if x.layer == c.layer]
                elif c.kind == "head":
                    heads.append(c)
                else:
                    mlps.append(c)
        out.append(ReceiverSet("+".join(dict.fromkeys(names)), tuple(dict.fromkeys(heads)),
                               tuple(dict.fromkeys(mlps)), logits))
    return out


# ---------------------------------------------------------------------------- planning
@dataclass
class _Plan:
    """One stacked copy: a sender group and a receiver set, reduced to what is downstream."""

    sender: Group
    rset: ReceiverSet
    heads: dict[int, list[int]] = field(default_factory=dict)   # layer -> receiver heads downstream
    attn_from: dict[int, tuple[Component, ...]] = field(default_factory=dict)  # layer -> members upstream of heads
    mlps: dict[int, tuple[Component, ...]] = field(default_factory=dict)       # layer -> members upstream of MLP
    shadow: set[int] = field(default_factory=set)                # layers that need a shadow copy (GQA k/v)

    @property
    def start(self) -> int:
        layers = list(self.heads) + list(self.mlps)
        return min(layers) if layers else -1


def _reached(p: _Plan) -> int:
    """Receivers of the set that get the sender's change (downstream heads and MLPs, and the logits)."""
    return sum(len(h) for h in p.heads.values()) + len(p.mlps) + int(p.rset.logits)


def _plan(model: Any, sender: Group, rset: ReceiverSet, which: tuple[str, ...]) -> _Plan:
    par = model.parallel_residual
    p = _Plan(sender, rset)
    for h in rset.heads:
        up = tuple(m for m in sender.members if is_downstream(h, m, par))
        if up:
            p.heads.setdefault(h.layer, []).append(h.head)  # type: ignore[arg-type]
            p.attn_from[h.layer] = up
    for c in rset.mlps:
        up = tuple(m for m in sender.members if is_downstream(c, m, par))
        if up:
            p.mlps[c.layer] = up
    ad = model.adapter
    if ad.n_kv_heads < ad.n_heads and ("k" in which or "v" in which):
        size = ad.n_heads // ad.n_kv_heads
        for layer, hs in p.heads.items():
            groups = {h // size for h in hs}
            if any(set(range(g * size, (g + 1) * size)) - set(hs) for g in groups):
                p.shadow.add(layer)
    return p


class _Deltas:
    """Senders' changes of their residual writes for one length group, cached per member."""

    def __init__(self, runner: Any, g: int, base: str, other: str, pos: tuple[int, ...] | None) -> None:
        self.runner, self.ad = runner, runner.ad
        self.Pb, self.Po = runner.local_prefix(g, base), runner.local_prefix(g, other)
        T = self.Pb.resid[0].shape[1]
        mask = torch.zeros(T, dtype=self.ad.dtype, device=self.ad.device)
        if pos is None:
            mask[:] = 1
        else:
            mask[list(pos)] = 1
        self.mask = mask[None, :, None]
        self._cache: dict[Any, torch.Tensor] = {}

    def member(self, c: Component) -> torch.Tensor:
        return self.of([c])

    def _layer_heads(self, layer: int, heads: Sequence[int] | None) -> torch.Tensor:
        """Change of layer ``layer``'s attention write when ``heads`` (None: all) take the other run's z.

        Without post-attention norms this is ``sum_h (z_h' - z_h) W_O^h``; with one (Gemma-2/3, OLMo-2) the
        layer's write ``N_post(sum_h W_O^h z_h)`` is recomputed, so the other heads' rescaling is included.
        """
        ad = self.ad
        s = Site(layer, "z")
        zb, zo = self.Pb.captures[s], self.Po.captures[s]
        if heads is None:
            zm = zo
        else:
            zm = zb.clone()
            for h in heads:
                zm[..., ad.head_slice(h)] = zo[..., ad.head_slice(h)]
        if not ad.has_post_attn_norm:
            B, T, _ = zb.shape
            dz = (zm - zb).view(B, T, ad.n_heads, ad.head_dim)
            return torch.einsum("bthk,hkd->btd", dz, ad.W_O(layer))
        return ad.head_writes(layer, zm).sum(-2) - ad.head_writes(layer, zb).sum(-2)

    def of(self, members: Sequence[Component]) -> torch.Tensor:
        key = tuple(members)
        if key not in self._cache:
            with torch.no_grad():
                out = None
                heads: dict[int, list[int] | None] = {}
                for m in members:
                    if m.kind == "mlp":
                        s = Site(m.layer, "mlp_out")
                        d = self.Po.captures[s] - self.Pb.captures[s]
                        out = d if out is None else out + d
                    elif m.kind == "attn" or heads.get(m.layer, []) is None:
                        heads[m.layer] = None
                    else:
                        heads.setdefault(m.layer, []).append(m.head)  # type: ignore[union-attr,arg-type]
                for layer, hs in heads.items():   # heads of one layer together (their post norm is shared)
                    d = self._layer_heads(layer, hs)
                    out = d if out is None else out + d
            self._cache[key] = out * self.mask
        return self._cache[key]


# ---------------------------------------------------------------------------- running
def _forward(runner: Any, g: int, source: str, plans: Sequence[_Plan], start: int, deltas: _Deltas,
             which: tuple[str, ...], scale: str) -> torch.Tensor:
    """Metric (k, B) of one stacked forward of ``plans`` from layer ``start`` (see module doc)."""
    ad = runner.ad
    P = runner.local_prefix(g, source)
    B, L, k = P.batch, ad.n_layers, len(plans)
    shadow_row: dict[int, int] = {}
    for ci, p in enumerate(plans):
        if p.shadow:
            shadow_row[ci] = k + len(shadow_row)
    n_rows = k + len(shadow_row)

    def rows(j: int) -> slice:
        return slice(j * B, (j + 1) * B)

    attn_in: dict[int, torch.Tensor] = {}
    normed: dict[tuple[int, int], torch.Tensor] = {}
    norm_fns: dict[tuple[int, str], Callable] = {}
    qkv_items: dict[Site, list[tuple[int, int, int, list[slice]]]] = {}
    copy_in: dict[int, list[tuple[int, int]]] = {}
    copy_z: dict[int, list[tuple[int, int, list[slice]]]] = {}
    mlp_items: dict[int, list[int]] = {}
    for ci, p in enumerate(plans):
        for layer, hs in p.heads.items():
            tgt = shadow_row[ci] if layer in p.shadow else ci
            per_site: dict[Site, list[slice]] = {}
            for h in hs:
                for w in which:
                    site, cols = ad.head_input_slice(layer, h, w)
                    if cols not in per_site.setdefault(site, []):
                        per_site[site].append(cols)
            for site, cols in per_site.items():
                qkv_items.setdefault(site, []).append((ci, tgt, layer, cols))
            if layer in p.shadow:
                copy_in.setdefault(layer, []).append((ci, tgt))
                copy_z.setdefault(layer, []).append((ci, tgt, [ad.head_slice(h) for h in hs]))
        for layer in p.mlps:
            mlp_items.setdefault(layer, []).append(ci)

    def capture_attn(layer: int):
        def fn(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            attn_in[layer] = inp
            return out
        return fn

    def edit_mlp(layer: int, cis: list[int]):
        def fn(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            for ci in cis:
                d = deltas.of(plans[ci].mlps[layer])
                out[rows(ci)] = ad.block_norm(layer, "mlp", inp[rows(ci)] + d).to(out.dtype)
            return out
        return fn

    def edit_qkv(site: Site, items: list[tuple[int, int, int, list[slice]]]):
        def fn(y: torch.Tensor) -> torch.Tensor:
            y = y.clone()
            for ci, tgt, layer, cols in items:
                key = (layer, tgt)
                if key not in normed:
                    d = deltas.of(plans[ci].attn_from[layer])
                    normed[key] = ad.block_norm(layer, "attn", attn_in[layer][rows(tgt)] + d)
                proj = ad.project(site, normed[key])
                for c in cols:
                    y[rows(tgt), :, c] = proj[:, :, c].to(y.dtype)
            return y
        return fn

    def edit_copy_in(pairs: list[tuple[int, int]]):
        def fn(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            for ci, tgt in pairs:
                x[rows(tgt)] = x[rows(ci)]
            return x
        return fn

    def edit_copy_z(items: list[tuple[int, int, list[slice]]]):
        def fn(z: torch.Tensor) -> torch.Tensor:
            z = z.clone()
            for ci, tgt, slices in items:
                for s in slices:
                    z[rows(ci), :, s] = z[rows(tgt), :, s]
            return z
        return fn

    for layer in {site.layer for site in qkv_items}:
        norm_fns[(layer, "attn")] = capture_attn(layer)
    for layer, cis in mlp_items.items():
        norm_fns[(layer, "mlp")] = edit_mlp(layer, cis)
    edits: dict[Site, Callable] = {s: edit_qkv(s, items) for s, items in qkv_items.items()}
    edits.update({Site(layer, "resid_pre"): edit_copy_in(pairs) for layer, pairs in copy_in.items()})
    edits.update({Site(layer, "z"): edit_copy_z(items) for layer, items in copy_z.items()})

    with runner.model.evaluating(), torch.no_grad():
        if start < L:
            with ad.hooks(edits) as fired, ad.norm_hooks(norm_fns) as nfired:
                x = ad.run_blocks(P, start, n_rows)
            check_fired(fired, edits)
            dead = [f"{w} norm of layer {layer}" for (layer, w), n in nfired.items() if n == 0]
            if dead:
                from ..errors import InterventionError

                raise InterventionError(f"path-patching hooks at the {', '.join(dead)} never fired; the architecture "
                                        "table may point at a norm the forward does not call.")
        else:
            x = P.resid[L].repeat(k, 1, 1)
        x_last = x[: k * B, -1]
        logits = []
        for ci, p in enumerate(plans):
            xl = x_last[rows(ci)]
            if p.rset.logits:
                d = deltas.of(p.sender.members)[:, -1]
                lg = ad.logits_frozen(xl, d) if scale == "frozen" else ad.logits(xl + d)
            else:
                lg = ad.logits(xl)
            logits.append(lg)
        logits_t = torch.cat(logits)
    idx = runner.groups[g]
    a = runner.task.answer_ids[idx].repeat(k)
    b = runner.task.alternative_ids[idx].repeat(k)
    clean = runner.clean_logits()[idx].repeat(k, 1) if runner.metric.needs_clean else None
    m = runner.metric(logits_t, a, b, clean).detach().to(torch.float64)
    return m.view(k, B)


@public
def path_patch(model: Any, task: Any, senders: Any, receivers: Any, direction: str = "noise", *,
               receiver_input: str = "qkv", scale: str = "frozen", metric: Any = "logit_diff",
               positions: Any = None, progress: bool | None = None) -> PathPatch:
    """Path patching of each sender into each receiver set (see the module doc for the semantics).

    Args:
        senders: component names, ``ATTN{l}`` layers, selectors (``"heads"``,
            ...), or ``"A+B"`` / nested lists for a group whose members'
            changes are sent together. One row per sender (group).
        receivers: one receiver set or several. A name (``"L2H1"``,
            ``"MLP2"``, ``"ATTN2"`` = all its heads, a selector such as
            ``"all"``, ``"logits"``), a ``+``-joined string, or a list of
            names is ONE set whose members all receive the change together;
            a list of lists (or of ``+``-strings and names mixed with lists)
            gives several sets, one row each. The ``receiver`` column holds
            the set's items joined by ``+``.
        direction: ``"noise"`` (baseline = clean run, sender's corrupted
            activation) or ``"denoise"`` (baseline = corrupted run, sender's
            clean activation).
        receiver_input: which input of receiver heads gets the change:
            ``"q"``, ``"k"``, ``"v"`` or ``"qkv"``.
        scale: final-norm scale for the ``"logits"`` receiver: ``"frozen"``
            (the scale this forward's final residual has without the added
            change) or ``"recomputed"`` (the norm of the changed residual).
        positions: the sender's change is taken at these positions only
            (default: all).
    """
    model = as_model(model)
    model.require_local("path_patch")
    check_direction(direction)
    check_scale(scale)
    if receiver_input not in RECEIVER_INPUTS:
        raise OptionError(f"unknown receiver_input {receiver_input!r}; choose one of {', '.join(RECEIVER_INPUTS)}.")
    which = ("q", "k", "v") if receiver_input == "qkv" else (receiver_input,)
    groups = select_groups(model, senders)
    for gr in groups:
        bad = [c.name for c in gr.members if c.kind == "resid"]
        if bad:
            raise ComponentError(f"{', '.join(bad)} cannot be a sender; senders are heads, ATTN layers and MLPs.")
    rsets = receiver_sets(model, receivers)
    pos = positions_of(positions)
    runner, m = make_runner(model, task, metric, progress=progress, positions=pos)
    clean = runner.baseline("clean").metric
    corr = runner.baseline("corrupted").metric
    check_separable(clean.numpy(), corr.numpy())
    source, other = ("clean", "corrupted") if direction == "noise" else ("corrupted", "clean")
    baseline = clean if source == "clean" else corr
    plans = [_plan(model, s, r, which) for s in groups for r in rsets]
    n = len(task)
    result = torch.empty(len(plans), n, dtype=torch.float64)
    L = model.n_layers
    from ..runner.runner import Progress

    bar = Progress(len(plans) * len(runner.groups), f"path patch ({direction})", progress)
    for g, idx in enumerate(runner.groups):
        deltas = _Deltas(runner, g, source, other, pos)
        B, T = len(idx), len(task.clean_ids[idx[0]])
        per = max(1, runner.token_budget // (B * T))
        starts = [p.start if p.start >= 0 else L for p in plans]
        order = sorted(range(len(plans)), key=lambda i: starts[i])
        it = torch.tensor(idx)
        i = 0
        while i < len(order):
            s0, chunk, weight = starts[order[i]], [], 0
            while i < len(order) and starts[order[i]] == s0:
                w = 1 + bool(plans[order[i]].shadow)  # a shadow copy is a second stacked batch
                if chunk and weight + w > per:
                    break
                chunk.append(order[i])
                weight += w
                i += 1
            out = _forward(runner, g, source, [plans[j] for j in chunk], starts[chunk[0]], deltas, which, scale)
            result[torch.tensor(chunk)[:, None], it[None, :]] = out.cpu()
            bar.update(len(chunk))
    rows = [pd.DataFrame({"sender": p.sender.name, "receiver": p.rset.name, "prompt": range(n),
                          "patched_metric": result[i].numpy(), "direction": direction,
                          "baseline_metric": baseline.numpy(), "clean_metric": clean.numpy(),
                          "corrupted_metric": corr.numpy(), "receivers_reached": _reached(p)})
            for i, p in enumerate(plans)]
    prov = provenance(model, task, metric=m, direction=direction, scale=scale, receiver_input=receiver_input,
                      positions=None if pos is None else list(pos), method="path patching")
    return PathPatch(pd.concat(rows, ignore_index=True), prov)
