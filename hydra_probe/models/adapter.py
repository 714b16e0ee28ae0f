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
* the nnsight path (:mod:`.nnsight_backend`);
* AtP*'s QK fix inside one block (:class:`~.qk_attention.QKAttention`, mixed in).

The block-level helpers both parts use (module paths, :class:`~.plumbing.Prefix`,
hook registration) are in :mod:`.plumbing`.

Nothing here changes the model's weights or leaves a hook behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ArchitectureError, InterventionError, OptionError
from .plumbing import (
    Prefix,
    SuffixRefused,
    check_fired,
    eps_of,
    get_path,
    norm_scale,
    param_of,
    temporary_hooks,
    tile,
)
from .qk_attention import QKAttention
from .sites import READ_ONLY_KINDS, Site
from .suffix import capture_keys, min_shared_rows, prefix_keys_function, suffix_call
from .tables import ArchTable, table_for

EditFn = Callable[[torch.Tensor], torch.Tensor]


class Adapter(QKAttention):
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
        return param_of(module, name)

    def W_O(self, layer: int) -> torch.Tensor:
        """Per-head output matrices of ``layer``: (n_heads, head_dim, d_model)."""
        w = param_of(get_path(self.blocks[layer], self.table.o_proj), "weight")
        if self.table.o_proj_kind == "linear":
            w = w.T
        return w.reshape(self.n_heads, self.head_dim, self.d_model)

    def b_O(self, layer: int) -> torch.Tensor | None:
        """Bias of the attention output projection of ``layer`` (d_model,) or None."""
        return param_of(get_path(self.blocks[layer], self.table.o_proj), "bias")

    def norm_params(self) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Final norm as (gamma (d,), beta (d,) or None, eps); gamma includes Gemma's 1 + w."""
        n = self.final_norm
        gamma = param_of(n, "weight") + self.table.gamma_offset
        beta = param_of(n, "bias")
        eps = next((float(getattr(n, a)) for a in ("eps", "variance_epsilon", "epsilon") if hasattr(n, a)), None)
        if eps is None:
            raise ArchitectureError(f"cannot read eps of final norm {type(n).__name__}")
        return gamma, beta, eps

    def W_U(self, ids: torch.Tensor) -> torch.Tensor:
        """Unembedding rows for token ids: (..., d_model)."""
        return param_of(self.unembed, "weight")[ids.to(self.device)]

    def b_U(self, ids: torch.Tensor) -> torch.Tensor | None:
        b = param_of(self.unembed, "bias")
        return None if b is None else b[ids.to(b.device)]

    def logits(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm then unembedding of residual vectors x (..., d) -> (..., vocab); soft-capped where the model
        caps. With ``ids`` (N, c): the columns ``ids`` only, as :meth:`logits_at`."""
        return self._unembed_at(self.final_norm(x), ids)

    def logits_at(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` at the token columns ``ids`` only: x (N, d), ids (N, c) -> (N, c).

        Final norm, then each row's own unembedding rows (:meth:`W_U`, :meth:`b_U`), soft-capped: equal to
        ``logits(x).gather(-1, ids)`` to float rounding without the (N, vocab) product (for a 50k-262k
        vocabulary most of the unembedding's cost). Where the head is not a plain ``nn.Linear`` or something
        hooks it (quantized heads, accelerate's offload or device hooks, forward hooks), the full logits are
        gathered."""
        return self._unembed_at(self.final_norm(x), ids)

    def _unembed_at(self, normed: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """Soft-capped logits of final-norm outputs ``normed`` (N, d): (N, vocab), or at the columns ``ids``
        (N, c) only (see :meth:`logits_at`)."""
        u = self.unembed
        if ids is None or (type(u) is not nn.Linear or getattr(u, "_hf_hook", None) is not None
                           or u._forward_hooks or u._forward_pre_hooks):
            logits = self.apply_softcap(u(normed))
            return logits if ids is None else logits.gather(-1, ids.to(logits.device))
        W = self.W_U(ids)  # (N, c, d)
        out = torch.matmul(W, normed.to(W.device)[..., None]).squeeze(-1)
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
            check_fired(fired, edits or {})
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
                    out = self.blocks[i](h, *tile(args, B, copies), **tile(kw, B, copies))
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
                stack.enter_context(fused_last_query(get_path(block, t.qkv[0]), self.head_columns(layer, "q")[1]))
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

    def project_columns(self, site: Site, x: torch.Tensor, cols: slice | torch.Tensor, bias: bool = True
                        ) -> torch.Tensor:
        """``project(site, x)[..., cols]``, computing only those columns where the module is a plain linear
        layer (``nn.Linear``, GPT-2's ``Conv1D``) with its own forward; ``bias=False``: without the module's bias
        (the projection of zero taken off)."""
        mod, _ = self.module_of(site)
        conv = type(mod).__name__ == "Conv1D"
        if (type(mod) is nn.Linear or conv) and "forward" not in mod.__dict__ and not hasattr(mod, "_hf_hook"):
            w = mod.weight.T if conv else mod.weight  # (out, in)
            return nn.functional.linear(x, w[cols], None if mod.bias is None or not bias else mod.bias[cols])
        y = self.project(site, x)[..., cols]
        return y if bias else y - self.project(site, x.new_zeros(1, x.shape[-1]))[..., cols]

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

    def logits_frozen(self, x: torch.Tensor, delta: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``x + delta`` (N, d) with the final norm's scale held at that of ``x``: (N, vocab), or at
        the columns ``ids`` (N, c) only (as :meth:`logits_at`).

        ``N(x) + gamma * P(delta) / sigma(x)``, then the unembedding: the
        final norm is linear in ``delta`` once its scale is frozen.
        """
        gamma, _, _ = self.norm_params()
        d = delta.to(torch.float64)
        if self.table.norm_kind == "layernorm":
            d = d - d.mean(-1, keepdim=True)
        extra = gamma.to(torch.float64) * d / self.final_sigma(x)[..., None]
        return self._unembed_at(self.final_norm(x) + extra.to(x.dtype), ids)

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
        return param_of(n, "weight") + self.table.gamma_offset, eps_of(n)

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
        w = param_of(get_path(self.blocks[layer], self.table.mlp_out_proj), "weight")
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


def _map_first_input(args: tuple, kwargs: dict, fn: Callable[[Any], Any]) -> tuple[tuple, dict]:
    """A forward pre-hook's (args, kwargs) with the module's first input (positional, else the first
    keyword) replaced by ``fn(input)``."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: fn(kwargs[key])}

