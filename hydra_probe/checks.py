"""Argument checks at the entry of every public analysis call: no silent wrong numbers.

Every public analysis function carries :func:`public` (one line above its
``def``). Before the function's body runs, and so before any forward pass,
the wrapper

1. resolves the model (anything :func:`~hydra_probe.load_model` takes) and
   takes the model's analysis lock (see *Threads*);
2. refuses forward (pre-)hooks the package did not register on the modules it
   reads through (:meth:`~hydra_probe.models.adapter.Adapter.foreign_hooks`);
3. checks each argument it knows by name, for types, ranges and mutual
   consistency: ``task`` (type, non-empty, this model's vocabulary, tokenizer
   and context length), ``components``/``senders`` (duplicates and overlapping
   groups refused), ``pairs``, ``target``/``compensators``, ``value``
   (a mean needs at least two reference prompts at every position it
   replaces), ``positions``, ``seed``, ``metric`` (linearity where direct
   effects are needed), ``progress``, and the options of ``triangulate``.

Choices (documented in docs/errors.md):

* **Duplicates are refused**, not removed: a component, group, pair or
  compensator named twice raises :class:`~hydra_probe.errors.ComponentError`
  naming it (each copy would add the same prompts again and narrow every
  interval).
* **Overlaps inside a joint group are refused** with the overlap named
  (``"ATTN1+L1H5"``: ATTN1 contains L1H5), and so are pairs whose sides
  overlap and compensators that overlap the target or each other. Separate
  single ablations of overlapping components (``["ATTN1", "L1H5"]``) are two
  independent claims and are allowed.
* **Threads**: one model runs one analysis at a time. A public call made
  while another thread's call holds the same model raises
  :class:`~hydra_probe.errors.ConcurrencyError` at once (nothing waits, nothing
  is computed); calls nested in the same thread pass. Different models (or
  copies) run in parallel freely.
* Global module hooks (``torch.nn.modules.module.register_module_forward_hook``)
  are not inspected.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from .components import Component, Group, parse, select, select_groups
from .errors import ComponentError, ConcurrencyError, ForeignHookError, MetricError, OptionError, TaskError
from .metrics import check_linear, get_metric

F = TypeVar("F", bound=Callable[..., Any])
H = TypeVar("H", bound=Callable[..., Any])

SEED_MAX = 2**32 - 1
READ_ONLY_ATTR = "__hydra_probe_read_only__"  # read by Adapter.foreign_hooks
SELECTORS = ("heads", "mlps", "layers", "resid", "all")

# functions whose numbers are direct-effect decompositions: their metric must be linear in the logits
NEEDS_LINEAR = {"direct_effects", "self_repair", "interaction_parts", "iterated_ablation", "triangulate",
                "repair_mechanisms", "neuron_contributions"}


# ============================================================================ the decorator
def public(fn: F) -> F:
    """Wrap a public analysis function: lock the model, refuse foreign hooks, check the arguments (see module doc)."""
    sig = inspect.signature(fn)
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        model = a.get("model")
        if model is None or "model" not in sig.parameters:
            check_arguments(name, None, a)
            return fn(*bound.args, **bound.kwargs)
        model = as_model(model)
        a["model"] = model
        lock = _acquire(model, name)
        try:
            if lock.depth == 1:
                check_hooks(model)
            check_arguments(name, model, a)
            return fn(*bound.args, **bound.kwargs)
        finally:
            _release(lock)

    wrapper.__wrapped_checks__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def as_model(model: Any) -> Any:
    from .models.wrapper import HookedModel, load_model

    return model if isinstance(model, HookedModel) else load_model(model)


# ============================================================================ threads
class _ModelLock:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.depth = 0
        self.owner: str = ""


_LOCKS: weakref.WeakKeyDictionary[Any, _ModelLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _acquire(model: Any, what: str) -> _ModelLock:
    with _LOCKS_GUARD:
        lk = _LOCKS.get(model.hf_model)
        if lk is None:
            lk = _LOCKS[model.hf_model] = _ModelLock()
    if not lk.lock.acquire(blocking=False):
        raise ConcurrencyError(
            f"{what}: model {model.name!r} is busy with {lk.owner or 'an analysis in another thread'}; one "
            "model runs one analysis at a time (its hooks and caches are per run). Wait for it to finish, or give "
            "each thread its own model (load it once per thread)."
        )
    lk.depth += 1
    if lk.depth == 1:
        lk.owner = f"{what}() in another thread ({threading.current_thread().name!r})"
    return lk


def _release(lk: _ModelLock) -> None:
    lk.depth -= 1
    if lk.depth == 0:
        lk.owner = ""
    lk.lock.release()


# ============================================================================ hooks
def read_only(hook: H) -> H:
    """Mark a hook function as one that only reads (returns None, edits nothing in place), so analyses accept it.

    ``module.register_forward_hook(hp.checks.read_only(fn))``: the package trusts the mark; a marked hook that
    changes an output makes the numbers wrong without a word.
    """
    setattr(hook, READ_ONLY_ATTR, True)
    return hook


def check_hooks(model: Any) -> None:
    """Refuse forward (pre-)hooks that the package did not register on the modules it reads through."""
    found = model.adapter.foreign_hooks()
    if found:
        raise ForeignHookError(
            f"the model has hooks that hydra_probe did not register, on modules whose outputs it reads: "
            f"{'; '.join(found)}. They change the model's output but not the decomposition, so the numbers would "
            "not add up; remove them (handle.remove()) before the analysis."
        )


# ============================================================================ arguments
def check_arguments(fn: str, model: Any, a: dict[str, Any]) -> None:
    """Check the arguments of public function ``fn`` (by parameter name) against ``model``."""
    task = a.get("task")
    # compare_conditions takes {family: Task} too: every task is checked, and positions/values against each
    tasks = list(task.values()) if isinstance(task, Mapping) and fn == "compare_conditions" else [task]
    if model is not None and "task" in a:
        for t in tasks:
            check_task(model, t)
    if "progress" in a and a["progress"] is not None and not isinstance(a["progress"], bool):
        raise OptionError(f"progress must be True, False or None (a bar on a terminal only); got {a['progress']!r}.")
    if "seed" in a and a["seed"] is not None:
        check_seed(a["seed"])
    if model is None:
        return
    if "components" in a and a["components"] is not None:
        check_components(model, a["components"], grouped=True, what="components")
    if "senders" in a:
        check_components(model, a["senders"], grouped=True, what="senders")
    if "pairs" in a:
        check_pairs(model, a["pairs"])
    if fn == "neuron_contributions" and isinstance(a.get("component"), (str, list, tuple)) \
            and str(a["component"]) not in SELECTORS:
        check_group(_members(model, a["component"], "component"), "component")
    if "target" in a and "compensators" in a and fn == "iterated_ablation":
        check_iterated(model, a["target"], a["compensators"])
    for t in tasks if task is not None else []:
        pos = check_positions(a["positions"], t) if "positions" in a else None
        if "value" in a and not (a["value"] is None and fn in ("verify_edges",)):
            check_value(model, t, a["value"], pos)
        if "values" in a and fn == "compare_conditions":
            vals = [a["values"]] if isinstance(a["values"], str) else a["values"]
            for v in vals if isinstance(vals, Iterable) else []:
                if isinstance(v, str) and v == "mean":
                    check_value(model, t, v, pos)
    if "metric" in a and a["metric"] is not None:
        m = get_metric(a["metric"])
        if fn in NEEDS_LINEAR and task is not None:
            for t in tasks:
                check_linear(m, t.answer_ids, t.alternative_ids, model.adapter.vocab_size)
    if fn == "triangulate":
        check_triangulate(a)
    if fn == "iterated_from_graph":
        k = a.get("k")
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
            raise OptionError(f"k must be a positive integer (compensators to take) or None (all); got {k!r}.")


def is_task(x: Any) -> bool:
    return hasattr(x, "pairs") and hasattr(x, "clean_ids") and hasattr(x, "answer_ids")


def check_task(model: Any, task: Any, what: str = "the task") -> None:
    """A Task of at least one prompt, tokenized with this model's tokenizer, within its vocabulary and context."""
    if not is_task(task):
        raise TaskError(f"expected a hydra_probe Task; got {type(task).__name__}. Build one with "
                        "tasks.ioi(model, n_prompts) or tasks.from_pairs(model, rows).")
    if len(task) == 0:
        raise TaskError("the task is empty; build it with at least one prompt pair "
                        "(tasks.ioi(model, n_prompts=8) or tasks.from_pairs(model, rows)).")
    ad = model.adapter
    top = int(max(task.answer_ids.max(), task.alternative_ids.max(), max(int(t.max()) for t in task.clean_ids),
                  max(int(t.max()) for t in task.corrupted_ids)))
    if top >= ad.vocab_size:
        raise TaskError(f"{what} has token id {top}, beyond this model's vocabulary ({ad.vocab_size}); "
                        "was it built for another model? Build the task with this model's tokenizer "
                        "(tasks.ioi(model, ...) or tasks.from_pairs(model, rows)).")
    from .tasks.task import tokenizer_fingerprint

    fp = getattr(task, "meta", {}).get("tokenizer")
    if fp is not None and fp != tokenizer_fingerprint(model.tokenizer):
        raise TaskError(
            f"{what} was tokenized with another tokenizer than this model's (it was built for "
            f"{getattr(task, 'model_name', '') or 'another model'!r}); its token ids would mean other words here. "
            "Build the task again with this model (tasks.from_pairs(model, task.pairs))."
        )
    ctx = context_length(model)
    longest = max(task.lengths)
    if ctx is not None and longest > ctx:
        raise TaskError(f"{what} has a prompt of {longest} tokens, longer than this model's context of {ctx} "
                        "positions; shorten the prompts or drop the long ones (task.subset(...)).")


def context_length(model: Any) -> int | None:
    cfg = model.adapter.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise OptionError(f"seed must be an integer; got {seed!r}.")
    if not 0 <= int(seed) <= SEED_MAX:
        raise OptionError(f"seed must be an integer in 0..{SEED_MAX} (2**32 - 1), the range the random "
                          f"generators take; got {seed}.")


# ---------------------------------------------------------------------------- components
def _overlap(a: Component, b: Component) -> bool:
    if a.kind == "attn" and b.kind == "head" or a.kind == "head" and b.kind == "attn":
        return a.layer == b.layer
    return a == b


def _describe(a: Component, b: Component) -> str:
    if a == b:
        return f"{a.name} appears twice"
    big, small = (a, b) if a.kind == "attn" else (b, a)
    return f"{big.name} contains {small.name}"


def _members(model: Any, item: Any, what: str) -> list[Component]:
    """The members of one group item (``"A+B"``, a list of names/selectors, or a name), duplicates kept."""
    L, H = model.n_layers, model.n_heads
    if isinstance(item, Group):
        item = list(item.members)
    if isinstance(item, str) and "+" in item:
        parts = [p.strip() for p in item.split("+")]
        if any(p in SELECTORS for p in parts):
            return [c for p in parts for c in select(model, p)]
        return [parse(p, L, H) for p in parts]
    if isinstance(item, (str, Component)):
        return list(select(model, item))
    if isinstance(item, (list, tuple)):
        if not item:
            raise ComponentError(f"{what}: an empty group; a joint group names at least one component.")
        out: list[Component] = []
        for x in item:
            if isinstance(x, (list, tuple, Group)):
                raise ComponentError(f"{what}: a group inside a group ({x!r}); flatten it, e.g. ['L0H1', 'MLP2'].")
            out += _members(model, x, what)
        return out
    raise ComponentError(f"{what}: cannot read a component from {type(item).__name__} {item!r}; use a name such as "
                         "'L0H1' or 'MLP2', an 'A+B' group or a list of names.")


def check_group(members: Sequence[Component], what: str) -> None:
    """A joint group must not name a component twice or hold a layer together with one of its heads."""
    for i, a in enumerate(members):
        for b in members[i + 1:]:
            if _overlap(a, b):
                name = "+".join(c.name for c in members)
                raise ComponentError(
                    f"{what}: the group {name} overlaps ({_describe(a, b)}), so it would remove the same output "
                    "twice; name each component once (a whole layer ATTN{l} already includes its heads)."
                )


def check_components(model: Any, spec: Any, grouped: bool, what: str = "components") -> None:
    """Refuse duplicates (and, for joint groups, overlaps inside a group); parsing errors name the problem."""
    if isinstance(spec, (str, Component)) and str(spec) in SELECTORS:
        return
    if grouped:
        if isinstance(spec, (str, Component, Group)):
            items: list[Any] = [spec]
        elif isinstance(spec, Iterable) and not isinstance(spec, (bytes, dict)):
            items = list(spec)
        else:
            select_groups(model, spec)  # raises the usual ComponentError
            return
        groups: list[list[Component]] = []
        for it in items:
            if isinstance(it, str) and "+" not in it and it in SELECTORS:
                groups += [[c] for c in select(model, it)]
            elif isinstance(it, (str, Component)) and "+" not in str(it):
                groups.append([parse(it, model.n_layers, model.n_heads)])
            else:
                mem = _members(model, it, what)
                check_group(mem, what)
                groups.append(mem)
        if not groups:
            raise ComponentError("the component list is empty; name at least one component or use 'all'.")
    else:
        if isinstance(spec, (str, Component)):
            select(model, spec)
            return
        if not isinstance(spec, Iterable) or isinstance(spec, (bytes, dict)):
            select(model, spec)
            return
        items = list(spec)
        if not items:
            raise ComponentError("the component list is empty; name at least one component or use 'all'.")
        groups = []
        for it in items:
            if isinstance(it, (str, Component)):
                groups += [[c] for c in select(model, it)]
            else:
                select(model, [it])  # raises naming the item
    seen: dict[frozenset, str] = {}
    dup: list[str] = []
    for g in groups:
        k = frozenset((c.kind, c.layer, c.head) for c in g)
        name = "+".join(c.name for c in g)
        if k in seen:
            dup.append(name)
        seen.setdefault(k, name)
    if dup:
        names = sorted(set(dup))
        raise ComponentError(
            f"{what}: {', '.join(names)} {'is' if len(names) == 1 else 'are'} named more than once; each copy would "
            "add the same prompts again and narrow every interval. Name each component (or group) once."
        )


def _side(model: Any, side: Any, what: str) -> list[Component]:
    if isinstance(side, str) and side.strip() in SELECTORS:
        n = len(select(model, side.strip()))
        raise ComponentError(f"{what}: {side!r} is a selector of {n} components; each side of a pair is one component "
                             "or one joint group ('A+B' or a list of names).")
    if isinstance(side, (str, Component)) and "+" not in str(side):
        return [parse(side, model.n_layers, model.n_heads)]
    mem = _members(model, side, what)
    check_group(mem, what)
    return mem


def check_pairs(model: Any, pairs: Any) -> None:
    """``pairs``: a list of (first, second); sides are components or groups, disjoint, each pair named once."""
    if isinstance(pairs, (str, bytes, Component)) or not isinstance(pairs, Iterable):
        raise ComponentError(f"pairs must be a list of (first, second) component pairs, e.g. [('L9H9', 'L10H7')]; "
                             f"got {type(pairs).__name__} {pairs!r}.")
    pairs = list(pairs)
    if not pairs:
        raise ComponentError("pairs is empty; give a list of (first, second) component pairs.")
    seen: dict[tuple, str] = {}
    for p in pairs:
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) != 2:
            raise ComponentError(f"each pair is two components, e.g. ('L9H9', 'L10H7'); got {p!r}.")
        a = _side(model, p[0], f"pair {p!r}")
        b = _side(model, p[1], f"pair {p!r}")
        for x in a:
            for y in b:
                if _overlap(x, y):
                    raise ComponentError(
                        f"pair ({'+'.join(c.name for c in a)}, {'+'.join(c.name for c in b)}) overlaps "
                        f"({_describe(x, y)}); pair two distinct components, or the interaction would count the "
                        "shared part twice."
                    )
        # ordered: (c, d) and (d, c) share the interaction but not its split (edge vs reverse), so both may be asked
        k = (frozenset((c.kind, c.layer, c.head) for c in a), frozenset((c.kind, c.layer, c.head) for c in b))
        name = f"({'+'.join(c.name for c in a)}, {'+'.join(c.name for c in b)})"
        if k in seen:
            raise ComponentError(f"pairs: {name} is given more than once; each copy would add the same prompts "
                                 "again and narrow every interval. Name each pair once.")
        seen[k] = name


def check_iterated(model: Any, target: Any, compensators: Any) -> None:
    """Target and compensators: components or groups (no selectors), none overlapping another."""
    tgt = _side(model, target, "iterated ablation target")
    if isinstance(compensators, (str, Component)):
        compensators = [compensators]
    if not isinstance(compensators, Iterable) or isinstance(compensators, (bytes, dict)):
        raise ComponentError(f"compensators must be a list of component names; got {type(compensators).__name__} "
                             f"{compensators!r}.")
    taken: list[tuple[Component, str]] = [(c, "the target") for c in tgt]
    for c in list(compensators):
        if not isinstance(c, (str, Component, list, tuple, Group)):
            raise ComponentError(f"compensators: cannot read a component from {type(c).__name__} {c!r}; give names "
                                 "such as 'L3H5', 'MLP2' or 'A+B'.")
        mem = _side(model, c, "compensator")
        for x in mem:
            for y, whose in taken:
                if _overlap(x, y):
                    raise ComponentError(
                        f"compensator {'+'.join(m.name for m in mem)} overlaps {whose} ({_describe(x, y)}); give "
                        "distinct compensators that are not part of the target."
                    )
        taken += [(x, f"compensator {'+'.join(m.name for m in mem)}") for x in mem]


# ---------------------------------------------------------------------------- positions and values
def check_positions(positions: Any, task: Any) -> tuple[int, ...] | None:
    """None (all), "all", "last", an int, or a non-empty sequence of ints in range for every prompt."""
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return None
    if isinstance(positions, str):
        if positions == "last":
            return (-1,)
        raise OptionError(f"positions must be None (all), an int, a list of ints or 'last'; got {positions!r}.")
    if isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
        pos: tuple[int, ...] = (int(positions),)
    elif isinstance(positions, Sequence) and not isinstance(positions, (bytes, str)):
        bad = [p for p in positions if isinstance(p, bool) or not isinstance(p, numbers.Integral)]
        if bad:
            raise OptionError(f"positions must be None (all), an int, a list of ints or 'last'; {bad[0]!r} in "
                              f"{list(positions)!r} is not an int.")
        pos = tuple(int(p) for p in positions)
        if not pos:
            raise OptionError("positions=[] selects no position, so the intervention would do nothing; give at "
                              "least one position, or None for all.")
    else:
        raise OptionError(f"positions must be None (all), an int, a list of ints or 'last'; got "
                          f"{type(positions).__name__} {positions!r}.")
    T = min(task.lengths)
    bad = [p for p in pos if not -T <= p < T]
    if bad:
        raise OptionError(
            f"position(s) {', '.join(map(str, bad))} do not exist in the task's shortest prompt ({T} tokens); "
            f"use positions in 0..{T - 1}, or -{T}..-1 counted from the end (e.g. 'last')."
        )
    return pos


def check_value(model: Any, task: Any, value: Any, positions: tuple[int, ...] | None) -> None:
    """An ablation value name or a reference Task; a mean needs two or more reference prompts at each position."""
    from .interventions import ABLATION_VALUES

    if isinstance(value, str):
        if value not in ABLATION_VALUES:
            raise OptionError(f"unknown ablation value {value!r}; choose one of {', '.join(ABLATION_VALUES)}, or "
                              "pass a reference Task for a mean.")
        if value != "mean":
            return
        ref, whose = task, "the task's clean prompts"
    elif is_task(value):
        check_task(model, value, "the reference task")
        ref, whose = value, "the reference task's clean prompts"
    else:
        raise OptionError(f"value must be 'zero', 'mean', 'resample' or a reference Task; got {type(value).__name__}.")
    counts: dict[int, int] = {}
    for n in ref.lengths:
        for t in range(n):
            counts[t] = counts.get(t, 0) + 1
    need: set[int] = set()
    for T in set(task.lengths):
        need |= set(range(T)) if positions is None else {p % T for p in positions}
    if any(counts.get(t, 0) == 0 for t in need):
        raise TaskError(
            f"the reference task's prompts are at most {max(ref.lengths)} tokens, so they give no mean for "
            f"positions of the task's {max(task.lengths)}-token prompts; use a reference task with prompts at "
            "least as long."
        )
    thin = sorted(t for t in need if counts.get(t, 0) < 2)
    if thin:
        shown = ", ".join(map(str, thin[:6])) + (", ..." if len(thin) > 6 else "")
        raise TaskError(
            f"value='mean' over {whose} is degenerate at position(s) {shown}: only one prompt reaches "
            f"{'it' if len(thin) == 1 else 'them'}, and a mean over one prompt replaces its activation by itself "
            "(TE = SR = 0). Use more prompts of that length, a reference task (value=Task), positions every "
            "prompt reaches, or value='zero'."
        )


# ---------------------------------------------------------------------------- triangulate options
def _int_at_least(a: dict[str, Any], key: str, low: int, none_ok: bool = False) -> None:
    v = a.get(key)
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise OptionError(f"{key} must be an integer >= {low}{' or None' if none_ok else ''}; got {v!r}.")


def check_triangulate(a: dict[str, Any]) -> None:
    """The report's options, checked before its first (expensive) step."""
    _int_at_least(a, "top", 1)
    _int_at_least(a, "graph_top_k", 1, none_ok=True)
    _int_at_least(a, "iterate", 0)
    th = a.get("threshold")
    if isinstance(th, bool) or not isinstance(th, numbers.Real) or not 0 < th < 1:
        raise OptionError(f"threshold is a share of the clean - corrupted gap in (0, 1), e.g. 0.1; got {th!r}.")
    gt = a.get("graph_threshold")
    if gt is not None and (isinstance(gt, bool) or not isinstance(gt, numbers.Real) or not math.isfinite(gt)
                           or gt < 0):
        raise OptionError(f"graph_threshold must be a finite number >= 0 (metric units) or None; got {gt!r}.")
    m = a.get("metric")
    if m is not None and not get_metric(m).linear:
        raise MetricError(f"triangulate needs a metric linear in the logits (direct effects and self-repair are "
                          f"defined for it); {get_metric(m).name!r} is not. Use metric='logit_diff' or 'logit'.")


__all__ = ["read_only", "check_arguments", "check_components", "check_hooks", "check_iterated", "check_pairs",
           "check_positions", "check_seed", "check_task", "check_value", "public"]
