"""Sites: named places in the forward pass where activations are read or edited.

A :class:`Site` is plain data (a kind and a layer). The adapter maps it to a
module and to whether the module's input or output is meant.

Kinds (shapes are (batch, pos, width)):
    ``resid_pre``  block input, width d_model; ``layer == n_layers`` is the
                   final norm's input (the final residual stream).
    ``z``          input of the attention output projection, width
                   n_heads * head_dim (heads' outputs before W_O).
    ``mlp_in``     the MLP's input (after its norm), width d_model.
    ``mlp_out``    the MLP's output (its write to the residual), width d_model.
    ``attn_in``    the attention module's input (after its norm), width d_model.
    ``q``, ``k``, ``v``  projection outputs (separate projections).
    ``qkv``        fused projection output (GPT-2, GPT-NeoX).

Read-only kinds for the mechanisms of self-repair (captured, never edited):
    ``values``     the value vectors attention mixes, width n_kv_heads * head_dim
                   (one block per key/value group; sliced out of a fused projection).
    ``attn_last``  the attention weights of the last query position: at position j,
                   width n_heads, the weight each head puts on key j. Needs the
                   eager attention implementation (:meth:`Adapter.eager_attention`).
    ``mlp_act``    the input of the MLP's output projection (its neuron activations
                   a_n, with ``mlp_out = sum_n a_n W_out[n] + b``), width d_mlp.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InterventionError

SITE_KINDS = ("resid_pre", "attn_in", "q", "k", "v", "qkv", "values", "attn_last", "z", "mlp_in", "mlp_act",
              "mlp_out")
# Kinds that are derived views of a module's output: they can be captured, not edited.
READ_ONLY_KINDS = ("values", "attn_last")
# Order of execution inside a block; used to sort edits for nnsight traces.
_ORDER = {k: i for i, k in enumerate(SITE_KINDS)}


@dataclass(frozen=True, order=True)
class Site:
    """A place in the forward pass: ``kind`` at ``layer`` (zero-based)."""

    layer: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in _ORDER:
            raise InterventionError(f"unknown site kind {self.kind!r}; known: {', '.join(SITE_KINDS)}")

    @property
    def order(self) -> tuple[int, int]:
        """Execution order key (layer, position inside the block)."""
        return (self.layer, _ORDER[self.kind])

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"
