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
