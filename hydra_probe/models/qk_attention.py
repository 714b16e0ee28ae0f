"""AtP*'s QK fix inside one block: the attention's output (or pattern) for queries and keys that changed.

:class:`QKAttention` is the part of :class:`~.adapter.Adapter` the QK fix uses
(``Runner.qk_fix``): run block ``layer`` from the kept base run
(:class:`~.plumbing.Prefix`) on stacked copies whose queries and keys differ
while every copy's values stay the base run's, and stop at the output
projection's input (``z``) or, on the pattern route, at the softmax pattern
(:mod:`.patterns`); given composed q/k projections instead of the block's own
(:meth:`QKAttention.attention_z_given`); the rows after a shared prefix only
(:mod:`.suffix`, :mod:`.last_query`). Like the adapter, it touches modules and
hooks through the architecture table only.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ArchitectureError
from .plumbing import (
    Prefix,
    SuffixRefused,
    as_index,
    eps_of,
    get_path,
    param_of,
    temporary_hooks,
    tile,
)
from .sites import Site
from .suffix import prefix_keys_function, suffix_call


class QKAttention:
    """The QK fix's block runs; mixed into :class:`~.adapter.Adapter` (uses its table, blocks and shapes)."""

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
                           first_row: int = 0, memo: dict[Any, Any] | None = None, queries: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor] | bool:
        """:meth:`attention_z` with ``shared_values`` as attention patterns (the QK fix's pattern route):
        ``(pattern, values)`` as :meth:`attention_patterns_given` returns them (``queries`` as there), checked
        once per ``memo`` (a dict the caller keeps for calls of this layer and prefix), or True where the route
        does not apply (the caller takes :meth:`attention_z`)."""
        self._refuse_remote()
        memo = {} if memo is None else memo
        if not self._pattern_route_open(prefix, layer, memo) or any(
                hasattr(m, "_hf_hook") for m in self.blocks[layer].modules()):
            return True

        def values(register: Callable[..., None], stack: contextlib.ExitStack) -> None:
            stack.enter_context(self._last_copy_values(layer, prefix.batch, register, True))

        return self._checked_patterns(prefix, layer, memo,
                                      self._run_to_z(prefix, layer, copies, hidden, first_row, True, values, sink={},
                                                                     queries=queries))

    def _run_to_z(self, prefix: Prefix, layer: int, copies: int, hidden: torch.Tensor, first_row: int,
                  plain: bool, setup: Callable[[Callable[..., None], contextlib.ExitStack], None] | None = None,
                  suffix: bool = False, sink: dict[str, torch.Tensor] | None = None, queries: int | None = None
                  ) -> Any:
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
        it did not (the output route applies; the other copies' values may not be formed); ``queries``: the
        pattern of the last ``queries`` query rows only (:func:`.patterns.pattern_function`)."""
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
            register(o_proj, _stop_at_z(got, plain), pre=True, with_kwargs=True)
            if setup is not None:
                setup(register, stack)
            if sink is not None:  # entered first: the innermost attention function, after the prefix's keys
                stack.enter_context(pattern_function(get_path(self.blocks[layer], self.table.attn), B, sink, queries))
            stack.enter_context(attention)
            try:
                self.blocks[layer](hidden, *tile(args, B, copies), **tile(kw, B, copies))
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
        vs = as_index(v_cols)
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
            qk = as_index(sorted(set(range(width)) - set(v_cols)))

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
        return self.head_columns(layer, "v")[1]

    def head_columns(self, layer: int, which: str) -> tuple[Site, list[int]]:
        """The site that holds layer ``layer``'s ``which`` (q, k or v) inputs of every head and its columns that
        hold them, sorted (kept per layer: the layout does not change)."""
        key = ("columns", layer, which)
        if key not in self._layout:
            sites, cols = set(), set()
            for h in range(self.n_heads):
                site, sl = self.head_input_slice(layer, h, which)
                sites.add(site)
                cols.update(range(*sl.indices(10 ** 9)))
            (site,) = sites
            self._layout[key] = site, sorted(cols)
        site, cols = self._layout[key]
        return site, list(cols)

    @property
    def _layout(self) -> dict[Any, Any]:
        """What :meth:`head_columns` and :meth:`qk_sites` derived from the architecture table, per layer."""
        return self.__dict__.setdefault("_layout_memo", {})

    def qk_sites(self, layer: int) -> list[tuple[Site, torch.Tensor | slice]]:
        """Layer ``layer``'s query/key projection sites with the columns of each that hold queries or keys:
        ``[(Site(layer, "q"), all), (Site(layer, "k"), all)]`` for separate projections, one ``qkv`` site
        with its q and k columns for a fused one (kept per layer: the layout does not change)."""
        key = ("qk_sites", layer)
        if key not in self._layout:
            self._layout[key] = self._qk_sites(layer)
        return list(self._layout[key])

    def _qk_sites(self, layer: int) -> list[tuple[Site, torch.Tensor | slice]]:
        cols: dict[Site, set[int]] = {}
        for h in range(self.n_heads):
            for w in ("q", "k"):
                site, sl = self.head_input_slice(layer, h, w)
                cols.setdefault(site, set()).update(range(sl.start, sl.stop))
        if self.table.qkv_layout == "separate":
            return [(s, slice(None)) for s in sorted(cols, key=lambda s: s.kind == "k")]
        return [(s, as_index(sorted(c))) for s, c in cols.items()]

    @contextlib.contextmanager
    def frozen_qk(self, layers: Any) -> Iterator[None]:
        """Within the block, the queries and keys of ``layers`` pass no gradient (AtP*'s QK fix: attention
        patterns are constants for the gradient) and cost no backward: a separate q or k projection's output
        is detached (its backward never runs); a fused one's is detached and its other columns (the values)
        recomputed from its input with their gradient, so its backward forms those columns' input gradient
        alone."""
        self._refuse_remote()
        with temporary_hooks() as register:
            for layer in layers:
                for site, qk in self.qk_sites(layer):
                    mod, _ = self.module_of(site)  # q, k and qkv sites are their projection's output
                    if isinstance(qk, slice) and qk == slice(None):
                        register(mod, _detached_output)
                        continue
                    keep = torch.ones(self.module_width(site), dtype=torch.bool)
                    keep[qk] = False
                    register(mod, functools.partial(_values_only, self, site, as_index(keep.nonzero()[:, 0].tolist())))
            yield

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
        w = param_of(n, "weight")
        gamma = (torch.ones(self.d_model, dtype=self.dtype, device=self.device) if w is None else w) + self.table.gamma_offset
        return gamma, param_of(n, "bias"), eps_of(n), self.table.norm_kind == "layernorm"

    def attention_z_given(self, prefix: Prefix, layer: int, copies: int, normed: torch.Tensor,
                          given: Mapping[Site, torch.Tensor], memo: dict[Any, Any] | None = None,
                          first_row: int = 0, suffix: bool = False) -> torch.Tensor | None:
        """:meth:`attention_z` with every copy's query/key projections given and the values of one input.

        ``given``: ``{site: (copies*B, T, width)}`` for each of :meth:`qk_sites`, which the q/k projection
        modules return instead of computing (a fused module's value columns are then filled in);
        ``normed`` (B, T, d): the attention's input (its norm's output) of the last copy, from which every
        copy's values are projected. The block's input and its attention norm carry no data (a broadcast
        zero stands in for the stacked block input), so only the attention itself runs on every copy. The
        last copy's given q/k are checked against the modules' own output on ``normed`` (its first and last
        prompt: a norm other than described is off on every prompt); where they differ nothing more is run
        and None is returned. Only where :meth:`can_compose_qk`. ``memo``: a dict
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
                                 first_row: int = 0, suffix: bool = False, queries: int | None = None
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
        failed): the caller takes :meth:`attention_z_given`. Only where :meth:`can_compose_qk`. ``queries``: the
        pattern of the last ``queries`` query rows only, Tq at most that (the changed copies' given queries
        before them are never read and need not be formed)."""
        memo = {} if memo is None else memo
        if not self._pattern_route_open(prefix, layer, memo):
            return True
        return self._checked_patterns(prefix, layer, memo, self._given_run(
            prefix, layer, copies, normed, given, memo, first_row, suffix, {}, queries))

    @staticmethod
    def _pattern_route_open(prefix: Prefix, layer: int, memo: dict[Any, Any]) -> bool:
        """Whether a pattern route may run: the prefix holds the layer's ``z`` to check it against, and no
        earlier check in ``memo`` failed."""
        return Site(layer, "z") in prefix.captures and memo.get("patterns") is not False

    def _checked_patterns(self, prefix: Prefix, layer: int, memo: dict[Any, Any], got: Any) -> Any:
        """A pattern run's result ``got``: ``(pattern, values)`` once the first of ``memo``'s runs passed
        :meth:`_patterns_match` (else True: the output route); True or False (no route, or given q/k that
        differ) as it is."""
        if isinstance(got, bool):
            return got
        if "patterns" not in memo:
            memo["patterns"] = self._patterns_match(prefix, layer, *got)
        return got if memo["patterns"] else True

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
                   sink: dict[str, torch.Tensor] | None, queries: int | None = None) -> Any:
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
            v = as_index(self.value_columns(layer)) if t.qkv_layout != "separate" else None
            if site not in memo:
                # checked on the first and last prompt: a norm or projection other than the table says is off
                # by O(1) on every prompt (rounding is not)
                some = [0, B - 1] if B > 1 else [0]
                own = mod.forward(normed[some])
                mine = given[site][-B:][some][..., qk]
                ref = own[:, r:, qk].to(mine.dtype)
                tol = max(1e-3, 8 * torch.finfo(self.dtype).eps)
                if not torch.allclose(mine, ref, rtol=tol, atol=tol * float(ref.abs().max()) + 1e-6):
                    return False
                memo[site] = None if v is None else self.project_columns(site, normed, v)  # (B, T, values)
            out = given[site]
            if v is not None:  # the fused module's value columns: the last copy's, for every copy
                (out[-B:] if last_only else out).unflatten(0, (-1, B))[..., v] = memo[site][:, r:].to(out.dtype)
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
                                  suffix=suffix, sink=sink, queries=queries)
        finally:
            for mod, old in reversed(saved):
                if old is None:
                    del mod.forward
                else:
                    mod.forward = old


def _detached_output(mod: nn.Module, args: Any, out: Any) -> Any:
    """Forward hook: the module's output (or its first element), detached."""
    return (out[0].detach(), *out[1:]) if isinstance(out, tuple) else out.detach()


def _values_only(ad: Any, site: Site, keep: Any, mod: nn.Module, args: Any, out: Any) -> Any:
    """Forward hook of a fused q/k/v projection: its output detached, then the columns ``keep`` recomputed from
    its input with their gradient (:meth:`Adapter.project_columns`)."""
    y = out[0] if isinstance(out, tuple) else out
    z = y.detach().clone()
    z[..., keep] = ad.project_columns(site, args[0], keep).to(z.dtype)
    return (z, *out[1:]) if isinstance(out, tuple) else z


def _last_rows(vals: torch.Tensor, copies: int) -> torch.Tensor:
    """(copies*B, ...) with ``vals`` (B, ...) as its last B rows and the others left unwritten (never read)."""
    out = vals.new_empty((copies * vals.shape[0], *vals.shape[1:]))
    out[-vals.shape[0]:] = vals
    return out


def _stop_at_z(got: dict[str, torch.Tensor], plain: bool) -> Callable[..., None]:
    """A forward pre-hook keeping the output projection's input in ``got["z"]`` (and, ``plain``, stopping the
    block there: :class:`_StopAtZ`)."""
    def at_z(mod, args, kwargs):
        got["z"] = args[0] if args else next(iter(kwargs.values()))
        if plain:
            raise _StopAtZ
    return at_z


class _StopAtZ(BaseException):
    """Raised by :meth:`QKAttention.attention_z`'s hook on the output projection and caught by it: the rest of the
    block is not run. A BaseException, so that no ``except Exception`` inside a model swallows it."""
