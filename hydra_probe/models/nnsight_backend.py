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

from ..errors import InterventionError, OptionError, RemoteError
from .adapter import get_path
from .sites import Site

#: one edit: rows [r0, r1) of the stacked batch, positions (None: all), columns [c0, c1) (None: all), and the
#: value (r1 - r0 or 1, T, c1 - c0) to write there (one row broadcasts over the rows), or None for zeros.
EditSpec = tuple[int, int, "list[int] | None", "int | None", "int | None", "torch.Tensor | None"]


@dataclass
class Job:
    """One trace: ``ids`` (B, T) stacked ``copies`` times, ``edits`` applied, ``keep`` sites returned.

    ``keep[site]`` is ``"all"`` (B*copies, T, width) or ``"last"`` (B*copies, width), the last position only.
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
            path, io = concrete_path(model, s)
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
                    else:
                        out.append(None)
                outs.append(out)
                hits.append(hit)
    return outs, hits


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
