"""Llama (Touvron et al., 2023; Llama 2 and 3), Mistral (Jiang et al., 2023), Qwen2 and Qwen3:
pre-norm decoder-only models with RMSNorm, rotary positions, a SwiGLU feed-forward network,
grouped-query attention and no biases (but Qwen2's query/key/value biases, and Qwen3's RMSNorm
over each head's queries and keys). One tensor layout for all four.

Their `config.json` gives the rotary settings as `rope_parameters` (transformers 5) or as
`rope_theta` + `rope_scaling` (earlier); default, linear and Llama 3 scaling are expressible,
others (dynamic NTK, YaRN, LongRoPE) are refused by name, as is a sliding attention window
shorter than the context (Mistral v0.1, Qwen with `use_sliding_window`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ferry.errors import FerryError
from ferry.model.families.family import HF_ACTIVATIONS, Family, Head, hf_activation, register_family

LAYER = "layers.{i}"
OURS = "decoder.layers.{i}"
TENSORS = (
    ("embedding.tokens", "embed_tokens"),
    *((f"{OURS}.self_attn.{p}", f"{LAYER}.self_attn.{p}")
      for p in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm")),
    (f"{OURS}.self_attn.out_proj", f"{LAYER}.self_attn.o_proj"),
    (f"{OURS}.self_residual.norm", f"{LAYER}.input_layernorm"),
    (f"{OURS}.ffn_residual.norm", f"{LAYER}.post_attention_layernorm"),
    (f"{OURS}.ffn.gate", f"{LAYER}.mlp.gate_proj"),
    (f"{OURS}.ffn.up", f"{LAYER}.mlp.up_proj"),
    (f"{OURS}.ffn.down", f"{LAYER}.mlp.down_proj"),
    ("decoder.final_norm", "norm"),
)
ROPE_SCALINGS = {"default": "none", "linear": "linear", "llama3": "llama3"}


def rope_options(hf: dict[str, Any]) -> dict[str, Any]:
    """ferry's rotary fields from `rope_parameters` or `rope_theta` + `rope_scaling`."""
    parameters = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(parameters, dict):
        raise FerryError(f"config.json rope_parameters={parameters!r}: expected an object")
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise FerryError(f"rotary scaling rope_type={kind!r} cannot be expressed in ferry "
                         f"(supported: {sorted(ROPE_SCALINGS)})")
    if parameters.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise FerryError("partial_rotary_factor ≠ 1 (rotating part of each head) cannot be "
                         "expressed in ferry")
    options = {"rope_theta": float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0))),
               "rope_scaling": ROPE_SCALINGS[kind]}
    if kind != "default":
        options["rope_scaling_factor"] = float(parameters["factor"])
    if kind == "llama3":
        options.update(
            rope_low_freq_factor=float(parameters["low_freq_factor"]),
            rope_high_freq_factor=float(parameters["high_freq_factor"]),
            rope_original_max_positions=int(parameters["original_max_position_embeddings"]))
    return options


def _hf_rope(ferry: dict[str, Any]) -> dict[str, Any]:
    parameters: dict[str, Any] = {"rope_theta": ferry["rope_theta"],
                                  "rope_type": {v: k for k, v in ROPE_SCALINGS.items()}[
                                      ferry["rope_scaling"]]}
    if ferry["rope_scaling"] != "none":
        parameters["factor"] = ferry["rope_scaling_factor"]
    if ferry["rope_scaling"] == "llama3":
        parameters.update(low_freq_factor=ferry["rope_low_freq_factor"],
                          high_freq_factor=ferry["rope_high_freq_factor"],
                          original_max_position_embeddings=ferry["rope_original_max_positions"])
    return {"rope_parameters": parameters}


def _no_sliding_window(hf: dict[str, Any]) -> None:
    """Refuse a sliding attention window that some layer would use, by name."""
    layer_types = hf.get("layer_types") or []
    window = hf.get("sliding_window")
    sliding = "sliding_attention" in layer_types
    if hf["model_type"] == "mistral":
        sliding = sliding or (window is not None and window < hf["max_position_embeddings"])
    elif hf.get("use_sliding_window") and window is not None and not layer_types:
        sliding = hf.get("max_window_layers", 0) < hf["num_hidden_layers"]
    if sliding:
        raise FerryError(f"{hf['model_type']} config sliding_window={window!r} is shorter than "
                         f"the context (max_position_embeddings="
                         f"{hf['max_position_embeddings']}): sliding-window attention cannot be "
                         "expressed in ferry")


def _derived(hf: dict[str, Any]) -> dict[str, Any]:
    _no_sliding_window(hf)
    qkv_bias = hf["model_type"] == "qwen2" or bool(hf.get("attention_bias"))
    heads = hf["num_attention_heads"]
    return {
        "activation": hf_activation(hf["hidden_act"], "hidden_act"),
        "num_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        # 0: the default width, d_model / heads (transformers 5 writes head_dim out always)
        "head_size": 0 if hf.get("head_dim") in (None, hf["hidden_size"] // heads) else
        hf["head_dim"],
        "tie_embeddings": bool(hf["tie_word_embeddings"]),
        "attention_bias": ("qkv" if hf["model_type"] == "qwen2" else "all") if qkv_bias
        else "none",
        "ffn_bias": bool(hf.get("mlp_bias")),
        "qk_norm": hf["model_type"] == "qwen3",
        "dropout": float(hf.get("attention_dropout") or 0.0),
        **rope_options(hf),
    }


# what each family's projections carry: (attention_bias choices, qk_norm)
EXPRESSIBLE = {"llama": (("none", "all"), False), "mistral": (("none",), False),
               "qwen2": (("qkv",), False), "qwen3": (("none", "all"), True)}


def _hf_config(model_type: str, ferry: dict[str, Any]) -> dict[str, Any]:
    biases, qk_norm = EXPRESSIBLE[model_type]
    if ferry["attention_bias"] not in biases or ferry["qk_norm"] != qk_norm:
        raise FerryError(f"{model_type} needs attention_bias in {list(biases)} and "
                         f"qk_norm={qk_norm} (the model has {ferry['attention_bias']!r}, "
                         f"{ferry['qk_norm']})")
    return {"hidden_act": {v: k for k, v in HF_ACTIVATIONS.items()}[ferry["activation"]],
            "num_key_value_heads": ferry["num_kv_heads"] or ferry["num_heads"],
            "head_dim": ferry["head_size"] or ferry["d_model"] // ferry["num_heads"],
            "tie_word_embeddings": ferry["tie_embeddings"],
            "attention_bias": ferry["attention_bias"] != "none",
            "mlp_bias": ferry["ffn_bias"], "attention_dropout": ferry["dropout"],
            **_hf_rope(ferry)}


def _family(model_type: str, prefix: str, **hf_defaults: Any) -> Family:
    return register_family(Family(
        model_type=model_type,
        body_prefix="model",
        base_class=f"{prefix}Model",
        config_fields={
            "vocab_size": "vocab_size", "d_model": "hidden_size",
            "num_heads": "num_attention_heads", "num_decoder_layers": "num_hidden_layers",
            "d_ff": "intermediate_size", "max_positions": "max_position_embeddings",
            "layer_norm_eps": "rms_norm_eps",
        },
        fixed={"architecture": "decoder-only", "num_encoder_layers": 0, "positional": "rotary",
               "position_offset": 0, "norm": "rmsnorm", "norm_placement": "pre",
               "feed_forward": "gated", "embedding_scale": "none", "embedding_norm": "none",
               "lm_head_transform": "none", "lm_head_bias": False, "head_bias": False,
               "type_vocab_size": 0},
        hf_defaults={"hidden_act": "silu", "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
                     "max_position_embeddings": 2048, **hf_defaults},
        derived=_derived,
        hf_config=partial(_hf_config, model_type),
        tensors=TENSORS,
        heads={
            f"{prefix}ForCausalLM": Head("causal_lm", lm=True,
                                         tensors=(("lm_head.projection", "lm_head"),)),
            # (the vocabulary projection is not served: no matrix of its own is looked for)
            f"{prefix}ForSequenceClassification": Head(
                "classification", lm=False,
                config={"task_head": "sequence_classification", "tie_embeddings": True},
                tensors=(("head.classifier", "score"),)),
        },
        # the tied copy of embed_tokens; rotary tables that old checkpoints stored
        optional=("lm_head.weight", "layers.{i}.self_attn.rotary_emb.inv_freq",
                  "rotary_emb.inv_freq"),
    ))


LLAMA = _family("llama", "Llama")
MISTRAL = _family("mistral", "Mistral", sliding_window=4096, max_position_embeddings=32768)
QWEN2 = _family("qwen2", "Qwen2", max_position_embeddings=32768, rope_theta=10000.0)
QWEN3 = _family("qwen3", "Qwen3", head_dim=128, max_position_embeddings=32768)
