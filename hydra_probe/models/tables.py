"""One declarative table per architecture family.

Each :class:`ArchTable` says where, inside a Hugging Face causal LM, the
pieces hydra_probe reads and edits live. Paths are dotted attribute paths;
``{layer}``-free paths inside a block are relative to the block. This file is
the only place (with :mod:`hydra_probe.models.adapter`) that knows module
paths. To support a new family, add a table and register it with
:func:`register_table`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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
        qkv_layout: ``"separate"``, ``"fused"`` (one projection, columns
            ``[q (H*dh) | k (KV*dh) | v (KV*dh)]``: Phi-3, and GPT-2 with
            KV = H; ``"gpt2"`` is a synonym) or ``"neox"`` (fused, per head
            [q|k|v]).
        mlp: path of the MLP inside a block; its input is the MLP's input
            (after its pre-norm, if any). Without ``post_mlp_norm`` its output
            is the MLP's write to the residual stream (output bias included).
        attn_norm / mlp_norm: the pre-attention / pre-MLP norms of a block;
            ``None`` where a block has none (OLMo-2 normalises outputs only).
        post_attn_norm: the norm a block applies to the attention output
            before adding it to the residual (Gemma-2/3 sandwich norms,
            OLMo-2), or ``None``. Head h then writes
            ``gamma_post * (W_O^h z_h) / sigma_post`` (DESIGN.md section 2).
        post_mlp_norm: the norm applied to the MLP's output before the
            residual add, or ``None``. The MLP and this norm are one unit: the
            ``mlp_out`` site is this norm's output.
        mlp_out_proj: path (inside a block) of the MLP's output (down)
            projection, whose input is the neuron basis ``a_n`` with
            ``mlp_out = sum_n a_n W_out[n] + b`` (gated MLPs, fused gate/up
            projections such as Phi-3's ``gate_up_proj`` included); same
            weight layout as ``o_proj_kind``. ``None``: no neuron basis is
            known (``neuron_contributions`` refuses).
        softcap_attr: config attribute holding the final logit soft-cap c
            (logits = c * tanh(raw / c)), or ``None``. A value of ``None`` in
            the config means no cap.
        final_norm: path of the final norm.
        unembed: path of the unembedding (``lm_head``).
        norm_kind: ``"layernorm"`` or ``"rmsnorm"``.
        gamma_offset: added to the norm weight to get the scale (1.0 for
            Gemma's ``1 + w``).
        parallel_attr: config attribute that switches on a parallel residual
            (attention and MLP read the same block input), or ``None``.
        parallel_default: the value when the config lacks ``parallel_attr``.
        n_heads_attr / n_kv_heads_attr: config attributes for head counts.
        embed_scaled: the embeddings are multiplied by sqrt(d_model) on input
            (only on input: a tied unembedding reads the raw matrix).
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
    attn_norm: str | None
    mlp_norm: str | None
    final_norm: str
    unembed: str = "lm_head"
    norm_kind: str = "rmsnorm"
    gamma_offset: float = 0.0
    parallel_attr: str | None = None
    parallel_default: bool = False
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str | None = "num_key_value_heads"
    embed_scaled: bool = False
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    mlp_out_proj: str | None = None
    softcap_attr: str | None = None
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
        mlp_out_proj="mlp.down_proj",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        final_norm="model.norm",
        norm_kind="rmsnorm",
    )
    base.update(kw)
    return ArchTable(**base)  # type: ignore[arg-type]


LLAMA = _llama_like("Llama", ("llama",))
MISTRAL = _llama_like("Mistral", ("mistral",))
QWEN2 = _llama_like("Qwen2", ("qwen2",), notes="biases on q/k/v")
GEMMA = _llama_like("Gemma", ("gemma",), gamma_offset=1.0, embed_scaled=True,
                    notes="first generation; norm scale is 1 + w; embeddings times sqrt(d_model)")
_SANDWICH = dict(gamma_offset=1.0, embed_scaled=True, mlp_norm="pre_feedforward_layernorm",
                 post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm",
                 softcap_attr="final_logit_softcapping")
GEMMA2 = _llama_like("Gemma-2", ("gemma2",), **_SANDWICH,
                     notes="sandwich norms (pre and post each sublayer), norm scale 1 + w, final logit "
                           "soft-cap; attention soft-cap and sliding windows act inside attention")
GEMMA3 = _llama_like("Gemma-3", ("gemma3_text",), **_SANDWICH,
                     notes="Gemma-2's block with q/k norms, local/global rotary bases and sliding windows")
QWEN3 = _llama_like("Qwen3", ("qwen3",), notes="q/k norms per head")
OLMO2 = _llama_like("OLMo-2", ("olmo2",), attn_norm=None, mlp_norm=None,
                    post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm",
                    notes="post-norm only: sublayers read the raw residual and their outputs are normalised; "
                          "q/k norms over all heads")
OLMO3 = replace(OLMO2, family="OLMo-3", model_types=("olmo3",),
               notes="OLMo-2's block (post norms only, q/k norms over all heads) with sliding-window layers")
PHI3 = _llama_like("Phi-3", ("phi3",), qkv=("self_attn.qkv_proj",), qkv_layout="fused",
                   notes="fused qkv_proj [q|k|v] (grouped-query) and gate_up_proj")
STARCODER2 = _llama_like("StarCoder2", ("starcoder2",), norm_kind="layernorm", mlp_out_proj="mlp.c_proj",
                         notes="LayerNorm with bias, biased projections, GELU MLP (c_fc, c_proj)")

_REGISTRY: dict[str, ArchTable] = {}


QKV_LAYOUTS = ("separate", "fused", "gpt2", "neox")


def register_table(table: ArchTable) -> None:
    """Register ``table`` for each of its ``model_types`` (replacing any earlier one).

    Raises :class:`ArchitectureError` for a table that cannot work (unknown
    norm kind or q/k/v layout, no model types, or a fused layout with
    several q/k/v paths).
    """
    if not isinstance(table, ArchTable):
        raise ArchitectureError(f"register_table takes an ArchTable; got {type(table).__name__}.")
    if not table.model_types or not all(isinstance(mt, str) and mt for mt in table.model_types):
        raise ArchitectureError(f"table {table.family!r} names no model types; set model_types to the "
                                "config.model_type values it serves, e.g. ('llama',).")
    if table.norm_kind not in ("layernorm", "rmsnorm"):
        raise ArchitectureError(f"table {table.family!r}: norm_kind must be 'layernorm' or 'rmsnorm'; "
                                f"got {table.norm_kind!r}.")
    if table.qkv_layout not in QKV_LAYOUTS:
        raise ArchitectureError(f"table {table.family!r}: qkv_layout must be one of {', '.join(QKV_LAYOUTS)}; "
                                f"got {table.qkv_layout!r}.")
    if len(table.qkv) != (3 if table.qkv_layout == "separate" else 1):
        raise ArchitectureError(f"table {table.family!r}: a {table.qkv_layout!r} layout takes "
                                f"{3 if table.qkv_layout == 'separate' else 1} q/k/v path(s); got {len(table.qkv)}.")
    for mt in table.model_types:
        _REGISTRY[mt] = table


for _t in (GPT2, GPT_NEOX, LLAMA, MISTRAL, QWEN2, GEMMA, GEMMA2, GEMMA3, QWEN3, OLMO2, OLMO3, PHI3,
           STARCODER2):
    register_table(_t)


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values with a registered table."""
    return sorted(_REGISTRY)


def table_for(model_type: str) -> ArchTable:
    """The table for ``model_type``; raises :class:`ArchitectureError` naming the supported ones."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        if model_type in VISION_LANGUAGE:
            raise ArchitectureError(vision_language_message(model_type)) from None
        raise ArchitectureError(
            f"architecture {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}. To add one, describe it with "
            "hydra_probe.models.ArchTable and call hydra_probe.models.register_table(table)."
        ) from None


# Vision-language checkpoints whose text model has a table: model_type -> (text model_type, causal-LM class).
VISION_LANGUAGE: dict[str, tuple[str, str]] = {"gemma3": ("gemma3_text", "Gemma3ForCausalLM")}


def vision_language_message(model_type: str) -> str:
    """What to do with a vision-language ``model_type`` whose text model hydra_probe can analyse."""
    text, cls = VISION_LANGUAGE[model_type]
    return (f"{model_type!r} is a vision-language model; hydra_probe analyses its text model ({text!r}). "
            f"Load the checkpoint by name or folder with hydra_probe.load_model(...), which analyses its "
            f"language model as a {cls} (the same modules), or pass "
            f"hydra_probe.models.text_causal_lm(model) for a model object already loaded.")
