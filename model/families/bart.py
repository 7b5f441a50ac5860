"""BART (Lewis et al., 2020), mBART (Liu et al., 2020) and Marian (Junczys-Dowmunt et al., 2018):
fairseq-style encoder-decoders with one tensor layout.

- BART: post-norm, learned positions from row 2 per stack, a LayerNorm over the embeddings,
  GELU, `final_logits_bias`.
- mBART: BART pre-norm, with a final LayerNorm per stack.
- Marian: post-norm, concatenated sinusoids (no position weights), no embedding norm, SiLU.
"""

from __future__ import annotations

from ferry.errors import FerryError
from ferry.model.families.family import HF_ACTIVATIONS, Family, Head, hf_activation, register_family


def _stack(stack: str, kinds: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """One stack's per-layer tensors: self-attention (and cross-attention), FFN, their norms."""
    layer = f"{stack}.layers.{{i}}"
    attention = [("self_attn", "self_attn")] + ([("cross_attn", "encoder_attn")]
                                                if "cross" in kinds else [])
    entries = []
    for ours, theirs in attention:
        entries += [(f"{layer}.{ours}.{p}", f"{layer}.{theirs}.{p}")
                    for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    residual = "attn_residual" if stack == "encoder" else "self_residual"
    entries += [(f"{layer}.{residual}.norm", f"{layer}.self_attn_layer_norm"),
                (f"{layer}.ffn.up", f"{layer}.fc1"), (f"{layer}.ffn.down", f"{layer}.fc2"),
                (f"{layer}.ffn_residual.norm", f"{layer}.final_layer_norm")]
    if "cross" in kinds:
        entries.append((f"{layer}.cross_residual.norm", f"{layer}.encoder_attn_layer_norm"))
    return tuple(entries)


TENSORS = (
    # the shared matrix is saved under any of its tied names
    ("embedding.tokens", "shared", "encoder.embed_tokens", "decoder.embed_tokens"),
    *((f"{s}.embed.learned_positions", f"{s}.embed_positions") for s in ("encoder", "decoder")),
    *((f"{s}.embed.norm", f"{s}.layernorm_embedding") for s in ("encoder", "decoder")),
    *((f"{s}.final_norm", f"{s}.layer_norm") for s in ("encoder", "decoder")),
    *_stack("encoder", ()),
    *_stack("decoder", ("cross",)),
)
CONFIG_FIELDS = {
    "vocab_size": "vocab_size", "d_model": "d_model", "num_heads": "encoder_attention_heads",
    "num_encoder_layers": "encoder_layers", "num_decoder_layers": "decoder_layers",
    "d_ff": "encoder_ffn_dim", "dropout": "dropout", "max_positions": "max_position_embeddings",
}
CONDITIONAL_GENERATION = Head("seq2seq", lm=True, tensors=(
    ("lm_head.bias", "final_logits_bias"), ("lm_head.projection", "lm_head")))
BASE = Head("seq2seq", lm=True)  # no final_logits_bias: ferry's starts at zero, as HF's does
# tied copies of the shared matrix; Marian's sinusoid tables (recomputed from the config)
OPTIONAL = ("lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _derived(hf: dict) -> dict:
    for ours, theirs in (("encoder_attention_heads", "decoder_attention_heads"),
                         ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf[ours] != hf[theirs]:
            raise FerryError(f"{ours}={hf[ours]} differs from {theirs}={hf[theirs]}: ferry's "
                             "encoder and decoder share one width and head count")
    return {"activation": hf_activation(hf["activation_function"], "activation_function"),
            "embedding_scale": "sqrt_d_model" if hf["scale_embedding"] else "none",
            "tie_embeddings": bool(hf["tie_word_embeddings"])}


def _hf_config(ferry: dict) -> dict:
    return {"activation_function": {v: k for k, v in HF_ACTIVATIONS.items()}[ferry["activation"]],
            "scale_embedding": ferry["embedding_scale"] == "sqrt_d_model",
            "tie_word_embeddings": ferry["tie_embeddings"],
            "decoder_attention_heads": ferry["num_heads"], "decoder_ffn_dim": ferry["d_ff"]}


def _family(model_type: str, *, base: str, generation: str, fixed: dict,
            requires: dict | None = None, optional: tuple[str, ...] = ()) -> Family:
    return register_family(Family(
        model_type=model_type,
        body_prefix="model",
        base_class=base,
        config_fields=CONFIG_FIELDS,
        # BART's LayerNorms are built with PyTorch's default eps
        fixed={"architecture": "encoder-decoder", "lm_head_bias": True,
               "lm_head_transform": "none", "layer_norm_eps": 1e-5, "type_vocab_size": 0,
               **fixed},
        requires=requires or {},
        hf_defaults={"activation_function": "gelu", "dropout": 0.1, "scale_embedding": False,
                     "max_position_embeddings": 1024, "tie_word_embeddings": True,
                     "share_encoder_decoder_embeddings": True},
        derived=_derived,
        hf_config=_hf_config,
        tensors=TENSORS,
        heads={generation: CONDITIONAL_GENERATION, base: BASE},
        optional=OPTIONAL + optional,
        zero_when_absent=("lm_head.bias",),
        unsqueezed=("final_logits_bias",),
    ))


FAIRSEQ = {"positional": "learned", "position_offset": 2, "embedding_norm": "layernorm"}
BART = _family("bart", base="BartModel", generation="BartForConditionalGeneration",
               fixed={**FAIRSEQ, "norm_placement": "post"})
MBART = _family("mbart", base="MBartModel", generation="MBartForConditionalGeneration",
                fixed={**FAIRSEQ, "norm_placement": "pre"})
MARIAN = _family(
    "marian", base="MarianModel", generation="MarianMTModel",
    fixed={"positional": "sinusoidal_concat", "position_offset": 0, "embedding_norm": "none",
           "norm_placement": "post"},
    # a target vocabulary of its own (some opus-mt models) has no place in ferry's shared one
    requires={"share_encoder_decoder_embeddings": (True,)},
    optional=("encoder.embed_positions.weight", "decoder.embed_positions.weight"),
)
