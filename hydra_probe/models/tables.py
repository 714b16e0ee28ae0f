"""One declarative table per architecture family.

Each :class:`ArchTable` says where, inside a Hugging Face causal LM, the
pieces hydra_probe reads and edits live. Paths are dotted attribute paths;
``{layer}``-free paths inside a block are relative to the block. This file is
the only place (with :mod:`hydra_probe.models.adapter`) that knows module
paths. To support a new family, add a table and register it with
:func:`register_table`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ArchitectureError


@dataclass(frozen=True)
class ArchTable:
    """Where things live in one architecture family.

    Attributes:
        family: human name of the family.
        model_types: ``config.model_type`` values this table serves.
        base: path of the base transformer (embeddings, blocks, final norm).
        blocks: path of the list of decoder blocks.
        attn: path of the attention module inside a block.
        o_proj: path of the attention output projection inside a block; its
            input is the concatenation of the heads' outputs ``z``
            (batch, pos, n_heads * head_dim).
        o_proj_kind: ``"linear"`` (weight (d_model, H*dh)) or ``"conv1d"``
            (GPT-2's Conv1D, weight (H*dh, d_model)).
        qkv: paths of the q, k, v projections inside a block; one path for a
            fused projection.
        qkv_layout: ``"separate"``, ``"gpt2"`` (fused [q|k|v]) or ``"neox"``
            (fused, per head [q|k|v]).
        mlp: path of the MLP inside a block; its output is the MLP's write
            to the residual stream (output bias included).
        attn_norm / mlp_norm: the pre-attention / pre-MLP norms of a block.
        final_norm: path of the final norm.
        unembed: path of the unembedding (``lm_head``).
        norm_kind: ``"layernorm"`` or ``"rmsnorm"``.
        gamma_offset: added to the norm weight to get the scale (1.0 for
            Gemma's ``1 + w``).
        parallel_attr: config attribute that switches on a parallel residual
            (attention and MLP read the same block input), or ``None``.
        parallel_default: the value when the config lacks ``parallel_attr``.
        n_heads_attr / n_kv_heads_attr: config attributes for head counts.
        embed_scaled: the base model multiplies embeddings by sqrt(d_model).
        mlp_out_proj: path of the MLP's output (down) projection inside a
            block, whose input is the neuron basis ``a_n`` with
            ``mlp_out = sum_n a_n W_out[n] + b`` (gated MLPs: the input of
            ``down_proj``); same weight layout as ``o_proj_kind``. ``None``:
            no neuron basis is known (``neuron_contributions`` refuses).
    """

    family: str
    model_types: tuple[str, ...]
    base: str
    blocks: str
    attn: str
    o_proj: str
    o_proj_kind: str
    qkv: tuple[str, ...]
    qkv_layout: str
    mlp: str
    attn_norm: str
    mlp_norm: str
    final_norm: str
    unembed: str = "lm_head"
    norm_kind: str = "rmsnorm"
    gamma_offset: float = 0.0
    parallel_attr: str | None = None
    parallel_default: bool = False
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str | None = "num_key_value_heads"
    embed_scaled: bool = False
    mlp_out_proj: str | None = None
    notes: str = field(default="", compare=False)


GPT2 = ArchTable(
    family="GPT-2",
    model_types=("gpt2",),
    base="transformer",
    blocks="transformer.h",
    attn="attn",
    o_proj="attn.c_proj",
    o_proj_kind="conv1d",
    qkv=("attn.c_attn",),
    qkv_layout="gpt2",
    mlp="mlp",
    attn_norm="ln_1",
    mlp_norm="ln_2",
    final_norm="transformer.ln_f",
    norm_kind="layernorm",
    n_heads_attr="n_head",
    n_kv_heads_attr=None,
    mlp_out_proj="mlp.c_proj",
)

GPT_NEOX = ArchTable(
    family="GPT-NeoX",
    model_types=("gpt_neox",),
    base="gpt_neox",
    blocks="gpt_neox.layers",
    attn="attention",
    o_proj="attention.dense",
    o_proj_kind="linear",
    qkv=("attention.query_key_value",),
    qkv_layout="neox",
    mlp="mlp",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head|embed_out",
    norm_kind="layernorm",
    parallel_attr="use_parallel_residual",
    parallel_default=True,
    n_kv_heads_attr=None,
    mlp_out_proj="mlp.dense_4h_to_h",
    notes="Pythia; parallel residual by default",
)


def _llama_like(family: str, model_types: tuple[str, ...], **kw: object) -> ArchTable:
    base = dict(
        family=family,
        model_types=model_types,
        base="model",
        blocks="model.layers",
        attn="self_attn",
        o_proj="self_attn.o_proj",
        o_proj_kind="linear",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        qkv_layout="separate",
        mlp="mlp",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        final_norm="model.norm",
        norm_kind="rmsnorm",
        mlp_out_proj="mlp.down_proj",
    )
    base.update(kw)
    return ArchTable(**base)  # type: ignore[arg-type]


LLAMA = _llama_like("Llama", ("llama",))
MISTRAL = _llama_like("Mistral", ("mistral",))
QWEN2 = _llama_like("Qwen2", ("qwen2",), notes="biases on q/k/v")
GEMMA = _llama_like("Gemma", ("gemma",), gamma_offset=1.0, embed_scaled=True,
                    notes="first generation; norm scale is 1 + w; embeddings times sqrt(d_model)")

_REGISTRY: dict[str, ArchTable] = {}


def register_table(table: ArchTable) -> None:
    """Register ``table`` for each of its ``model_types`` (replacing any earlier one)."""
    for mt in table.model_types:
        _REGISTRY[mt] = table


for _t in (GPT2, GPT_NEOX, LLAMA, MISTRAL, QWEN2, GEMMA):
    register_table(_t)


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values with a registered table."""
    return sorted(_REGISTRY)


def table_for(model_type: str) -> ArchTable:
    """The table for ``model_type``; raises :class:`ArchitectureError` naming the supported ones."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise ArchitectureError(
            f"architecture {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}. To add one, describe it with "
            "hydra_probe.models.ArchTable and call hydra_probe.models.register_table(table)."
        ) from None
