"""The model adapter: the only code that touches modules, hooks and nnsight.

:class:`Adapter` resolves the paths of an :class:`~.tables.ArchTable` on a
loaded Hugging Face causal LM and offers what the rest of the package needs:

* shapes (layers, heads, head_dim, d_model) and the parallel-residual flag;
* weights in analysis form: per-head output matrices ``W_O`` (H, dh, d),
  the final norm's scale, shift and eps, unembedding rows;
* :meth:`Adapter.hooks`, a context manager that edits or captures sites and
  always removes exactly the hooks it added (also on error);
* the fast local path: :meth:`Adapter.prefix` runs the base model once and
  keeps each block's input and call arguments, so that
  :meth:`Adapter.run_blocks` can restart the forward at any layer, for many
  stacked copies of the batch at once;
* the nnsight path (:mod:`.nnsight_backend`).

Nothing here changes the model's weights or leaves a hook behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ArchitectureError, InterventionError, OptionError
from .sites import READ_ONLY_KINDS, Site
from .suffix import capture_keys, min_shared_rows, prefix_keys_function, suffix_call
from .tables import ArchTable, table_for

EditFn = Callable[[torch.Tensor], torch.Tensor]


def get_path(root: nn.Module, path: str) -> Any:
    """Follow a dotted attribute path (integers index module lists).

    ``"a|b"`` tries ``a`` then ``b`` (names that changed across transformers versions).
    """
    if "|" in path:
        alts = path.split("|")
        for alt in alts[:-1]:
            try:
                return get_path(root, alt)
            except AttributeError:
                continue
        return get_path(root, alts[-1])
    obj: Any = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


@dataclass
class Prefix:
    """A clean (or corrupted) base forward kept for restarting at any layer.

    ``resid[l]``: (B, T, d) input of block ``l`` (``resid[n_layers]`` is the
    final norm's input); ``calls[l]``: the block's other positional and
    keyword arguments, replayed by :meth:`Adapter.run_blocks`.
    """

    resid: list[torch.Tensor]
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
    captures: dict[Site, torch.Tensor]
    #: per layer: the attention module's output structure when it is exactly its output projection's
    #: output (``"tensor"`` or the tuple's length, the rest None), so a restart may begin at ``z``; else None
    attn_direct: list[Any] = field(default_factory=list)
    #: per layer: the keys and values (B, H_kv, T, dh) its attention function received in this run, as
    #: :meth:`Adapter.suffix_ready` records them for runs of the later rows (:mod:`.suffix`)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.resid[0].shape[0]


def _tile(obj: Any, batch: int, copies: int) -> Any:
    """Repeat tensors whose first dim is ``batch`` ``copies`` times along dim 0."""
    if copies == 1:
        return obj
    if torch.is_tensor(obj):
        if obj.dim() > 0 and obj.shape[0] == batch and batch > 1:
            return obj.repeat(copies, *([1] * (obj.dim() - 1)))
        return obj
    if isinstance(obj, tuple):
        return tuple(_tile(o, batch, copies) for o in obj)
    if isinstance(obj, list):
        return [_tile(o, batch, copies) for o in obj]
    if isinstance(obj, dict):
        return {k: _tile(v, batch, copies) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def temporary_hooks() -> Iterator[Callable[..., None]]:
    """The one register-then-remove pattern: yields ``register(module, fn, pre=False, **kw)``, which
    adds a forward hook (``pre=True``: a forward pre-hook; ``kw`` as torch takes them); every hook
    added is removed on exit, also on error."""
    handles: list[Any] = []

    def register(module: nn.Module, fn: Callable[..., Any], pre: bool = False, **kw: Any) -> None:
        add = module.register_forward_pre_hook if pre else module.register_forward_hook
        handles.append(add(fn, **kw))

    try:
        yield register
    finally:
        for h in handles:
            h.remove()


class Adapter:
    """Architecture-aware access to a Hugging Face causal LM (see module doc)."""

    #: AtP*'s QK fix (:meth:`attention_z`, :meth:`attention_z_given`) computes a Llama-style rotary embedding
    #: without its concatenation (:mod:`.rotary`, the same numbers bit for bit); False: transformers' own
    fast_rotary: bool = True

    def __init__(self, hf_model: nn.Module, table: ArchTable | None = None) -> None:
        config = getattr(hf_model, "config", None)
        if config is None:
            raise ArchitectureError(
                f"{type(hf_model).__name__} has no .config; pass a transformers causal LM "
                "(e.g. AutoModelForCausalLM.from_pretrained(...))."
            )
        self.model = hf_model
        self.config = config
        self.table = table or table_for(getattr(config, "model_type", type(hf_model).__name__))
        t = self.table
        try:
            self.base = get_path(hf_model, t.base)
            self.blocks = list(get_path(hf_model, t.blocks))
            self.final_norm = get_path(hf_model, t.final_norm)
            self.unembed = get_path(hf_model, t.unembed)
        except (AttributeError, IndexError) as e:
            raise ArchitectureError(
                f"{type(hf_model).__name__} does not have the layout of the {t.family} table "
                f"({e}); is it a causal LM (…ForCausalLM / …LMHeadModel) of that family?"
            ) from None
        self.n_layers = len(self.blocks)
        self.n_heads = int(getattr(config, t.n_heads_attr))
        self.n_kv_heads = int(getattr(config, t.n_kv_heads_attr, None) or self.n_heads) if t.n_kv_heads_attr else self.n_heads
        o0 = get_path(self.blocks[0], t.o_proj)
        w = o0.weight
        width = w.shape[0] if t.o_proj_kind == "conv1d" else w.shape[1]
        self.d_model = w.shape[1] if t.o_proj_kind == "conv1d" else w.shape[0]
        self.head_dim = width // self.n_heads
        self.parallel = bool(getattr(config, t.parallel_attr, t.parallel_default)) if t.parallel_attr else False
        self.vocab_size = self.unembed.weight.shape[0]
        #: set by a remote HookedModel: local hooks would run here, not on the server, so they refuse
        self.remote = False
        #: per attention implementation: whether runs of the later rows passed their check (:meth:`suffix_ready`)
        self._suffix_ok: dict[Any, bool] = {}

    def _refuse_remote(self) -> None:
        if self.remote:
            raise OptionError(
                "this analysis runs local hooks, which a remote model ignores, so it cannot run with remote=True yet; "
                "run it on a local model (remote=False); the package's own analyses run remotely as nnsight traces.")

    # ------------------------------------------------------------------ weights
    @property
    def device(self) -> torch.device:
        """Where the unembedding computes (its accelerate execution device when it is offloaded)."""
        return _exec_device(self.unembed, self.unembed.weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.unembed.weight.dtype

    def param(self, module: nn.Module, name: str) -> torch.Tensor | None:
        """``module.<name>`` as a real tensor: an offloaded (accelerate, meta-device) weight is loaded for the read."""
        return _param(module, name)

    def W_O(self, layer: int) -> torch.Tensor:
        """Per-head output matrices of ``layer``: (n_heads, head_dim, d_model)."""
        w = _param(get_path(self.blocks[layer], self.table.o_proj), "weight")
        if self.table.o_proj_kind == "linear":
            w = w.T
        return w.reshape(self.n_heads, self.head_dim, self.d_model)

    def b_O(self, layer: int) -> torch.Tensor | None:
        """Bias of the attention output projection of ``layer`` (d_model,) or None."""
        return _param(get_path(self.blocks[layer], self.table.o_proj), "bias")

    def norm_params(self) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Final norm as (gamma (d,), beta (d,) or None, eps); gamma includes Gemma's 1 + w."""
        n = self.final_norm
        gamma = _param(n, "weight") + self.table.gamma_offset
        beta = _param(n, "bias")
        eps = next((float(getattr(n, a)) for a in ("eps", "variance_epsilon", "epsilon") if hasattr(n, a)), None)
        if eps is None:
            raise ArchitectureError(f"cannot read eps of final norm {type(n).__name__}")
        return gamma, beta, eps

    def W_U(self, ids: torch.Tensor) -> torch.Tensor:
        """Unembedding rows for token ids: (..., d_model)."""
        return _param(self.unembed, "weight")[ids.to(self.device)]

    def b_U(self, ids: torch.Tensor) -> torch.Tensor | None:
        b = _param(self.unembed, "bias")
        return None if b is None else b[ids.to(b.device)]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm then unembedding of residual vectors x (..., d) -> (..., vocab); soft-capped where the model caps."""
        return self.apply_softcap(self.unembed(self.final_norm(x)))

    def logits_at(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` at the token columns ``ids`` only: x (N, d), ids (N, c) -> (N, c).

        Final norm, then each row's own unembedding rows (:meth:`W_U`, :meth:`b_U`), soft-capped: equal to
        ``logits(x).gather(-1, ids)`` to float rounding without the (N, vocab) product (for a 50k-262k
        vocabulary most of the unembedding's cost). Where the head is not a plain ``nn.Linear`` or something
        hooks it (quantized heads, accelerate's offload or device hooks, forward hooks), the full logits are
        gathered."""
        u = self.unembed
        if (type(u) is not nn.Linear or getattr(u, "_hf_hook", None) is not None
                or u._forward_hooks or u._forward_pre_hooks):
            logits = self.logits(x)
            return logits.gather(-1, ids.to(logits.device))
        W = self.W_U(ids)  # (N, c, d)
        out = torch.matmul(W, self.final_norm(x).to(W.device)[..., None]).squeeze(-1)
        b = self.b_U(ids)
        return self.apply_softcap(out if b is None else out + b)

    # ------------------------------------------------------------------ sites
    def _resolve(self, site: Site) -> tuple[str, str]:
        """The one site resolver: dotted module path (from the model's root) of ``site`` and whether its
        ``"input"`` or ``"output"`` is meant. Raises :class:`~hydra_probe.errors.InterventionError` for a layer
        out of range or a kind this architecture does not have."""
        t, L = self.table, site.layer
        if not 0 <= L <= self.n_layers or (L == self.n_layers and site.kind != "resid_pre"):
            raise InterventionError(f"site {site} is outside layers 0..{self.n_layers - 1}")
        if site.kind == "resid_pre":
            return (t.final_norm if L == self.n_layers else f"{t.blocks}.{L}"), "input"
        rel: str
        if site.kind == "z":
            rel, io = t.o_proj, "input"
        elif site.kind == "mlp_out":
            rel, io = t.post_mlp_norm or t.mlp, "output"
        elif site.kind == "mlp_in":
            rel, io = t.mlp, "input"
        elif site.kind == "attn_in":
            rel, io = (t.attn, "input") if t.attn_norm is None else (t.attn_norm, "output")
        elif site.kind == "qkv":
            if t.qkv_layout == "separate":
                raise InterventionError(f"{t.family} has separate q/k/v projections; use sites q, k, v")
            rel, io = t.qkv[0], "output"
        elif site.kind in ("q", "k", "v", "values"):
            kind = "v" if site.kind == "values" else site.kind
            rel = t.qkv[0] if t.qkv_layout != "separate" else t.qkv["qkv".index(kind)]
            io = "output"
        elif site.kind == "attn_last":
            rel, io = t.attn, "output"
        elif site.kind == "mlp_act":
            self.check_neuron_basis()
            rel, io = t.mlp_out_proj, "input"
        else:
            raise InterventionError(f"unknown site kind {site.kind}")
        return f"{t.blocks}.{L}.{rel}", io

    def path_of(self, site: Site) -> tuple[str, str]:
        """Dotted module path and ``"input"``/``"output"`` of ``site``, for nnsight (see :meth:`_resolve`);
        the read-only kinds other than the neuron basis are read by local hooks only."""
        if site.kind == "mlp_act" and self.table.mlp_out_proj:  # the MLP output projection's input
            return self._resolve(site)
        if site.kind in READ_ONLY_KINDS + ("mlp_act",):
            raise InterventionError(f"site kind {site.kind!r} is read by local hooks only; load the model with "
                                    "backend='local' to capture it.")
        return self._resolve(site)

    def module_of(self, site: Site) -> tuple[nn.Module, str]:
        """The module of ``site`` and whether its ``"input"`` or ``"output"`` is meant (see :meth:`_resolve`)."""
        path, io = self._resolve(site)
        return get_path(self.model, path), io

    def head_slice(self, head: int) -> slice:
        """Columns of head ``head`` in the ``z`` site."""
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def head_input_slice(self, layer: int, head: int, which: str) -> tuple[Site, slice]:
        """Site and columns that hold head ``head``'s ``which`` in {q, k, v} input.

        With grouped-query attention the k/v columns are those of the head's
        key/value group (shared with the other heads of the group).
        """
        dh, H = self.head_dim, self.n_heads
        layout = self.table.qkv_layout
        g = head if which == "q" else head // (H // self.n_kv_heads)
        if layout in ("gpt2", "fused"):
            # [q (H*dh) | k (KV*dh) | v (KV*dh)]; GPT-2 has KV = H
            off = {"q": 0, "k": H * dh, "v": (H + self.n_kv_heads) * dh}[which]
            return Site(layer, "qkv"), slice(off + g * dh, off + (g + 1) * dh)
        if layout == "neox":
            off = head * 3 * dh + "qkv".index(which) * dh
            return Site(layer, "qkv"), slice(off, off + dh)
        return Site(layer, which), slice(g * dh, (g + 1) * dh)

    @contextlib.contextmanager
    def hooks(
        self,
        edits: Mapping[Site, EditFn] | None = None,
        captures: Mapping[Site, Callable[[torch.Tensor], None]] | None = None,
    ) -> Iterator[dict[Site, int]]:
        """Edit and/or capture sites for the duration of the ``with`` block.

        ``edits[site](x) -> x'`` replaces the activation; ``captures[site](x)``
        receives it (after any edit). Yields a dict counting how often each
        site fired. Removes exactly the hooks it added, also on error.
        """
        edits = dict(edits or {})
        captures = dict(captures or {})
        if edits or captures:
            self._refuse_remote()
        fired: dict[Site, int] = {s: 0 for s in set(edits) | set(captures)}

        def make(site: Site, io: str):
            edit = edits.get(site)
            cap = captures.get(site)
            view = self.site_view(site)
            if view is not None:  # a read-only view of the module's output (see the end of this class)
                def post_view(mod, args, out):
                    fired[site] += 1
                    if cap is not None:
                        cap(view(out))
                return post_view

            def apply(x: torch.Tensor) -> torch.Tensor:
                fired[site] += 1
                if edit is not None:
                    x = edit(x)
                if cap is not None:
                    cap(x)
                return x

            if io == "input":
                def pre(mod, args, kwargs):
                    return _map_first_input(args, kwargs, apply)
                return pre
            def post(mod, args, out):
                if isinstance(out, tuple):
                    return (apply(out[0]), *out[1:])
                return apply(out)
            return post

        bad = [str(s) for s in edits if s.kind in READ_ONLY_KINDS]
        if bad:
            raise InterventionError(f"{', '.join(bad)} can be captured but not edited (read-only site kinds: "
                                    f"{', '.join(READ_ONLY_KINDS)}).")
        with temporary_hooks() as register:
            for site in sorted(fired, key=lambda s: s.order):
                mod, io = self.module_of(site)
                register(mod, make(site, io), pre=io == "input", **({"with_kwargs": True} if io == "input" else {}))
            yield fired

    # ------------------------------------------------------------------ fast path
    def prefix(
        self,
        ids: torch.Tensor,
        edits: Mapping[Site, EditFn] | None = None,
        capture: set[Site] | frozenset[Site] = frozenset(),
    ) -> Prefix:
        """Run the base model on ``ids`` (B, T) and keep every block's input and call.

        ``capture`` sites are kept whole (B, T, width) in ``Prefix.captures``.
        """
        self._refuse_remote()
        L = self.n_layers
        resid: list[torch.Tensor | None] = [None] * (L + 1)
        calls: list[Any] = [None] * L
        caps: dict[Site, torch.Tensor] = {}

        def block_pre(i: int):
            def pre(mod, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                resid[i] = h
                rest_args = args[1:] if args else ()
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                calls[i] = (rest_args, kw)
            return pre

        def norm_pre(mod, args):
            resid[L] = args[0]

        cap_fns = {s: (lambda x, s=s: caps.__setitem__(s, x)) for s in capture}
        o_out: dict[int, torch.Tensor] = {}
        direct: list[Any] = [None] * L

        def o_post(i: int):
            def post(mod, args, out):
                o_out[i] = out
            return post

        def attn_post(i: int):
            def post(mod, args, out):
                first = out[0] if isinstance(out, tuple) else out
                rest_none = not isinstance(out, tuple) or all(x is None for x in out[1:])
                if rest_none and i in o_out and torch.equal(o_out.pop(i), first):
                    direct[i] = len(out) if isinstance(out, tuple) else "tensor"
            return post

        with temporary_hooks() as register:
            for i, b in enumerate(self.blocks):
                register(b, block_pre(i), pre=True, with_kwargs=True)
                if not edits:
                    register(get_path(b, self.table.o_proj), o_post(i))
                    register(get_path(b, self.table.attn), attn_post(i))
            register(self.final_norm, norm_pre, pre=True)
            with self.hooks(edits, cap_fns) as fired, torch.no_grad():
                self.base(input_ids=ids.to(self.device), use_cache=False)
            _check_fired(fired, edits or {})
        return Prefix(resid=resid, calls=calls, captures=caps, attn_direct=direct)  # type: ignore[arg-type]

    def run_blocks(
        self,
        prefix: Prefix,
        start: int,
        copies: int,
        hidden: torch.Tensor | None = None,
        stop: int | None = None,
        last_position_mlp: bool = False,
        attn_z: torch.Tensor | None = None,
        last_query: bool = False,
        first_row: int = 0,
    ) -> torch.Tensor:
        """Run blocks ``start..stop-1`` on ``copies`` stacked copies of the prefix batch.

        ``hidden`` (copies*B, T, d) overrides the stacked block input. Returns
        the residual after the last block run: (copies*B, T, d). Hooks
        registered with :meth:`hooks` fire as in a full forward.

        ``last_position_mlp``: when the run ends at the final block, its MLP
        sees only the last position (its output broadcasts in the residual
        add), so only the last position of the result is exact. For callers
        that read nothing else and edit nothing in or after that MLP; saves
        about one MLP per copy.

        ``attn_z`` (copies*B, T, H*dh): block ``start``'s attention module is
        not run; its output is its output projection applied to ``attn_z``
        (hooks on the projection fire). Only where ``prefix.attn_direct[start]``
        says the module's output is exactly that (see :meth:`can_start_at_z`).

        ``last_query``: when the run ends at the final block, that block's attention works for the last
        query position only (queries, scores and softmax, ``z`` and the output projection; keys and values
        at every position; see :mod:`.last_query`), so again only the last position of the result is exact.
        Hooks on the output projection registered before the call (:meth:`hooks`) see every position.
        Where the block cannot take this route safely (:meth:`can_last_query`) it computes in full.

        ``first_row`` r > 0: only the rows ``r..T-1`` are run (``hidden``, ``attn_z`` and the result have
        T - r rows; hooks see those rows), each attention taking the prefix's keys and values of the rows
        ``< r`` (:mod:`.suffix`). Exact where every copy's rows ``< r`` are the prefix's; only after
        :meth:`suffix_ready` said yes for this prefix and ``start`` (outside any hook of the run).
        """
        self._refuse_remote()
        B = prefix.batch
        stop = self.n_layers if stop is None else stop
        r, T = first_row, prefix.resid[start].shape[1]
        h = prefix.resid[start][:, r:].repeat(copies, 1, 1) if hidden is None else hidden
        state: dict[str, int] = {}
        final = stop == self.n_layers and start < stop
        with temporary_hooks() as register, contextlib.ExitStack() as stack:
            if last_position_mlp and final:
                def last_only(mod, args, kwargs):
                    return _map_first_input(args, kwargs, lambda x: x[:, -1:])
                register(get_path(self.blocks[stop - 1], self.table.mlp), last_only, pre=True, with_kwargs=True,
                         prepend=True)
            if last_query and final and self.can_last_query(stop - 1, attn_z is not None and start == stop - 1):
                stack.enter_context(self._last_query(stop - 1, register))
            for i in range(start, stop):
                args, kw = prefix.calls[i]
                from_z = attn_z is not None and i == start
                skip = (_attention_from_z(get_path(self.blocks[i], self.table.attn),
                                          get_path(self.blocks[i], self.table.o_proj), attn_z, prefix.attn_direct[i])
                        if from_z else contextlib.nullcontext())
                with skip, contextlib.ExitStack() as rows:
                    if r:
                        args, kw = suffix_call(args, kw, r, T)  # type: ignore[misc]  # checked by suffix_ready
                        if not from_z:
                            k0, v0 = prefix.kv[i]
                            rows.enter_context(prefix_keys_function(get_path(self.blocks[i], self.table.attn),
                                                                    k0[:, :, :r], v0[:, :, :r], state))
                    out = self.blocks[i](h, *_tile(args, B, copies), **_tile(kw, B, copies))
                h = out[0] if isinstance(out, tuple) else out
        if state.get("odd"):
            raise SuffixRefused("a run of the later rows met an attention call of an unexpected layout; "
                                "run with Runner.suffix_rows = False.")
        return h

    def refuse_suffix(self) -> None:
        """Runs of the later rows (:meth:`suffix_ready`) are refused from now on for the current attention
        implementation (after :class:`SuffixRefused`)."""
        self._suffix_ok[getattr(self.config, "_attn_implementation", None)] = False

    def suffix_ready(self, prefix: Prefix, start: int, first_row: int) -> bool:
        """Whether :meth:`run_blocks` may run blocks ``start..`` on the rows ``first_row..`` of copies of
        ``prefix`` (see its ``first_row``); call outside any hook of a run. Yes when the model is local, in
        float32 or float64, without accelerate hooks, every block's call arguments can be cut
        (:func:`.suffix.suffix_call`), every attention function is eager or sdpa and records the keys and
        values of the prefix (kept in ``prefix.kv``), and, once per adapter, a run of the later rows of the
        prefix itself from block 0 gives its final residual (to 1e-4 of its largest value; else never again)."""
        T = prefix.resid[0].shape[1]
        impl = getattr(self.config, "_attn_implementation", None)
        ok = self._suffix_ok.get(impl)
        if not min_shared_rows(T) <= first_row < T or self.dtype not in (torch.float32, torch.float64) or ok is False:
            return False
        for i in range(0 if ok is None else start, self.n_layers):
            if suffix_call(*prefix.calls[i], first_row, T) is None or any(
                    hasattr(m, "_hf_hook") for m in self.blocks[i].modules()):
                return False
            if i not in prefix.kv and not self._record_kv(prefix, i):
                return False
        if ok is None:
            want = prefix.resid[self.n_layers][:, first_row:]
            try:
                with torch.no_grad():
                    got = self.run_blocks(prefix, 0, 1, first_row=first_row)
                err = float((got - want).abs().max())
            except SuffixRefused:
                err = float("inf")
            ok = self._suffix_ok[impl] = err <= 1e-4 * float(want.abs().max().clamp(min=1.0))
        return ok

    def _record_kv(self, prefix: Prefix, layer: int) -> bool:
        """Run block ``layer``'s attention on the prefix's input, up to its output projection, recording the
        keys and values its attention function receives in ``prefix.kv``; False where it cannot."""
        attn = get_path(self.blocks[layer], self.table.attn)
        got: dict[str, torch.Tensor] = {}

        def record(register: Callable[..., None], stack: contextlib.ExitStack) -> None:
            stack.enter_context(capture_keys(attn, got))

        with torch.no_grad():
            self._run_to_z(prefix, layer, 1, prefix.resid[layer], 0, plain=True, setup=record)
        if not (torch.is_tensor(got.get("key")) and torch.is_tensor(got.get("value"))
                and got["key"].dim() == 4 and got["key"].shape[0] == prefix.batch):
            return False
        prefix.kv[layer] = (got["key"], got["value"])
        return True

    def can_last_query(self, layer: int, from_z: bool = False) -> bool:
        """Whether block ``layer``'s attention may work for the last query only (see :meth:`run_blocks`): no
        accelerate hook in the block, no replaced forward on its attention, output or q/k/v projections, and
        an attention implementation whose call the package knows (eager or sdpa). ``from_z``: the block
        begins at its output projection's input (only that projection matters)."""
        from .last_query import attention_function

        block = self.blocks[layer]
        if any(hasattr(m, "_hf_hook") for m in block.modules()):
            return False
        t = self.table
        mods = [get_path(block, t.o_proj)] + ([] if from_z else [get_path(block, t.attn)]
                                               + [get_path(block, p) for p in t.qkv])
        if any("forward" in m.__dict__ for m in mods):
            return False
        return from_z or attention_function(get_path(block, t.attn)) is not None

    @contextlib.contextmanager
    def _last_query(self, layer: int, register: Callable[..., None]) -> Iterator[None]:
        """Within the block, block ``layer`` computes its attention for the last query only (checked by
        :meth:`can_last_query`; hooks through ``register``)."""
        from .last_query import fused_last_query, last_query_function, last_query_projection, slice_last

        block, t = self.blocks[layer], self.table
        slice_last(register, get_path(block, t.o_proj))
        with contextlib.ExitStack() as stack:
            if t.qkv_layout == "separate":
                last_query_projection(register, get_path(block, t.qkv[0]))
            else:
                cols = [c for h in range(self.n_heads)
                        for c in range(*self.head_input_slice(layer, h, "q")[1].indices(10 ** 9))]
                stack.enter_context(fused_last_query(get_path(block, t.qkv[0]), cols))
            stack.enter_context(last_query_function(get_path(block, t.attn)))
            yield

    def can_start_at_z(self, prefix: Prefix, layer: int) -> bool:
        """Whether :meth:`run_blocks` may begin block ``layer`` at its attention output projection's input:
        the prefix found the attention module's output to be exactly that projection's output, and nothing
        (accelerate offload, another wrapper) has replaced the module's forward."""
        if not prefix.attn_direct or prefix.attn_direct[layer] is None:
            return False
        attn = get_path(self.blocks[layer], self.table.attn)
        return "forward" not in attn.__dict__ and not hasattr(attn, "_hf_hook")

    # ------------------------------------------------------------------ module-level operations
    # Used by path and attribution patching: they apply a block's norm or a
    # q/k/v projection to a tensor of their own, so analysis code never names
    # modules. ``.forward`` is called directly, so hooks on these modules
    # (including the caller's own) do not fire and cannot recurse.
    def block_norm(self, layer: int, which: str, x: torch.Tensor) -> torch.Tensor:
        """Block ``layer``'s attention (``which="attn"``) or MLP (``"mlp"``) input norm applied to ``x``."""
        if which not in ("attn", "mlp"):
            raise InterventionError(f"which must be 'attn' or 'mlp'; got {which!r}")
        path = self.table.attn_norm if which == "attn" else self.table.mlp_norm
        if path is None:  # no pre-norm (OLMo-2): the sublayer reads the residual itself
            return x
        mod = get_path(self.blocks[layer], path)
        with _onloaded(mod):
            return mod.forward(x)

    def project_columns(self, site: Site, x: torch.Tensor, cols: slice | torch.Tensor) -> torch.Tensor:
        """``project(site, x)[..., cols]``, computing only those columns where the module is a plain linear
        layer (``nn.Linear``, GPT-2's ``Conv1D``) with its own forward."""
        mod, _ = self.module_of(site)
        conv = type(mod).__name__ == "Conv1D"
        if (type(mod) is nn.Linear or conv) and "forward" not in mod.__dict__ and not hasattr(mod, "_hf_hook"):
            w = mod.weight.T if conv else mod.weight  # (out, in)
            return nn.functional.linear(x, w[cols], None if mod.bias is None else mod.bias[cols])
        return self.project(site, x)[..., cols]

    def module_width(self, site: Site) -> int:
        """The output width of the projection module of ``site`` (q, k, v or qkv)."""
        mod, _ = self.module_of(site)
        if type(mod).__name__ == "Conv1D":
            return int(mod.weight.shape[1])
        if isinstance(getattr(mod, "out_features", None), int):
            return int(mod.out_features)
        return int(self.project(site, torch.zeros(1, self.d_model, dtype=self.dtype, device=self.device)).shape[-1])

    def project(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        """Output of the projection of ``site`` (kind q, k, v or qkv) for a normed input ``x`` (..., d_model)."""
        if site.kind not in ("q", "k", "v", "qkv"):
            raise InterventionError(f"project() takes a q, k, v or qkv site; got {site}")
        mod, _ = self.module_of(site)
        with _onloaded(mod):
            return mod.forward(x)

    @contextlib.contextmanager
    def norm_hooks(
        self, fns: Mapping[tuple[int, str], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    ) -> Iterator[dict[tuple[int, str], int]]:
        """Edit the output of block norms: ``fns[(layer, which)](norm_input, norm_output) -> new output``.

        ``which`` is ``"attn"`` or ``"mlp"`` (the block's pre-attention /
        pre-MLP norm). Yields a dict counting how often each hook fired;
        removes exactly the hooks it added, also on error.
        """
        self._refuse_remote()
        fired = {key: 0 for key in fns}

        def make(key):
            fn = fns[key]

            def post(mod, args, kwargs, out):
                fired[key] += 1
                inp = args[0] if args else next(iter(kwargs.values()))
                if isinstance(out, tuple):
                    return (fn(inp, out[0]), *out[1:])
                return fn(inp, out)
            return post

        with temporary_hooks() as register:
            for key in sorted(fns):
                layer, which = key
                if which not in ("attn", "mlp"):
                    raise InterventionError(f"norm hook kind must be 'attn' or 'mlp'; got {which!r}")
                path = self.table.attn_norm if which == "attn" else self.table.mlp_norm
                if path is None:  # no pre-norm (OLMo-2): edit the sublayer's input, the "norm" is the identity
                    sub = get_path(self.blocks[layer], self.table.attn if which == "attn" else self.table.mlp)
                    register(sub, _identity_norm_hook(make(key)), pre=True, with_kwargs=True)
                    continue
                register(get_path(self.blocks[layer], path), make(key), with_kwargs=True)
            yield fired

    def final_sigma(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm's scale sigma(x) of residual vectors ``x`` (..., d) -> (...), float64:
        ``sqrt(var(x) + eps)`` for LayerNorm, ``sqrt(mean(x^2) + eps)`` for RMSNorm.

        The package's one final-norm scale function (the readout and the
        training script should call this rather than restate it)."""
        _, _, eps = self.norm_params()
        return norm_scale(x, eps, centre=self.table.norm_kind == "layernorm")

    def logits_frozen(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Logits of ``x + delta`` with the final norm's scale held at that of ``x``.

        ``N(x) + gamma * P(delta) / sigma(x)``, then the unembedding: the
        final norm is linear in ``delta`` once its scale is frozen.
        """
        gamma, _, _ = self.norm_params()
        d = delta.to(torch.float64)
        if self.table.norm_kind == "layernorm":
            d = d - d.mean(-1, keepdim=True)
        extra = gamma.to(torch.float64) * d / self.final_sigma(x)[..., None]
        return self.apply_softcap(self.unembed(self.final_norm(x) + extra.to(x.dtype)))

    def post_norm(self, layer: int, which: str = "attn") -> nn.Module | None:
        """The norm block ``layer`` applies to its attention (``"attn"``) or MLP (``"mlp"``) output before
        the residual add, or None when the family has none."""
        path = self.table.post_attn_norm if which == "attn" else self.table.post_mlp_norm
        return None if path is None else get_path(self.blocks[layer], path)

    @property
    def has_post_attn_norm(self) -> bool:
        """Whether blocks normalise the attention output before adding it (sandwich / post norms)."""
        return self.table.post_attn_norm is not None

    def post_norm_params(self, layer: int, which: str = "attn") -> tuple[torch.Tensor, float] | None:
        """(gamma (d,), eps) of block ``layer``'s post-attention / post-MLP norm (RMS norms: no shift), or None.

        gamma includes Gemma's ``1 + w``. A post norm that centres or shifts is refused.
        """
        n = self.post_norm(layer, which)
        if n is None:
            return None
        if self.table.norm_kind != "rmsnorm" or getattr(n, "bias", None) is not None:
            raise ArchitectureError(f"{self.table.family}: post-sublayer norms must be RMS norms without a shift "
                                    f"(layer {layer} has {type(n).__name__}); describe the family with "
                                    "norm_kind='rmsnorm' or without post norms.")
        return _param(n, "weight") + self.table.gamma_offset, _eps_of(n)

    @property
    def softcap(self) -> float | None:
        """The final logit soft-cap c (logits = c * tanh(raw / c)), or None when the model does not cap."""
        attr = self.table.softcap_attr
        c = getattr(self.config, attr, None) if attr else None
        return float(c) if c else None

    def apply_softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """``c * tanh(logits / c)`` as the model's head computes it (identity without a cap)."""
        c = self.softcap
        return logits if c is None else torch.tanh(logits / c) * c

    def head_writes(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """What each head of ``layer`` adds to the residual stream: z (..., H*dh) -> (..., H, d).

        ``W_O^h z_h``, and with a post-attention norm ``gamma_post * W_O^h z_h / sigma_post`` with
        sigma_post the RMS of the whole attention output of this ``z`` (its own scale). The output
        projection's bias (when there is one) is not included. Model dtype.
        """
        W = self.W_O(layer)
        zh = z.reshape(*z.shape[:-1], self.n_heads, self.head_dim)
        out = torch.einsum("...hk,hkd->...hd", zh, W)
        pn = self.post_norm_params(layer, "attn")
        if pn is None:
            return out
        gamma, eps = pn
        a = out.sum(-2)
        b = self.b_O(layer)
        if b is not None:
            a = a + b
        sigma = torch.sqrt(a.to(torch.float32).pow(2).mean(-1) + eps)
        return (out.to(torch.float32) * gamma.to(torch.float32) / sigma[..., None, None]).to(out.dtype)


    def foreign_hooks(self) -> list[str]:
        """Hooks present on the modules the package reads through, as ``"path (forward hook fn)"`` strings.

        Modules: the model, its base, every block, its attention module, output projection, MLP and post
        norms, the final norm and the unembedding; forward (pre-)hooks and backward hooks. Called before
        any analysis registers its own hooks, so every one found belongs to someone else; hook functions
        marked read-only (``hydra_probe.checks.read_only``) are skipped. Read-only.
        """
        t = self.table
        mods: list[Any] = [self.model, self.base, *self.blocks, self.final_norm, self.unembed]
        for i, b in enumerate(self.blocks):
            for rel in (t.attn, t.o_proj, t.mlp):
                with contextlib.suppress(AttributeError, IndexError):
                    mods.append(get_path(b, rel))
            for which in ("attn", "mlp"):
                with contextlib.suppress(AttributeError, IndexError):
                    mods.append(self.post_norm(i, which))
        names = {id(m): n or "<model>" for n, m in self.model.named_modules()}
        out: list[str] = []
        seen: set[int] = set()
        for m in mods:
            if m is None or id(m) in seen:
                continue
            seen.add(id(m))
            for attr, kind in (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
                               ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook")):
                for fn in getattr(m, attr, {}).values():
                    if getattr(fn, "__hydra_probe_read_only__", False):  # marked by hydra_probe.checks.read_only
                        continue
                    fname = getattr(fn, "__qualname__", None) or type(fn).__name__
                    out.append(f"{names.get(id(m), type(m).__name__)} ({kind} {fname})")
        return out

    # ------------------------------------------------------------------ mechanisms of self-repair
    # (owned by the mechanisms analyses: attention weights, value vectors and neuron activations;
    # the read-only site kinds of :mod:`.sites` resolve in :meth:`_resolve` like every other kind.)
    def mechanism_module_of(self, site: Site) -> tuple[nn.Module, str]:
        """Module and ``"input"``/``"output"`` of the ``values``, ``attn_last`` and ``mlp_act`` sites
        (the one resolver, :meth:`module_of`)."""
        if site.kind not in ("values", "attn_last", "mlp_act"):
            raise InterventionError(f"unknown site kind {site.kind}")
        return self.module_of(site)

    def check_neuron_basis(self) -> None:
        """Raise :class:`ArchitectureError` when the MLP has no linear neuron basis: the table names no MLP
        output projection, or the MLP writes through a post norm (its write is not linear in the neurons)."""
        if getattr(self.table, "post_mlp_norm", None):
            raise ArchitectureError(
                f"{self.table.family} MLPs write through a post-MLP norm ({self.table.post_mlp_norm}), so an MLP's "
                "write is not a sum over its neurons and neuron_contributions cannot split it exactly; the MLP "
                "stays one unit (its 'mlp' row in repair_mechanisms)."
            )
        if not self.table.mlp_out_proj:
            raise ArchitectureError(
                f"the {self.table.family} table names no MLP output projection (ArchTable.mlp_out_proj), so its "
                "MLPs have no neuron basis here; add the path of the down projection to the table "
                "(dataclasses.replace(table, mlp_out_proj=...) and register_table) to split MLPs over neurons."
            )

    def site_view(self, site: Site) -> Callable[[Any], torch.Tensor] | None:
        """For read-only kinds, a function of the module's raw output giving the site (B, T, width); else None."""
        if site.kind == "attn_last":
            def weights(out: Any) -> torch.Tensor:
                w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
                if w is None:
                    raise InterventionError(
                        f"the attention module of layer {site.layer} returned no attention weights; read "
                        "attn_last sites inside Adapter.eager_attention() (the eager implementation returns them)."
                    )
                return w[:, :, -1, :].transpose(1, 2)  # (B, H, Tq, Tk) -> (B, Tk, H) for the last query
            return weights
        if site.kind == "values" and self.table.qkv_layout != "separate":
            H, KV, dh, layout = self.n_heads, self.n_kv_heads, self.head_dim, self.table.qkv_layout

            def values(out: Any) -> torch.Tensor:
                x = out[0] if isinstance(out, tuple) else out
                if layout in ("gpt2", "fused"):  # [q (H*dh) | k (KV*dh) | v (KV*dh)]
                    return x[..., (H + KV) * dh: (H + 2 * KV) * dh]
                B, T = x.shape[:2]    # neox: per head [q | k | v]
                return x.view(B, T, H, 3 * dh)[..., 2 * dh:].reshape(B, T, H * dh)
            return values
        return None

    def site_width(self, site: Site) -> int:
        """Width of a read-only or neuron site: ``values`` n_kv_heads * head_dim, ``attn_last`` n_heads,
        ``mlp_act`` d_mlp."""
        if site.kind == "values":
            return self.n_kv_heads * self.head_dim
        if site.kind == "attn_last":
            return self.n_heads
        if site.kind == "mlp_act":
            return self.W_out(site.layer).shape[0]
        raise InterventionError(f"site_width covers values, attn_last and mlp_act; got {site}")

    def kv_group(self) -> torch.Tensor:
        """For each query head, the index of the key/value group whose values it mixes: (n_heads,)."""
        return torch.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)

    def W_out(self, layer: int) -> torch.Tensor:
        """The MLP output projection of ``layer`` as (d_mlp, d_model) rows ``W_out[n]`` (neuron n's write)."""
        self.check_neuron_basis()
        w = _param(get_path(self.blocks[layer], self.table.mlp_out_proj), "weight")
        return w if self.table.o_proj_kind == "conv1d" else w.T

    @contextlib.contextmanager
    def eager_attention(self) -> Iterator[None]:
        """Run attention with the eager implementation (which returns attention weights) inside the block.

        Switches ``config._attn_implementation`` (and sub-configs) and restores the
        previous implementation on exit, also on error. Numbers equal the other
        implementations' to floating-point error.
        """
        old = getattr(self.config, "_attn_implementation", None)
        if old == "eager" or not hasattr(self.model, "set_attn_implementation"):
            yield
            return
        try:
            self.model.set_attn_implementation("eager")
            if getattr(self.config, "_attn_implementation", None) != "eager":
                raise ArchitectureError(
                    f"{type(self.model).__name__} cannot switch to the eager attention implementation, which "
                    "returns attention weights; load it with attn_implementation='eager' "
                    "(from_pretrained(..., attn_implementation='eager')) to read attention patterns."
                )
            yield
        finally:
            self.model.set_attn_implementation(old)

    # ------------------------------------------------------------------ AtP*'s QK fix (attention only)
    def attention_z(self, prefix: Prefix, layer: int, copies: int, hidden: torch.Tensor,
                    shared_values: bool = False, first_row: int = 0) -> torch.Tensor:
        """Block ``layer``'s heads' output ``z`` (copies*B, T, H*dh), its attention output projection's input,
        for the block input ``hidden`` (copies*B, T, d) with the prefix's call arguments (masks, positions).

        The block stops there: its output projection, post norms, MLP and residual adds are not run (a
        forward pre-hook on the output projection raises a private signal the call catches). Hooks
        registered with :meth:`hooks` on sites before ``z`` (q/k/v projections, norms) fire as in a full
        forward. Where accelerate dispatches modules of the block (its hooks must see the forward end),
        the block runs to its end instead; the numbers are the same.

        ``shared_values``: every copy's values (v) are the last copy's (queries and keys stay each copy's
        own). The value projection then runs on the last copy only where it is a separate module or a
        plain linear layer (``nn.Linear``, GPT-2's ``Conv1D``); otherwise every copy's is computed and the
        last copy's copied over it.

        ``first_row``: where the attention is causal (:func:`.last_query.query_rows_function`; computed for
        the query rows ``first_row..T-1`` only where its mask is a tensor) the result is those rows,
        (copies*B, T - first_row, H*dh); elsewhere every row, (copies*B, T, H*dh). The caller reads which
        from the shape. For callers whose copies' block inputs agree before ``first_row`` (those rows'
        queries and keys, hence their ``z``, are then every copy's alike).
        """
        self._refuse_remote()
        plain = not any(hasattr(m, "_hf_hook") for m in self.blocks[layer].modules())

        def values(register: Callable[..., None], stack: contextlib.ExitStack) -> None:
            if shared_values:
                stack.enter_context(self._last_copy_values(layer, prefix.batch, register, plain))

        z = self._run_to_z(prefix, layer, copies, hidden, first_row, plain, values)
        return self.attention_z(prefix, layer, copies, hidden, shared_values) if z is None else z

    def attention_patterns(self, prefix: Prefix, layer: int, copies: int, hidden: torch.Tensor,
                           first_row: int = 0, memo: dict[Any, Any] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor] | bool:
        """:meth:`attention_z` with ``shared_values`` as attention patterns (the QK fix's pattern route):
        ``(pattern, values)`` as :meth:`attention_patterns_given` returns them, checked once per ``memo`` (a dict
        the caller keeps for calls of this layer and prefix), or True where the route does not apply (the
        caller takes :meth:`attention_z`)."""
        self._refuse_remote()
        memo = {} if memo is None else memo
        if (Site(layer, "z") not in prefix.captures or memo.get("patterns") is False
                or any(hasattr(m, "_hf_hook") for m in self.blocks[layer].modules())):
            return True

        def values(register: Callable[..., None], stack: contextlib.ExitStack) -> None:
            stack.enter_context(self._last_copy_values(layer, prefix.batch, register, True))

        got = self._run_to_z(prefix, layer, copies, hidden, first_row, True, values, sink={})
        if got is True:
            return True
        if "patterns" not in memo:
            memo["patterns"] = self._patterns_match(prefix, layer, *got)
            if not memo["patterns"]:
                return True
        return got

    def _run_to_z(self, prefix: Prefix, layer: int, copies: int, hidden: torch.Tensor, first_row: int,
                  plain: bool, setup: Callable[[Callable[..., None], contextlib.ExitStack], None] | None = None,
                  suffix: bool = False, sink: dict[str, torch.Tensor] | None = None) -> Any:
        """Run block ``layer`` on ``hidden`` (copies*B, T, d) with the prefix's call arguments and the QK fix's
        attention (:meth:`_qk_attention`) up to its output projection's input (``plain``: stop there; else the
        block runs to its end, for accelerate's hooks); ``setup(register, stack)`` adds hooks or contexts.
        Returns ``z`` (its rows ``first_row..`` where the attention was causal and cut, see
        :meth:`attention_z`), or None where some calls were cut and some not causal (the caller runs every
        row). ``suffix``: ``hidden`` holds the rows ``first_row..`` only and the attention takes the prefix's keys
        and values of the earlier rows (:meth:`suffix_ready` said yes; :mod:`.suffix`): z is (copies*B,
        T - first_row, H*dh); :class:`SuffixRefused` where an attention call has an unexpected layout.
        ``sink`` (a dict; ``plain`` only): the attention function stores the pattern and the last copy's values
        instead (:func:`.patterns.pattern_function`) and they are returned, ``(pattern, values)``, or True where
        it did not (the output route applies; the other copies' values may not be formed)."""
        from .patterns import StopAtPattern, pattern_function

        o_proj = get_path(self.blocks[layer], self.table.o_proj)
        got: dict[str, torch.Tensor] = {}
        state: dict[str, int] = {}
        B = prefix.batch
        if suffix:
            args, kw = suffix_call(*prefix.calls[layer], first_row, prefix.resid[0].shape[1])  # type: ignore[misc]
            attention = self._suffix_attention(prefix, layer, first_row, state, last_values=sink is not None)
        else:
            args, kw = prefix.calls[layer]
            attention = self._qk_attention(layer, first_row, state)
        with temporary_hooks() as register, contextlib.ExitStack() as stack:
            register(o_proj, _stop_at(got, plain), pre=True, with_kwargs=True)
            if setup is not None:
                setup(register, stack)
            if sink is not None:  # entered first: the innermost attention function, after the prefix's keys
                stack.enter_context(pattern_function(get_path(self.blocks[layer], self.table.attn), B, sink))
            stack.enter_context(attention)
            try:
                self.blocks[layer](hidden, *_tile(args, B, copies), **_tile(kw, B, copies))
            except (_StopAtZ, StopAtPattern):
                pass
        if sink is not None:
            if "pattern" not in sink or state.get("odd"):
                return True
            A = sink["pattern"]
            if not suffix and first_row > 0 and state.get("causal") and not state.get("full") and A.shape[2] == hidden.shape[1]:
                A = A[:, :, first_row:]  # causal, not cut: the earlier rows are every copy's alike (as z's)
            return A, sink["values"]
        if suffix:
            if state.get("odd") or "z" not in got:
                raise SuffixRefused(f"block {layer}'s attention on the later rows met an unexpected layout.")
            return got["z"]
        if "z" not in got:
            raise ArchitectureError(f"block {layer} never called its attention output projection "
                                    f"({self.table.o_proj}); check the architecture table's o_proj path.")
        if state.get("rows") and state.get("full"):  # some calls cut, some not causal: every row, from the start
            return None
        return got["z"][:, first_row:] if first_row > 0 and not state.get("full") and state else got["z"]

    @contextlib.contextmanager
    def _suffix_attention(self, prefix: Prefix, layer: int, first: int, state: dict[str, int],
                          last_values: bool = False) -> Iterator[None]:
        """Within the block, block ``layer``'s attention (in the QK fix, on the rows ``first..``) takes the prefix's
        keys and values of the rows before ``first`` (:func:`.suffix.prefix_keys_function`, counting in
        ``state``; ``last_values``: the values of the last copy only), with the rotary embedding of
        :meth:`_qk_attention`."""
        from .rotary import fast_rotary

        attn = get_path(self.blocks[layer], self.table.attn)
        k0, v0 = prefix.kv[layer]
        with contextlib.ExitStack() as stack:
            if self.fast_rotary:
                stack.enter_context(fast_rotary(attn))
            stack.enter_context(prefix_keys_function(attn, k0[:, :, :first], v0[:, :, :first], state,
                                                     last_values=prefix.batch if last_values else 0))
            yield

    @contextlib.contextmanager
    def _qk_attention(self, layer: int, first: int, state: dict[str, int]) -> Iterator[None]:
        """Within the block, block ``layer``'s attention (in the QK fix) computes its rotary embedding without
        a concatenation where it is Llama's (:func:`.rotary.fast_rotary`, the same numbers; unless
        ``Adapter.fast_rotary`` is False), and its attention function is checked to be causal and computes
        the query rows ``first..`` only where it can (:func:`.last_query.query_rows_function`, which counts
        the calls in ``state``; ``first`` 0: every row, unchecked)."""
        from .last_query import query_rows_function
        from .rotary import fast_rotary

        attn = get_path(self.blocks[layer], self.table.attn)
        with contextlib.ExitStack() as stack:
            if self.fast_rotary:
                stack.enter_context(fast_rotary(attn))
            if first > 0:
                stack.enter_context(query_rows_function(attn, first, state))
            yield

    @contextlib.contextmanager
    def _last_copy_values(self, layer: int, B: int, register: Callable[..., None], plain: bool) -> Iterator[None]:
        """Within the block, layer ``layer``'s value projection gives every copy (B rows each) the last copy's
        values (see :meth:`attention_z`)."""
        t = self.table
        mod = get_path(self.blocks[layer], t.qkv[2] if t.qkv_layout == "separate" else t.qkv[0])
        conv = type(mod).__name__ == "Conv1D"  # GPT-2's: weight (in, out)
        v_cols = self.value_columns(layer)
        vs = _as_index(v_cols)
        orig = mod.forward
        forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        if not plain or "forward" in mod.__dict__:
            pass
        elif t.qkv_layout == "separate":
            def forward(x: torch.Tensor) -> torch.Tensor:
                out = orig(x[-B:])
                return out.repeat(x.shape[0] // B, *([1] * (out.dim() - 1)))
        elif type(mod) is nn.Linear or conv:
            w = mod.weight.T if conv else mod.weight  # (out, in)
            b = mod.bias
            width = w.shape[0]
            qk = _as_index(sorted(set(range(width)) - set(v_cols)))

            def forward(x: torch.Tensor) -> torch.Tensor:
                out = x.new_empty(*x.shape[:-1], width)
                out[..., qk] = torch.nn.functional.linear(x, w[qk], None if b is None else b[qk])
                out.unflatten(0, (-1, B))[..., vs] = torch.nn.functional.linear(x[-B:], w[vs],
                                                                                None if b is None else b[vs])
                return out
        if forward is None:  # compute every copy's values and copy the last copy's over them
            def copy_values(m: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
                out = out.clone()
                out[:-B].unflatten(0, (-1, B))[..., vs] = out[-B:, ..., vs]
                return out
            register(mod, copy_values)
            yield
            return
        mod.forward = forward
        try:
            yield
        finally:
            del mod.forward

    def value_columns(self, layer: int) -> list[int]:
        """The columns of layer ``layer``'s value projection site (``v``, or the fused ``qkv``) that hold values,
        sorted."""
        return sorted({c for h in range(self.n_heads)
                       for c in range(*self.head_input_slice(layer, h, "v")[1].indices(10 ** 9))})

    def qk_sites(self, layer: int) -> list[tuple[Site, torch.Tensor | slice]]:
        """Layer ``layer``'s query/key projection sites with the columns of each that hold queries or keys:
        ``[(Site(layer, "q"), all), (Site(layer, "k"), all)]`` for separate projections, one ``qkv`` site
        with its q and k columns for a fused one."""
        cols: dict[Site, set[int]] = {}
        for h in range(self.n_heads):
            for w in ("q", "k"):
                site, sl = self.head_input_slice(layer, h, w)
                cols.setdefault(site, set()).update(range(sl.start, sl.stop))
        if self.table.qkv_layout == "separate":
            return [(s, slice(None)) for s in sorted(cols, key=lambda s: s.kind == "k")]
        return [(s, _as_index(sorted(c))) for s, c in cols.items()]

    def can_compose_qk(self, layer: int) -> bool:
        """Whether :meth:`attention_z_given` may run layer ``layer``: the block runs its own modules (no
        accelerate dispatch) and nobody replaced the forward of its attention norm or of a module of its
        attention (a wrapper or an adapter layer must see its input)."""
        block = self.blocks[layer]
        if any(hasattr(m, "_hf_hook") for m in block.modules()):
            return False
        parts = [get_path(block, self.table.attn)] + ([get_path(block, self.table.attn_norm)]
                                                      if self.table.attn_norm is not None else [])
        return not any("forward" in m.__dict__ for p in parts for m in p.modules())

    def attn_input_affine(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None, float, bool] | None:
        """Block ``layer``'s attention input norm as ``(gamma (d,), beta (d,) or None, eps, centre)``:
        ``norm(x) = gamma * P(x) / sigma(x) + beta`` with ``P`` the centring (``centre``, LayerNorm) or the
        identity (RMSNorm) and ``sigma`` :func:`norm_scale`; gamma includes Gemma's 1 + w. None where the
        attention reads the residual itself (OLMo-2). What the family's table says; :meth:`attention_z`
        checks it on the real input before relying on it."""
        path = self.table.attn_norm
        if path is None:
            return None
        n = get_path(self.blocks[layer], path)
        w = _param(n, "weight")
        gamma = (torch.ones(self.d_model, dtype=self.dtype, device=self.device) if w is None else w) + self.table.gamma_offset
        return gamma, _param(n, "bias"), _eps_of(n), self.table.norm_kind == "layernorm"

    def attention_z_given(self, prefix: Prefix, layer: int, copies: int, normed: torch.Tensor,
                          given: Mapping[Site, torch.Tensor], memo: dict[Any, Any] | None = None,
                          first_row: int = 0, suffix: bool = False) -> torch.Tensor | None:
        """:meth:`attention_z` with every copy's query/key projections given and the values of one input.

        ``given``: ``{site: (copies*B, T, width)}`` for each of :meth:`qk_sites`, which the q/k projection
        modules return instead of computing (a fused module's value columns are then filled in);
        ``normed`` (B, T, d): the attention's input (its norm's output) of the last copy, from which every
        copy's values are projected. The block's input and its attention norm carry no data (a broadcast
        zero stands in for the stacked block input), so only the attention itself runs on every copy. The
        last copy's given q/k are checked against the modules' own output on ``normed``; where they differ
        nothing more is run and None is returned. Only where :meth:`can_compose_qk`. ``memo``: a dict
        kept by the caller for calls with the same layer and ``normed``, so that the unchanged copy's
        projections are computed and checked once. ``first_row``: as in :meth:`attention_z` (the result
        is then the rows ``first_row..T-1`` where the attention is causal; the caller reads it from the
        shape). ``suffix``: ``given`` holds the rows ``first_row..`` only, and so does the result; the
        attention takes the prefix's keys and values of the earlier rows (only after :meth:`suffix_ready`;
        the copies' block inputs must agree with the prefix's before ``first_row``).
        """
        memo = {} if memo is None else memo
        z = self._given_run(prefix, layer, copies, normed, given, memo, first_row, suffix, None)
        if z is False:
            return None
        return self.attention_z_given(prefix, layer, copies, normed, given, memo) if z is None else z

    def attention_patterns_given(self, prefix: Prefix, layer: int, copies: int, normed: torch.Tensor,
                                 given: Mapping[Site, torch.Tensor], memo: dict[Any, Any] | None = None,
                                 first_row: int = 0, suffix: bool = False
                                 ) -> tuple[torch.Tensor, torch.Tensor] | bool:
        """:meth:`attention_z_given`'s attention patterns instead of its output (the QK fix's pattern route,
        :mod:`.patterns`): ``(pattern (copies*B, H, Tq, Tk), values (B, H_kv, Tk, dh))``, each copy's softmax
        pattern over its query rows (the last Tq of the sequence: ``first_row..`` where the attention is
        causal and cut or ``suffix``, else every row) and every key, and the last copy's values (every
        copy's, as in :meth:`attention_z_given`). ``z = pattern @ values`` per head (query head h reads key
        head h // (H / H_kv)) is what :meth:`attention_z_given` would return; that is checked once per
        ``memo`` on the last copy against the prefix's captured ``z``. False where the given q/k are not the
        modules' own (as :meth:`attention_z_given`'s None); True where the pattern route does not apply (an
        attention call :func:`.patterns.pattern_function` does not know, no captured ``z``, or a check that
        failed): the caller takes :meth:`attention_z_given`. Only where :meth:`can_compose_qk`."""
        memo = {} if memo is None else memo
        if Site(layer, "z") not in prefix.captures or memo.get("patterns") is False:
            return True
        got = self._given_run(prefix, layer, copies, normed, given, memo, first_row, suffix, {})
        if got is False or got is True:
            return got
        if "patterns" not in memo:
            memo["patterns"] = self._patterns_match(prefix, layer, *got)  # type: ignore[misc]
            if not memo["patterns"]:
                return True
        return got  # type: ignore[return-value]

    def _patterns_match(self, prefix: Prefix, layer: int, pattern: torch.Tensor, values: torch.Tensor) -> bool:
        """Whether the last copy's ``pattern @ values`` is the prefix's ``z`` at the pattern's query rows."""
        B, Hk, Tk, dh = values.shape
        H, Tq = pattern.shape[1], pattern.shape[2]
        A = pattern[-B:].reshape(B, Hk, (H // Hk) * Tq, Tk).to(values.dtype)
        mine = torch.matmul(A, values).view(B, H, Tq, dh).transpose(1, 2).reshape(B, Tq, H * dh)
        ref = prefix.captures[Site(layer, "z")]
        if ref.shape[-1] != H * dh or ref.shape[1] < Tq:
            return False
        ref = ref[:, ref.shape[1] - Tq:].to(mine.dtype)
        tol = max(1e-3, 8 * torch.finfo(self.dtype).eps)
        return bool(torch.allclose(mine, ref, rtol=tol, atol=tol * float(ref.abs().max()) + 1e-6))

    def _given_run(self, prefix: Prefix, layer: int, copies: int, normed: torch.Tensor,
                   given: Mapping[Site, torch.Tensor], memo: dict[Any, Any], first_row: int, suffix: bool,
                   sink: dict[str, torch.Tensor] | None) -> Any:
        """The body of :meth:`attention_z_given` (``sink`` None: z, None for "rerun every row", False for
        "given q/k differ") and :meth:`attention_patterns_given` (``sink`` a dict: (pattern, values), False, or
        True for "no pattern route"; only the last copy's values are then formed)."""
        self._refuse_remote()
        t = self.table
        block = self.blocks[layer]
        B, T, d = normed.shape
        r = first_row if suffix else 0
        saved: list[tuple[nn.Module, Any]] = []
        last_only = sink is not None  # the pattern route reads the last copy's values only

        def swap(mod: nn.Module, fn: Callable[..., Any]) -> None:
            saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = fn

        for site, qk in self.qk_sites(layer):
            mod, _ = self.module_of(site)
            if site not in memo:
                memo[site] = own = mod.forward(normed)
                mine = given[site][-B:, ..., qk]
                ref = own[:, r:, qk].to(mine.dtype)
                tol = max(1e-3, 8 * torch.finfo(self.dtype).eps)  # a wrong norm is off by O(1), rounding is not
                if not torch.allclose(mine, ref, rtol=tol, atol=tol * float(ref.abs().max()) + 1e-6):
                    return False
            own = memo[site][:, r:]
            out = given[site]
            if t.qkv_layout != "separate":  # the fused module's value columns: the last copy's, for every copy
                v = _as_index(self.value_columns(layer))
                (out[-B:] if last_only else out).unflatten(0, (-1, B))[..., v] = own[..., v].to(out.dtype)
            swap(mod, lambda x, out=out: out)
        if t.qkv_layout == "separate":
            vmod, _ = self.module_of(Site(layer, "v"))
            if "v" not in memo:
                memo["v"] = vmod.forward(normed)
            vals = memo["v"][:, r:]
            if last_only:  # the other copies' rows are never read
                swap(vmod, lambda x, vals=vals: _last_rows(vals, copies))
            else:
                swap(vmod, lambda x, vals=vals: vals.repeat(copies, *([1] * (vals.dim() - 1))))
        if t.attn_norm is not None:
            swap(get_path(block, t.attn_norm), lambda x, *a, **k: x)
        hidden = normed.new_zeros(()).expand(copies * B, T - r, d)
        try:
            return self._run_to_z(prefix, layer, copies, hidden, first_row, plain=True,  # can_compose_qk: no accelerate
                                  suffix=suffix, sink=sink)
        finally:
            for mod, old in reversed(saved):
                if old is None:
                    del mod.forward
                else:
                    mod.forward = old


def _last_rows(vals: torch.Tensor, copies: int) -> torch.Tensor:
    """(copies*B, ...) with ``vals`` (B, ...) as its last B rows and the others left unwritten (never read)."""
    out = vals.new_empty((copies * vals.shape[0], *vals.shape[1:]))
    out[-vals.shape[0]:] = vals
    return out


class SuffixRefused(ArchitectureError):
    """A run of the later rows (``Adapter.run_blocks(first_row=)``) met an attention call it cannot extend
    with the earlier rows' keys; the caller runs every row instead."""


def _stop_at(got: dict[str, torch.Tensor], plain: bool) -> Callable[..., None]:
    """A forward pre-hook keeping the output projection's input in ``got["z"]`` (and, ``plain``, stopping the
    block there: :class:`_StopAtZ`)."""
    def at_z(mod, args, kwargs):
        got["z"] = args[0] if args else next(iter(kwargs.values()))
        if plain:
            raise _StopAtZ
    return at_z


class _StopAtZ(BaseException):
    """Raised by :meth:`Adapter.attention_z`'s hook on the output projection and caught by it: the rest of the
    block is not run. A BaseException, so that no ``except Exception`` inside a model swallows it."""


def norm_scale(x: torch.Tensor, eps: float, centre: bool) -> torch.Tensor:
    """A norm's scale of vectors ``x`` (..., d) -> (...), float64: ``sqrt(var(x) + eps)`` when the norm centres
    (LayerNorm), ``sqrt(mean(x^2) + eps)`` otherwise (RMSNorm). The one formula the package uses for it."""
    x = x.to(torch.float64)
    if centre:
        return torch.sqrt(x.var(-1, unbiased=False) + eps)
    return torch.sqrt(x.pow(2).mean(-1) + eps)


def _eps_of(n: nn.Module) -> float:
    eps = next((float(getattr(n, a)) for a in ("eps", "variance_epsilon", "epsilon") if hasattr(n, a)), None)
    if eps is None:
        raise ArchitectureError(f"cannot read eps of norm {type(n).__name__}")
    return eps


def _identity_norm_hook(post: Callable) -> Callable:
    """A forward pre-hook that edits a sublayer's input as a norm hook ``post(mod, args, kwargs, out)`` would
    edit the output of an identity norm in front of it."""
    def pre(mod, args, kwargs):
        return _map_first_input(args, kwargs, lambda x: post(mod, (x,), {}, x))
    return pre


def _exec_device(module: nn.Module, fallback: torch.Tensor) -> torch.device:
    """The device ``module`` computes on: accelerate's execution device when it dispatched the module."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None and fallback.device.type == "meta":
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    return fallback.device


@contextlib.contextmanager
def _onloaded(module: nn.Module) -> Iterator[None]:
    """Within the block, an accelerate-offloaded module holds its real weights (for calling ``.forward`` directly)."""
    if getattr(getattr(module, "_hf_hook", None), "offload", False):
        from accelerate.utils import align_module_device

        with align_module_device(module):
            yield
    else:
        yield


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    """``getattr(module, name)``, loaded from accelerate's offload (disk or CPU) when it sits on the meta device."""
    p = getattr(module, name, None)
    if p is None or not isinstance(p, torch.Tensor) or p.device.type != "meta":
        return p
    if getattr(module, "_hf_hook", None) is None:
        raise ArchitectureError(f"{type(module).__name__}.{name} is on the meta device (no weights loaded) and no "
                                "accelerate hook can load it; load the model with its weights (or a device_map).")
    from accelerate.utils import align_module_device

    with torch.no_grad(), align_module_device(module):
        return getattr(module, name).detach().clone()


@contextlib.contextmanager
def _attention_from_z(attn: nn.Module, o_proj: nn.Module, z: torch.Tensor, kind: Any) -> Iterator[None]:
    """Within the block, ``attn`` does not compute: its output is ``o_proj(z)`` (in its usual structure:
    a tensor, or a tuple whose other items are None). Its own hooks still run; its forward is restored on exit."""
    had = "forward" in attn.__dict__
    old = attn.__dict__.get("forward")

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = o_proj(z)
        return out if kind == "tensor" else (out, *([None] * (kind - 1)))

    attn.forward = forward
    try:
        yield
    finally:
        if had:
            attn.forward = old
        else:
            del attn.forward


def _as_index(cols: list[int]) -> slice | torch.Tensor:
    """Column indices as a slice when they are one contiguous run, else a tensor."""
    if cols and cols == list(range(cols[0], cols[-1] + 1)):
        return slice(cols[0], cols[-1] + 1)
    return torch.tensor(cols, dtype=torch.long)


def _map_first_input(args: tuple, kwargs: dict, fn: Callable[[Any], Any]) -> tuple[tuple, dict]:
    """A forward pre-hook's (args, kwargs) with the module's first input (positional, else the first
    keyword) replaced by ``fn(input)``."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: fn(kwargs[key])}


def _check_fired(fired: Mapping[Site, int], edits: Mapping[Site, Any]) -> None:
    dead = [str(s) for s in edits if fired.get(s, 0) == 0]
    if dead:
        raise InterventionError(
            f"interventions at {', '.join(dead)} never touched the model (their hooks did not fire); "
            "the architecture table may point at a module that the forward does not call."
        )


check_fired = _check_fired
