"""T5 (Raffel et al., 2020) and T5 v1.1 / Flan-T5 (Chung et al., 2022): pre-norm
encoder-decoders with RMSNorm, a relative position bias per stack (no absolute positions),
unscaled attention and no biases anywhere.

- T5 v1.0: ReLU feed-forward, output projection tied to the embeddings, with the final states
  scaled by 1/√d_model before it.
- v1.1 / Flan-T5: gated-GELU (GeGLU) feed-forward, an output projection of its own, unscaled.

transformers 5 always saves `tie_word_embeddings: true` and says whether the output is rescaled
with `scale_decoder_outputs`; earlier releases said both with `tie_word_embeddings`. T5 keeps the
body's tensors without a prefix in every model class.
"""

from __future__ import annotations

from typing import Any

from ferry.errors import FerryError
from ferry.model.families.family import Family, Head, register_family

# feed_forward_proj → (feed_forward, activation): "gated-gelu" is the tanh GELU (gelu_new)
FEED_FORWARDS = {"relu": ("plain", "relu"), "gated-gelu": ("gated", "gelu_tanh"),
                 "gated-relu": ("gated", "relu"), "gated-silu": ("gated", "silu"),
                 "gelu": ("plain", "gelu"), "gated-gelu_new": ("gated", "gelu_tanh")}


def _attention(ours: str, theirs: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{ours}.{a}", f"{theirs}.{b}")
                 for a, b in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"),
                              ("out_proj", "o")))


def _stack(stack: str) -> tuple[tuple[str, str], ...]:
    """A stack's tensors: attention sublayers, their norms, the feed-forward's output matrix."""
    ours, theirs = f"{stack}.layers.{{i}}", f"{stack}.block.{{i}}.layer"
    if stack == "encoder":
        sublayers = [("self_attn", "attn_residual", "0.SelfAttention")]
    else:
        sublayers = [("self_attn", "self_residual", "0.SelfAttention"),
                     ("cross_attn", "cross_residual", "1.EncDecAttention")]
    entries = []
    for attention, residual, hf in sublayers:
        entries += _attention(f"{ours}.{attention}", f"{theirs}.{hf}")
        entries.append((f"{ours}.{residual}.norm", f"{theirs}.{hf[0]}.layer_norm"))
    ffn = len(sublayers)
    entries += [(f"{ours}.ffn.down", f"{theirs}.{ffn}.DenseReluDense.wo"),
                (f"{ours}.ffn_residual.norm", f"{theirs}.{ffn}.layer_norm"),
                (f"{stack}.positions.relative.table",
                 f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"),
                (f"{stack}.final_norm", f"{stack}.final_layer_norm")]
    return tuple(entries)


def _feed_forward_tensors(ferry: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The feed-forward's input matrices: `wi`, or `wi_0` (activated) and `wi_1` when gated."""
    entries = []
    for stack, index in (("encoder", 1), ("decoder", 2)):
        ours, theirs = f"{stack}.layers.{{i}}.ffn", f"{stack}.block.{{i}}.layer.{index}"
        if ferry["feed_forward"] == "gated":
            entries += [(f"{ours}.gate", f"{theirs}.DenseReluDense.wi_0"),
                        (f"{ours}.up", f"{theirs}.DenseReluDense.wi_1")]
        else:
            entries.append((f"{ours}.up", f"{theirs}.DenseReluDense.wi"))
    return tuple(entries)


def _derived(hf: dict[str, Any]) -> dict[str, Any]:
    projection = hf["feed_forward_proj"]
    if projection not in FEED_FORWARDS:
        raise FerryError(f"t5 config feed_forward_proj={projection!r} cannot be expressed in "
                         f"ferry (supported: {sorted(FEED_FORWARDS)})")
    feed_forward, activation = FEED_FORWARDS[projection]
    # v1.0 ties the output projection and rescales; v1.1 has its own, unscaled
    scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    return {"num_decoder_layers": hf.get("num_decoder_layers") or hf["num_layers"],
            "feed_forward": feed_forward, "activation": activation,
            "tie_embeddings": bool(scaled),
            "lm_head_scale": "inverse_sqrt_d_model" if scaled else "none",
            "max_positions": int(hf.get("n_positions") or 512)}


def _hf_config(ferry: dict[str, Any]) -> dict[str, Any]:
    projection = {(f, a): name for name, (f, a) in FEED_FORWARDS.items()}
    if ferry["tie_embeddings"] != (ferry["lm_head_scale"] != "none"):
        raise FerryError("a T5 ties its output projection exactly when it rescales the final "
                         "states (v1.0) and unties it when it does not (v1.1)")
    return {"feed_forward_proj": projection[ferry["feed_forward"], ferry["activation"]],
            "num_decoder_layers": ferry["num_decoder_layers"],
            "tie_word_embeddings": ferry["tie_embeddings"],
            "scale_decoder_outputs": ferry["tie_embeddings"], "n_positions": ferry["max_positions"],
            "is_encoder_decoder": True}


T5 = register_family(Family(
    model_type="t5",
    body_prefix="",
    base_class="T5Model",
    config_fields={
        "vocab_size": "vocab_size", "d_model": "d_model", "num_heads": "num_heads",
        "head_size": "d_kv", "d_ff": "d_ff", "num_encoder_layers": "num_layers",
        "dropout": "dropout_rate", "layer_norm_eps": "layer_norm_epsilon",
        "relative_attention_num_buckets": "relative_attention_num_buckets",
        "relative_attention_max_distance": "relative_attention_max_distance",
    },
    fixed={"architecture": "encoder-decoder", "positional": "relative_bias",
           "position_offset": 0, "norm": "rmsnorm", "norm_placement": "pre",
           "embedding_scale": "none", "embedding_norm": "none", "attention_bias": "none",
           "ffn_bias": False, "attention_scale": "none", "lm_head_transform": "none",
           "lm_head_bias": False, "type_vocab_size": 0},
    hf_defaults={"feed_forward_proj": "relu", "num_decoder_layers": None, "dropout_rate": 0.1,
                 "layer_norm_epsilon": 1e-6, "relative_attention_num_buckets": 32,
                 "relative_attention_max_distance": 128, "d_kv": 64},
    derived=_derived,
    hf_config=_hf_config,
    tensors=(("embedding.tokens", "shared", "encoder.embed_tokens", "decoder.embed_tokens"),
             *_stack("encoder"), *_stack("decoder")),
    config_tensors=_feed_forward_tensors,
    heads={"T5ForConditionalGeneration": Head(
               "seq2seq", lm=True, tensors=(("lm_head.projection", "lm_head"),)),
           "T5Model": Head("seq2seq", lm=True)},
    # tied copies of the shared matrix; a decoder cross-attention bias table T5 never uses
    optional=("lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
              "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"),
    special_tokens={"pad": "pad_token", "eos": "eos_token", "unk": "unk_token"},
))
