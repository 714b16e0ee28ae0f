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

The runner executes these deliveries (plain data,
:class:`~hydra_probe.interventions.Delivery`) with its batching, prefix
reuse and out-of-memory retry: on the local backend as hooks, on
``backend="nnsight"`` (also ``remote=True``) as one nnsight trace per chunk
of copies whose body calls the model's own norms and q/k/v projections on
the delivered inputs (the numbers do not depend on the backend).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..checks import public
from ..components import Component, Group, is_downstream, select, select_groups
from ..errors import ComponentError, OptionError
from ..interventions import Delivery, Direction, ScalePolicy, SenderChange, check_direction
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
    """One copy: a sender group and a receiver set, reduced to what is downstream."""

    sender: Group
    rset: ReceiverSet
    heads: dict[int, list[int]] = field(default_factory=dict)   # layer -> receiver heads downstream
    attn_from: dict[int, tuple[Component, ...]] = field(default_factory=dict)  # layer -> members upstream of heads
    mlps: dict[int, tuple[Component, ...]] = field(default_factory=dict)       # layer -> members upstream of MLP

    def deliveries(self, value: str, positions: tuple[int, ...] | None, which: tuple[str, ...],
                   scale: str) -> tuple[Delivery, ...]:
        """The plan as intervention data for the runner."""
        out = [Delivery(SenderChange(self.attn_from[layer], value, positions), "heads", layer, tuple(hs), which)
               for layer, hs in self.heads.items()]
        out += [Delivery(SenderChange(members, value, positions), "mlp", layer) for layer, members in self.mlps.items()]
        if self.rset.logits:
            out.append(Delivery(SenderChange(self.sender.members, value, positions), "logits", scale=scale))
        return tuple(out)


def _reached(p: _Plan) -> int:
    """Receivers of the set that get the sender's change (downstream heads and MLPs, and the logits)."""
    return sum(len(h) for h in p.heads.values()) + len(p.mlps) + int(p.rset.logits)


def _plan(model: Any, sender: Group, rset: ReceiverSet) -> _Plan:
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
    return p


@public
def path_patch(model: Any, task: Any, senders: Any, receivers: Any, direction: Direction = "noise", *,
               receiver_input: str = "qkv", scale: ScalePolicy = "frozen", metric: Any = "logit_diff",
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
    plans = [_plan(model, s, r) for s in groups for r in rsets]
    copies = [p.deliveries(other, pos, which, scale) for p in plans]
    live = [i for i, c in enumerate(copies) if c]  # a plan that reaches no receiver is the baseline
    outs = runner.run(source, [copies[i] for i in live], label=f"path patch ({direction})")
    result = [baseline] * len(plans)
    for i, o in zip(live, outs):
        result[i] = o.metric
    n = len(task)
    rows = [pd.DataFrame({"sender": p.sender.name, "receiver": p.rset.name, "prompt": range(n),
                          "patched_metric": result[i].numpy(), "direction": direction,
                          "baseline_metric": baseline.numpy(), "clean_metric": clean.numpy(),
                          "corrupted_metric": corr.numpy(), "receivers_reached": _reached(p)})
            for i, p in enumerate(plans)]
    prov = provenance(model, task, metric=m, direction=direction, scale=scale, receiver_input=receiver_input,
                      positions=None if pos is None else list(pos), method="path patching")
    return PathPatch(pd.concat(rows, ignore_index=True), prov)
