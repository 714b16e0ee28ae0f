"""The nnsight path: interventions as nnsight traces, run here or on NDIF.

Edits and captures are found from the same architecture table as the local
path, so results are equal. Everything a trace sends is plain data (module
paths, slices, tensors) handled by the trace body below, never package code:
a remote server (``remote=True``, NDIF or any server speaking nnsight's
protocol) runs the body with nnsight alone. Several traces go out together in
one ``model.session()``, i.e. one request (:func:`run_jobs`).

The NDIF host and API key come from nnsight's own configuration
(``NDIF_HOST`` / ``NDIF_API_KEY`` or ``nnsight.CONFIG.API``), as for any nnsight
user. ``remote="local"`` uses nnsight's local simulation (serialize, deserialize
with local modules hidden, run here).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InterventionError, MetricError, OptionError, RemoteError
from .plumbing import get_path
from .sites import Site

#: one edit: rows [r0, r1) of the stacked batch, positions (None: all), columns [c0, c1) (None: all), and the
#: value (r1 - r0 or 1, T, c1 - c0) to write there (one row broadcasts over the rows), or None for zeros.
EditSpec = tuple[int, int, "list[int] | None", "int | None", "int | None", "torch.Tensor | None"]


@dataclass
class Job:
    """One trace: ``ids`` (B, T) stacked ``copies`` times, ``edits`` applied, ``keep`` sites returned.

    ``keep[site]`` is ``"all"`` (B*copies, T, width) or ``"last"`` (B*copies, width), the last position only,
    or ``"sum"`` (T, width) float64, the sum over the batch; ``"last+sum"`` returns the tuple (last, sum).
    """

    ids: torch.Tensor
    edits: Mapping[Site, Sequence[EditSpec]] = field(default_factory=dict)
    keep: Mapping[Site, str] = field(default_factory=dict)
    copies: int = 1


def concrete_path(model: Any, site: Site) -> tuple[str, str]:
    """The dotted module path of ``site`` with any ``a|b`` alternative resolved on the loaded model, and its io."""
    path, io = model.adapter.path_of(site)
    if "|" in path:  # the same alternatives as adapter.get_path, tried on the loaded model
        for alt in path.split("|"):
            try:
                get_path(model.hf_model, alt)
            except (AttributeError, IndexError):
                continue
            return alt, io
        raise InterventionError(f"none of the module paths {path!r} exists in {type(model.hf_model).__name__}")
    return path, io


#: read-only site kinds the trace body computes from the attention call's inputs (see :func:`mechanism_read`)
MECHANISM_KINDS = ("values", "attn_last")


def mechanism_read(model: Any, site: Site) -> tuple[str, tuple[str, str]]:
    """Where a trace reads a ``values`` or ``attn_last`` site: the attention module's path and ``(kind, op)``.

    ``op`` names the call of the attention function inside the module's forward
    (nnsight's ``.source`` operation, e.g. ``attention_interface_1``): the trace
    body reads the query, key and value that call receives (after rotary
    embeddings and any q/k norms, as the model computes them) and its mask,
    scaling, soft-cap and sliding window, and returns the values or the last
    query's weights as the eager implementation computes them, whichever
    implementation the server runs. Raises
    :class:`~hydra_probe.errors.ArchitectureError` when the forward has no such call.
    """
    from ..errors import ArchitectureError

    if site.kind not in MECHANISM_KINDS:
        raise InterventionError(f"mechanism_read covers {', '.join(MECHANISM_KINDS)}; got {site}")
    t = model.adapter.table
    if not 0 <= site.layer < model.adapter.n_layers:
        raise InterventionError(f"site {site} is outside layers 0..{model.adapter.n_layers - 1}")
    path = f"{t.blocks}.{site.layer}.{t.attn}"
    env = model.nnsight
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    try:
        names = list(env.source.names)
    except Exception as e:  # noqa: BLE001 - nnsight cannot instrument this forward
        names, why = [], f" ({type(e).__name__}: {e})"
    else:
        why = ""
    calls = [n for n in names if n.rsplit("_", 1)[0] == "attention_interface" and n.rsplit("_", 1)[-1].isdigit()]
    if not calls:
        raise ArchitectureError(
            f"the {t.family} attention module ({path}) has no attention_interface(...) call in its forward{why}, "
            "so its attention weights and values cannot be read in an nnsight trace; run repair_mechanisms on a "
            "local model (backend='local').")
    return path, (site.kind, calls[-1])  # the call comes after the assignment of the function


def check_host(host: str) -> str:
    """An NDIF host must be an http(s) URL; raise OptionError otherwise."""
    if not isinstance(host, str) or not host.startswith(("http://", "https://")) or len(host.split("://", 1)[1]) == 0:
        raise OptionError(f"the NDIF host {host!r} is not a URL; set NDIF_HOST (or nnsight.CONFIG.API.HOST) to "
                          "e.g. 'https://api.ndif.us' or 'http://127.0.0.1:8289'.")
    return host.rstrip("/")


def remote_host(remote: Any) -> str:
    """The host a ``remote`` setting sends to: the URL itself, or nnsight's configured host for ``True``."""
    if isinstance(remote, str) and remote != "local":
        return check_host(remote)
    import nnsight

    return check_host(nnsight.CONFIG.API.HOST)


_REACHED: set[str] = set()


def check_reachable(host: str, timeout: float = 5.0) -> None:
    """Fail fast, naming ``host``, when nothing answers a TCP connection to it within ``timeout`` seconds.

    (nnsight's websocket would otherwise wait for the system's connect timeout, minutes on a silent network.)
    Checked once per host and process.
    """
    if host in _REACHED:
        return
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(host)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname or "", port), timeout=timeout):
            pass
    except OSError as e:
        raise RemoteError(f"the NDIF host {host} cannot be reached ({e.strerror or e}); check NDIF_HOST "
                          "(nnsight.CONFIG.API.HOST) and the network.") from None
    _REACHED.add(host)


def _prepare_key(lm: Any) -> None:
    """Let a model whose repo id needs no hub lookup (a local folder, or offline mode) go remote.

    nnsight canonicalises the repo id of a remote key through the hub; a folder
    has no hub entry, and offline there is no hub, so the id is kept as given.
    """
    repo = getattr(lm, "repo_id", None)
    if not repo:
        raise OptionError("this model has no repo id (name_or_path) for a remote server to load it by; load it "
                          "by its hub name or from a folder (load_model('org/name', backend='nnsight', remote=True)).")
    from nnsight.modeling import huggingface

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or Path(repo).expanduser().exists()
    if offline:
        huggingface._ID_CACHE.setdefault(repo, repo)


def run_jobs(model: Any, jobs: Sequence[Job]) -> list[dict[Site, torch.Tensor]]:
    """Run ``jobs`` as traces of one nnsight session (one request when remote).

    Returns per job the ``keep`` sites (detached, on the CPU). Raises
    :class:`~hydra_probe.errors.InterventionError` when an edit never met a real
    activation, and :class:`~hydra_probe.errors.RemoteError` when the server
    rejects the request or cannot be reached.
    """
    import nnsight

    lm = model.nnsight
    remote = getattr(model, "remote", False)
    if remote and remote != "local":
        check_reachable(remote_host(remote))  # a host that is not a URL, or silent, fails before anything is sent
    here = not remote or remote == "local"
    dev = model.adapter.device
    plans = []
    for job in jobs:
        sites = sorted(set(job.edits) | set(job.keep), key=lambda s: s.order)
        plan = []
        for s in sites:
            path, io = mechanism_read(model, s) if s.kind in MECHANISM_KINDS else concrete_path(model, s)
            plan.append((path, io, list(job.edits.get(s, ())), job.keep.get(s, "")))
        ids = job.ids.repeat(job.copies, 1)
        plans.append((ids.to(dev) if here else ids.cpu(), plan))
    if remote and remote != "local":
        _prepare_key(lm)
    try:
        outs, hits = _session(lm, plans, remote, nnsight)
    except Exception as e:
        raise _remote_error(e, remote) from None
    results = []
    for (_, plan), out, hit in zip(plans, outs, hits):
        dead = sorted({p for p, _, specs, _ in plan if specs} - set(hit))
        if dead:
            raise InterventionError(f"interventions at {', '.join(dead)} never touched a real activation in the "
                                    "nnsight trace; the architecture table may point at a module the forward skips.")
        sites = sorted(set(jobs[len(results)].edits) | set(jobs[len(results)].keep), key=lambda s: s.order)
        results.append({s: v for s, v, (_, _, _, k) in zip(sites, out, plan) if k})
    return results


def _session(lm: Any, plans: list, remote: Any, nnsight: Any) -> tuple[list, list]:
    # The bodies below are what a server runs: plain data and torch only (no package code).
    with torch.no_grad(), lm.session(remote=remote):
        outs = nnsight.save([])
        hits = nnsight.save([])
        for ids, plan in plans:
            with lm.trace(ids):
                out = []
                hit = []
                for path, io, specs, keep in plan:
                    env = lm
                    for part in path.split("."):
                        env = env[int(part)] if part.isdigit() else getattr(env, part)
                    if not isinstance(io, str):  # values / attn_last: read from the attention call's own inputs
                        a, kw = getattr(env.source, io[1]).inputs
                        q, k, v = a[1], a[2], a[3]
                        if io[0] == "values":  # (B, n_kv, T, dh) -> (B, T, n_kv * dh)
                            y = v.transpose(1, 2).reshape(v.shape[0], v.shape[2], -1)
                        else:  # the last query's weights (B, T, H), as the eager implementation computes them
                            mask = a[4] if len(a) > 4 else kw.get("attention_mask")
                            sc = kw.get("scaling")
                            sc = q.shape[-1] ** -0.5 if sc is None else sc
                            kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                            y = torch.matmul(q[:, :, -1:], kk.transpose(-1, -2))[:, :, 0] * sc  # (B, H, T)
                            cap = kw.get("softcap")
                            if cap:
                                y = torch.tanh(y / cap) * cap
                            T = k.shape[2]
                            if isinstance(mask, torch.Tensor):  # additive (eager) or boolean (sdpa) mask
                                mr = mask[:, :, -1, :T]
                                y = y.masked_fill(~mr, float("-inf")) if mr.dtype == torch.bool else y + mr
                            win = kw.get("sliding_window")
                            if win and T > win:
                                y[..., : T - win] = float("-inf")
                            y = torch.softmax(y.float(), -1).to(v.dtype).transpose(1, 2)
                        out.append((y[:, -1] if keep == "last" else y).detach().cpu())
                        continue
                    x = env.input if io == "input" else env.output
                    rest = None
                    if isinstance(x, tuple):
                        x, rest = x[0], x[1:]
                    if specs:
                        if isinstance(x, torch.Tensor):
                            hit.append(path)
                        x = x.clone()
                        for r0, r1, pos, c0, c1, val in specs:
                            p = slice(None) if pos is None else pos
                            if val is None:
                                x[r0:r1, p, c0:c1] = 0
                            else:
                                x[r0:r1, p, c0:c1] = val[:, p].to(x.device, x.dtype)
                        y = x if rest is None else (x, *rest)
                        if io == "input":
                            env.input = y
                        else:
                            env.output = y
                    if keep == "last":
                        out.append(x[:, -1].detach().cpu())
                    elif keep == "all":
                        out.append(x.detach().cpu())
                    elif keep:  # "sum" (over the batch, float64: (T, width)) and/or "last", e.g. "last+sum"
                        out.append(tuple(x[:, -1].detach().cpu() if m == "last" else
                                         x.detach().to(torch.float64).sum(0).cpu() for m in keep.split("+")))
                    else:
                        out.append(None)
                outs.append(out)
                hits.append(hit)
    return outs, hits


# ---------------------------------------------------------------------------- gradient reads (attribution) as traces
@dataclass
class GradJob:
    """One trace of gradient reads: ``ids`` (B, T) stacked ``copies`` times (one copy per read).

    ``rows[site]``: the read sites (a zero tensor added there carries the gradient) and, per site, the rows
    (long) whose gradient comes back. ``freeze[site]``: (a bool row mask (copies*B,), column ranges [(c0, c1)])
    of a q/k/qkv site: the entries that pass no gradient (AtP*'s QK fix). ``drops[l]``: a bool mask (copies*B, 1, 1): rows whose block
    ``l`` write to the residual passes no gradient, the skip path carrying it (GradDrop). ``tokens`` (K,) and
    ``weights`` (B, K): the gradient is that of ``sum weights * u[:, -1, tokens]``, u the unembedding's
    output (see :func:`logit_weights`), summed over copies. ``acts``: also return the read sites' activations.
    """

    ids: torch.Tensor
    copies: int
    rows: Mapping[Site, torch.Tensor]
    tokens: torch.Tensor
    weights: torch.Tensor
    freeze: Mapping[Site, tuple[torch.Tensor, list[tuple[int, int]]]] = field(default_factory=dict)
    drops: Mapping[int, torch.Tensor] = field(default_factory=dict)
    acts: bool = True


def logit_weights(model: Any, x_last: torch.Tensor, fn: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A metric's value and its gradient with respect to the unembedding's output, from final residuals.

    ``x_last`` (B, d): final residuals at the last position; ``fn(logits) -> (B,)`` the metric of the
    (soft-capped) logits. Returns ``(metric (B,) float64, tokens (K,), weights (B, K))``: the tokens where the
    gradient is non-zero and the gradient there (float64 for a float64 model, else float32). By the chain
    rule, ``sum weights * u[:, tokens]`` (u the unembedding's output) has the metric's gradient with respect
    to every activation of that run, so a trace body computes it without the metric's code.
    """
    ad = model.adapter
    wdt = torch.float64 if ad.dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        u = ad.unembed(ad.final_norm(x_last.to(ad.device))).detach().requires_grad_(True)
        m = fn(ad.apply_softcap(u))
        if not m.requires_grad:
            raise MetricError("the metric has no gradient with respect to the logits (it detaches them or is not "
                              "built from torch operations on them); attribution patching needs a differentiable "
                              "metric such as 'logit_diff'.")
        (w,) = torch.autograd.grad(m.sum(), [u], allow_unused=True)
    w = torch.zeros_like(u) if w is None else w.detach()
    tokens = torch.nonzero(w.abs().sum(0)).flatten()
    if len(tokens) == 0:
        tokens = torch.zeros(1, dtype=torch.long, device=w.device)
    return m.detach().to(torch.float64).cpu(), tokens.cpu(), w[:, tokens].to(wdt).cpu()


def module_path(model: Any, path: str) -> str:
    """A dotted module path of the architecture table (maybe ``a|b`` alternatives) resolved on the loaded model."""
    for alt in path.split("|"):
        try:
            get_path(model.hf_model, alt)
        except (AttributeError, IndexError):
            continue
        return alt
    raise InterventionError(f"none of the module paths {path!r} exists in {type(model.hf_model).__name__}")


def run_gradient_jobs(model: Any, jobs: Sequence[GradJob]
                      ) -> list[tuple[dict[Site, torch.Tensor], dict[Site, torch.Tensor]]]:
    """Run gradient ``jobs``, each as one nnsight trace (one request when remote).

    Returns per job ``(acts, grads)``: per read site its activation of the first copy (B, T, width; empty
    without ``job.acts``) and the
    gradient at its ``rows`` (len(rows), T, width), detached, on the CPU. The trace body
    (:func:`_grad_trace`) is plain data and torch: the forward runs with gradients enabled, zero tensors
    added at the read sites, ``.detach()`` on the frozen and dropped paths, and ``torch.autograd.grad`` of
    the metric's linear form at the unembedding's output. Raises as :func:`run_jobs`.
    """
    import nnsight

    lm = model.nnsight
    remote = getattr(model, "remote", False)
    if remote and remote != "local":
        check_reachable(remote_host(remote))
    here = not remote or remote == "local"
    dev = model.adapter.device
    head = module_path(model, model.adapter.table.unembed)
    plans = []
    for job in jobs:
        points: dict[tuple[str, str], list] = {}

        def at(s: Site, points: dict = points) -> list:
            path, io = concrete_path(model, s)
            return points.setdefault((path, io), [s.order, path, io, []])[3]
        for s, (m, cols) in job.freeze.items():
            at(s).append(("freeze", m, cols))
        for layer, m in job.drops.items():
            at(Site(layer + 1, "resid_pre")).append(("drop", layer, m))
        for i, (s, r) in enumerate(job.rows.items()):
            at(s).append(("read", r, i, job.acts))
        for layer in job.drops:
            at(Site(layer, "resid_pre")).append(("stash", layer))
        order = {"freeze": 0, "drop": 1, "read": 2, "stash": 3}
        plan = [(path, io, sorted(ops, key=lambda op: order[op[0]]))
                for _, path, io, ops in sorted(points.values(), key=lambda p: p[0])]
        ids = job.ids.repeat(job.copies, 1)
        plans.append((ids.to(dev) if here else ids.cpu(), plan, job.tokens.cpu(), job.weights.cpu(), job.copies))
    if remote and remote != "local":
        _prepare_key(lm)
    outs, hits = [], []
    for ids, plan, tokens, weights, k in plans:
        try:
            out, hit = _grad_trace(lm, ids, plan, head, tokens, weights, k, remote, nnsight)
        except Exception as e:
            raise _remote_error(e, remote) from None
        outs.append(out)
        hits.append(hit)
    results = []
    for job, (_, plan, *_), (acts, grads), hit in zip(jobs, plans, outs, hits):
        dead = sorted({p for p, _, _ in plan} - set(hit))
        if dead:
            raise InterventionError(f"gradient reads at {', '.join(dead)} never touched a real activation in the "
                                    "nnsight trace; the architecture table may point at a module the forward skips.")
        listed = list(job.rows)
        sites = [listed[op[2]] for _, _, ops in plan for op in ops if op[0] == "read"]
        results.append(({s: v for s, v in zip(sites, acts) if v is not None}, dict(zip(sites, grads))))
    return results


def _grad_trace(lm: Any, ids: torch.Tensor, plan: list, head: str, tokens: torch.Tensor, weights: torch.Tensor,
                k: int, remote: Any, nnsight: Any) -> tuple[tuple[list, list], list]:
    # One top-level trace per request: a server compiles its body from the shipped source (a trace nested in a
    # session is looked up by file name on the server, which may hold another body of this file from an
    # earlier request). The body below is what a server runs: plain data and torch only (no package code).
    was = torch.is_grad_enabled()
    try:
        with lm.trace(ids, remote=remote):
            grad_was = torch.is_grad_enabled()
            torch.set_grad_enabled(True)  # the server may run requests without gradients
            acts = []
            deltas = []
            rows = []
            stash = {}
            hit = []
            for path, io, ops in plan:
                env = lm
                for part in path.split("."):
                    env = env[int(part)] if part.isdigit() else getattr(env, part)
                x = env.input if io == "input" else env.output
                rest = None
                if isinstance(x, tuple):
                    x, rest = x[0], x[1:]
                if isinstance(x, torch.Tensor):
                    hit.append(path)
                edited = False
                for op in ops:
                    if op[0] == "freeze":  # no gradient through these queries and keys
                        cm = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
                        for c0, c1 in op[2]:
                            cm[c0:c1] = True
                        mask = op[1].to(x.device)[:, None, None] & cm
                        x = torch.where(mask, x.detach(), x)
                        edited = True
                    elif op[0] == "drop":  # the same values; the gradient goes to the block input only
                        xin = stash[op[1]]
                        x = torch.where(op[2].to(x.device), x.detach() + (xin - xin.detach()), x)
                        edited = True
                    elif op[0] == "read":
                        acts.append(x[: x.shape[0] // k].detach().cpu() if op[3] else None)
                        d = torch.zeros_like(x, requires_grad=True)
                        x = x + d
                        deltas.append(d)
                        rows.append(op[1])
                        edited = True
                    else:
                        stash[op[1]] = x
                if edited:
                    y = x if rest is None else (x, *rest)
                    if io == "input":
                        env.input = y
                    else:
                        env.output = y
            env = lm
            for part in head.split("."):
                env = env[int(part)] if part.isdigit() else getattr(env, part)
            u = env.output
            if isinstance(u, tuple):
                u = u[0]
            lg = u[:, -1][:, tokens.to(u.device)].to(weights.dtype)
            m = (lg.reshape(k, -1, lg.shape[-1]) * weights.to(lg.device)).sum()
            got = torch.autograd.grad(m, deltas, allow_unused=True) if deltas else []
            grads = []
            for d, gv, r in zip(deltas, got, rows):
                gv = torch.zeros_like(d) if gv is None else gv
                grads.append(gv[r.to(gv.device)].detach().cpu())
            torch.set_grad_enabled(grad_was)
            out = nnsight.save((acts, grads))
            hits = nnsight.save(hit)
    finally:
        torch.set_grad_enabled(was)  # nnsight's local simulation runs the body here
    return out, hits


# ---------------------------------------------------------------------------- AtP*'s QK fix as traces
@dataclass
class QKJob:
    """One trace of AtP*'s QK fix: ``ids`` (B, T) stacked ``1 + k`` times, the first copy the unedited run.

    Copy ``j + 1`` gets, at every layer ``l >= first[j]``, the block input of the unedited copy plus
    ``deltas[j]`` (k, B, T, d) and the unedited copy's values: its heads' output ``z`` is then that of the
    change reaching only layer l's queries and keys, the block input (and values) held at the unedited
    run's. What comes back is, per layer, that ``z`` minus the unedited one for the copies that reach it.
    """

    ids: torch.Tensor
    deltas: torch.Tensor
    first: Sequence[int]


def run_qk_jobs(model: Any, jobs: Sequence[QKJob]) -> list[dict[int, torch.Tensor]]:
    """Run QK-fix ``jobs``, each as one nnsight trace (one request when remote).

    Returns per job ``{layer: dz (m, B, T, n_heads*head_dim)}`` for every layer some copy reaches, its rows
    the copies with ``first[j] <= layer`` in order (model dtype, CPU). The trace body (:func:`_qk_trace`) is
    plain data and torch: row copies and adds, no module calls. Raises as :func:`run_jobs`.
    """
    import nnsight

    ad = model.adapter
    lm = model.nnsight
    remote = getattr(model, "remote", False)
    if remote and remote != "local":
        check_reachable(remote_host(remote))
    here = not remote or remote == "local"
    dev = ad.device
    L = ad.n_layers
    plans = []
    layers_of = []
    for job in jobs:
        first = list(job.first)
        layers = list(range(min(first, default=L), L))
        points: dict[tuple[str, str], list] = {}

        def at(s: Site, points: dict = points) -> list:
            path, io = concrete_path(model, s)
            return points.setdefault((path, io), [s.order, path, io, []])[3]
        for layer in layers:
            sel = torch.tensor([j for j, f in enumerate(first) if f <= layer], dtype=torch.long)
            at(Site(layer, "resid_pre")).append(("shift", sel))
            vcols: dict[Site, list[tuple[int, int]]] = {}
            for h in range(ad.n_heads):
                site, sl = ad.head_input_slice(layer, h, "v")
                if (sl.start, sl.stop) not in vcols.setdefault(site, []):
                    vcols[site].append((sl.start, sl.stop))
            for site, cols in vcols.items():
                at(site).append(("values", sel, cols))
            at(Site(layer, "z")).append(("dz", sel))
        plan = [(path, io, ops) for _, path, io, ops in sorted(points.values(), key=lambda p: p[0])]
        ids = job.ids.repeat(1 + len(first), 1)
        deltas = job.deltas.detach()
        plans.append((ids.to(dev) if here else ids.cpu(), plan,
                      deltas.to(dev) if here else deltas.cpu().contiguous(), 1 + len(first)))
        layers_of.append(layers)
    if remote and remote != "local":
        _prepare_key(lm)
    outs, hits = [], []
    for ids, plan, deltas, n in plans:
        try:
            out, hit = _qk_trace(lm, ids, plan, deltas, n, remote, nnsight)
        except Exception as e:
            raise _remote_error(e, remote) from None
        outs.append(out)
        hits.append(hit)
    results = []
    for (_, plan, _, _), out, hit, layers in zip(plans, outs, hits, layers_of):
        dead = sorted({p for p, _, _ in plan} - set(hit))
        if dead:
            raise InterventionError(f"the QK fix's edits at {', '.join(dead)} never touched a real activation in "
                                    "the nnsight trace; the architecture table may point at a module the forward "
                                    "skips.")
        results.append(dict(zip(layers, out)))
    return results


def _qk_trace(lm: Any, ids: torch.Tensor, plan: list, deltas: torch.Tensor, n: int, remote: Any, nnsight: Any
              ) -> tuple[list, list]:
    # One top-level trace per request (see _grad_trace). The body below is what a server runs: plain data and
    # torch only (no package code).
    with torch.no_grad(), lm.trace(ids, remote=remote):
        out = []
        hit = []
        for path, io, ops in plan:
            env = lm
            for part in path.split("."):
                env = env[int(part)] if part.isdigit() else getattr(env, part)
            x = env.input if io == "input" else env.output
            rest = None
            if isinstance(x, tuple):
                x, rest = x[0], x[1:]
            if isinstance(x, torch.Tensor):
                hit.append(path)
            xv = x.reshape(n, x.shape[0] // n, *x.shape[1:])
            edited = False
            for op in ops:
                sel = op[1].to(x.device)
                if op[0] == "dz":  # these copies' heads' output minus the unedited copy's
                    out.append((xv[1 + sel] - xv[0]).detach().cpu())
                    continue
                if not edited:
                    xv = xv.clone()
                    edited = True
                if op[0] == "shift":  # the block input: the unedited copy's plus the change
                    xv[1 + sel] = xv[0] + deltas[sel].to(x.device, x.dtype)
                else:  # the values: the unedited copy's
                    for c0, c1 in op[2]:
                        xv[1 + sel, :, :, c0:c1] = xv[0, :, :, c0:c1].clone()
            if edited:
                x = xv.reshape(x.shape)
                y = x if rest is None else (x, *rest)
                if io == "input":
                    env.input = y
                else:
                    env.output = y
        out = nnsight.save(out)
        hit = nnsight.save(hit)
    return out, hit

def _remote_error(e: Exception, remote: Any) -> Exception:
    """The package error for a failed nnsight run (rejected, failed or unreachable server); others pass through."""
    if not remote or remote == "local" or isinstance(e, (InterventionError, OptionError)):
        return e
    try:
        from nnsight.intervention.backends.remote import RemoteError as NnsightRemoteError
    except ImportError:  # pragma: no cover
        NnsightRemoteError = ()  # noqa: N806
    host = remote_host(remote)
    if isinstance(e, NnsightRemoteError):
        msg = str(e)
        if "Failed to send request" in msg and any(w in msg for w in ("Connect", "connect", "refused", "resolve")):
            return RemoteError(f"the NDIF host {host} cannot be reached ({msg}); check NDIF_HOST "
                               "(nnsight.CONFIG.API.HOST) and the network.")
        return RemoteError(f"the NDIF server at {host} rejected or failed the request: {msg}")
    if isinstance(e, (ConnectionError, OSError, TimeoutError)) or type(e).__module__.startswith("websocket"):
        return RemoteError(f"the NDIF host {host} cannot be reached ({type(e).__name__}: {e}); check NDIF_HOST "
                           "(nnsight.CONFIG.API.HOST) and the network.")
    return e


# ---------------------------------------------------------------------------- path patching (deliveries) as traces
#: where path-patching ops act: a :class:`Site`, ``("attn_norm", layer)`` (the pre-attention norm's input, the
#: block input without one) or ``("mlp_norm", layer)`` (the pre-MLP norm; the MLP's input without one)
PathPoint = Any

#: one op at a point (plain data; see :class:`PathJob`):
#: ("edit", r0, r1, positions, c0, c1, value)  an :data:`EditSpec` (a replacement)
#: ("copy", src, dst, n, cols)  rows [dst, dst + n) take rows [src, src + n) (cols: list of (c0, c1), None: all)
#: ("stash", key)  keep this point's (edited) value as ``key`` (at a receiver layer's ``("attn_norm", layer)``)
#: ("qkv", r0, r1, key, layer, delta, cols)  at a q/k/v site: rows [r0, r1), columns cols take the projection
#:     of ``attn_norm_layer(stash[key][r0:r1] + deltas[delta])``
#: ("mlp", r0, r1, delta)  at ``("mlp_norm", layer)``: rows [r0, r1) of the norm's output take
#:     ``norm(norm input + deltas[delta])`` (without a pre-MLP norm the MLP's input rows take ``x + delta``)
PathOp = tuple


@dataclass
class PathJob:
    """One trace of path patching: ``ids`` (B, T) stacked ``copies`` times (shadow batches included),
    ``ops[point]`` applied in execution order, ``keep`` sites returned (as in :class:`Job`).

    ``deltas`` are the sender changes (B, T, d) the ops add, each shipped once.
    """

    ids: torch.Tensor
    ops: Mapping[PathPoint, Sequence[PathOp]] = field(default_factory=dict)
    keep: Mapping[Site, str] = field(default_factory=dict)
    deltas: Sequence[torch.Tensor] = ()
    copies: int = 1


def block_module_path(model: Any, layer: int, rel: str) -> str:
    """The dotted path of ``rel`` (a path inside a block, from the architecture table) in block ``layer``,
    any ``a|b`` alternative resolved on the loaded model."""
    path = f"{model.adapter.table.blocks}.{layer}.{rel}"
    for alt in path.split("|") if "|" in path else [path]:
        try:
            get_path(model.hf_model, alt)
        except (AttributeError, IndexError):
            continue
        return alt
    raise InterventionError(f"none of the module paths {path!r} exists in {type(model.hf_model).__name__}")


def norm_path(model: Any, layer: int, which: str) -> str | None:
    """Module path of block ``layer``'s pre-attention (``"attn"``) or pre-MLP (``"mlp"``) norm; None without one."""
    t = model.adapter.table
    rel = t.attn_norm if which == "attn" else t.mlp_norm
    return None if rel is None else block_module_path(model, layer, rel)


def _path_point(model: Any, point: PathPoint) -> tuple[tuple, str, str, bool]:
    """(execution order key, module path, io, whether ``mlp`` ops there run the norm) of a path point."""
    if isinstance(point, Site):
        path, io = concrete_path(model, point)
        return point.order, path, io, False
    what, layer = point
    norm = norm_path(model, layer, "attn" if what == "attn_norm" else "mlp")
    if what == "attn_norm":  # the norm's input; without a norm the attention reads the block input
        if norm is None:
            path, io = concrete_path(model, Site(layer, "resid_pre"))
            return (*Site(layer, "resid_pre").order, 1), path, io, False
        return (layer, 0.5), norm, "input", False
    if what == "mlp_norm":
        if norm is None:  # no pre-MLP norm (OLMo-2): the MLP's input, after any edit of it
            path, io = concrete_path(model, Site(layer, "mlp_in"))
            return (*Site(layer, "mlp_in").order, 1), path, io, False
        return (layer, 8.5), norm, "output", True
    raise InterventionError(f"unknown path-patching point {point!r}")


def run_path_jobs(model: Any, jobs: Sequence[PathJob]) -> list[dict[Site, torch.Tensor]]:
    """Run each path-patching job as one nnsight trace (one request when remote).

    Like :func:`run_jobs`; the trace body (:func:`_path_trace`) is plain data, torch and the model's own
    modules (norms and q/k/v projections called on the delivered inputs), so a remote server runs it.
    """
    import nnsight

    lm = model.nnsight
    remote = getattr(model, "remote", False)
    if remote and remote != "local":
        check_reachable(remote_host(remote))
    here = not remote or remote == "local"
    dev = model.adapter.device
    plans = []
    for job in jobs:
        points: dict[tuple[str, str], list] = {}
        located = [(*_path_point(model, pt), ops) for pt, ops in job.ops.items()]
        for order, path, io, with_norm, ops in sorted(located, key=lambda e: e[0]):
            ops = [(*op[:4], norm_path(model, op[4], "attn"), *op[5:]) if op[0] == "qkv"
                   else (*op, with_norm) if op[0] == "mlp" else tuple(op) for op in ops]
            points.setdefault((path, io), [order, path, io, [], ""])[3].extend(ops)
        for s, k in job.keep.items():
            path, io = concrete_path(model, s)
            points.setdefault((path, io), [s.order, path, io, [], ""])[4] = k
        plan = [(path, io, ops, keep) for _, path, io, ops, keep in sorted(points.values(), key=lambda p: p[0])]
        ids = job.ids.repeat(job.copies, 1)
        deltas = [d.detach().to(dev) if here else d.detach().cpu().contiguous() for d in job.deltas]
        plans.append((ids.to(dev) if here else ids.cpu(), plan, deltas))
    if remote and remote != "local":
        _prepare_key(lm)
    try:
        outs, hits = _path_session(lm, plans, remote, nnsight)
    except Exception as e:
        raise _remote_error(e, remote) from None
    results = []
    for job, (_, plan, _), out, hit in zip(jobs, plans, outs, hits):
        dead = sorted({p for p, _, ops, _ in plan if ops} - set(hit))
        if dead:
            raise InterventionError(f"path-patching edits at {', '.join(dead)} never touched a real activation in "
                                    "the nnsight trace; the architecture table may point at a module the forward "
                                    "skips.")
        where = {concrete_path(model, s): s for s in job.keep}
        results.append({where[(p, io)]: v for (p, io, _, k), v in zip(plan, out) if k})
    return results


def _path_session(lm: Any, plans: list, remote: Any, nnsight: Any) -> tuple[list, list]:
    # One plain trace per plan (one request each), not a session: a server caches the source of a file's first
    # session body and would look for a second, different session body of the same file in it.
    outs, hits = [], []
    for plan in plans:
        o, h = _path_trace(lm, plan, remote, nnsight)
        outs.append(o)
        hits.append(h)
    return outs, hits


def _path_trace(lm: Any, plan_: tuple, remote: Any, nnsight: Any) -> tuple[list, list]:
    # The body below is what a server runs: plain data, torch and the model's own modules (no package code).
    ids, plan, deltas = plan_
    with torch.no_grad(), lm.trace(ids, remote=remote):
        out = nnsight.save([])
        hit = nnsight.save([])
        stash = {}
        normed = {}
        for path, io, ops, keep in plan:
            env = lm
            for part in path.split("."):
                env = env[int(part)] if part.isdigit() else getattr(env, part)
            xin = None
            if io == "output" and any(op[0] == "mlp" and op[4] for op in ops):
                xin = env.input
                if isinstance(xin, tuple):
                    xin = xin[0]
            x = env.input if io == "input" else env.output
            rest = None
            if isinstance(x, tuple):
                x, rest = x[0], x[1:]
            if ops:
                if isinstance(x, torch.Tensor):
                    hit.append(path)
                x = x.clone()
                changed = False
                for op in ops:
                    if op[0] == "edit":
                        _, r0, r1, pos, c0, c1, val = op
                        p = slice(None) if pos is None else pos
                        if val is None:
                            x[r0:r1, p, c0:c1] = 0
                        else:
                            x[r0:r1, p, c0:c1] = val[:, p].to(x.device, x.dtype)
                        changed = True
                    elif op[0] == "copy":
                        _, src, dst, n, cols = op
                        for c0, c1 in cols if cols is not None else [(None, None)]:
                            x[dst:dst + n, :, c0:c1] = x[src:src + n, :, c0:c1]
                        changed = True
                    elif op[0] == "stash":
                        stash[op[1]] = x.clone()
                    elif op[0] == "qkv":
                        _, r0, r1, key, norm, di, cols = op
                        nk = (key, r0, di)
                        if nk not in normed:
                            h = stash[key][r0:r1] + deltas[di].to(x.device, x.dtype)
                            if norm is not None:
                                nm = lm
                                for part in norm.split("."):
                                    nm = nm[int(part)] if part.isdigit() else getattr(nm, part)
                                h = nm(h)
                            normed[nk] = h
                        proj = env(normed[nk])
                        for c0, c1 in cols:
                            x[r0:r1, :, c0:c1] = proj[:, :, c0:c1].to(x.dtype)
                        changed = True
                    elif op[0] == "mlp":
                        _, r0, r1, di, norm = op
                        d = deltas[di].to(x.device, x.dtype)
                        if norm:
                            x[r0:r1] = env(xin[r0:r1] + d).to(x.dtype)
                        else:
                            x[r0:r1] = x[r0:r1] + d
                        changed = True
                if changed:
                    y = x if rest is None else (x, *rest)
                    if io == "input":
                        env.input = y
                    else:
                        env.output = y
            if keep == "last":
                out.append(x[:, -1].detach().cpu())
            elif keep == "all":
                out.append(x.detach().cpu())
            else:
                out.append(None)
    return out, hit
