"""GPT-2 (Radford et al., 2019): a pre-norm decoder-only model with learned positions, the tanh
GELU, a final LayerNorm and a tied output projection.

Its checkpoints store linear layers as `Conv1D`, weights (in, out), and the query/key/value
projections as one fused `c_attn`.
"""

from __future__ import annotations

from ferry.model.families.family import HF_ACTIVATIONS, Family, Head, hf_activation, register_family

LAYER = "h.{i}"
ATTENTION = "decoder.layers.{i}.self_attn"


def _derived(hf: dict) -> dict:
    d_model = hf["n_embd"]
    return {"activation": hf_activation(hf["activation_function"], "activation_function"),
            "d_ff": hf["n_inner"] or 4 * d_model,  # None: GPT-2's 4 × n_embd
            "tie_embeddings": bool(hf["tie_word_embeddings"])}


GPT2 = register_family(Family(
    model_type="gpt2",
    body_prefix="transformer",
    base_class="GPT2Model",
    config_fields={
        "vocab_size": "vocab_size", "d_model": "n_embd", "num_heads": "n_head",
        "num_decoder_layers": "n_layer", "max_positions": "n_positions",
        "dropout": "resid_pdrop", "layer_norm_eps": "layer_norm_epsilon",
    },
    fixed={
        "architecture": "decoder-only", "num_encoder_layers": 0, "positional": "learned",
        "position_offset": 0, "embedding_scale": "none", "embedding_norm": "none",
        "norm_placement": "pre", "head_bias": False, "lm_head_transform": "none",
        "lm_head_bias": False, "type_vocab_size": 0,
    },
    requires={"scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
              "add_cross_attention": (False,)},
    hf_defaults={"n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.1,
                 "layer_norm_epsilon": 1e-5, "n_positions": 1024, "tie_word_embeddings": True,
                 "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                 "add_cross_attention": False},
    derived=_derived,
    hf_config=lambda ferry: {
        "activation_function": {v: k for k, v in HF_ACTIVATIONS.items()}[ferry["activation"]],
        "n_inner": ferry["d_ff"], "tie_word_embeddings": ferry["tie_embeddings"],
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "add_cross_attention": False},
    tensors=(
        ("embedding.tokens", "wte"),
        ("decoder.embed.learned_positions", "wpe"),
        ("decoder.layers.{i}.self_residual.norm", f"{LAYER}.ln_1"),
        ("decoder.layers.{i}.self_attn.out_proj", f"{LAYER}.attn.c_proj"),
        ("decoder.layers.{i}.ffn_residual.norm", f"{LAYER}.ln_2"),
        ("decoder.layers.{i}.ffn.up", f"{LAYER}.mlp.c_fc"),
        ("decoder.layers.{i}.ffn.down", f"{LAYER}.mlp.c_proj"),
        ("decoder.final_norm", "ln_f"),
    ),
    fused={f"{LAYER}.attn.c_attn": (f"{ATTENTION}.q_proj", f"{ATTENTION}.k_proj",
                                    f"{ATTENTION}.v_proj")},
    transposed=(f"{LAYER}.attn.c_attn", f"{LAYER}.attn.c_proj", f"{LAYER}.mlp.c_fc",
                f"{LAYER}.mlp.c_proj"),
    heads={
        "GPT2Model": Head("causal_lm", lm=True),
        "GPT2LMHeadModel": Head("causal_lm", lm=True,
                                tensors=(("lm_head.projection", "lm_head"),)),
        "GPT2ForSequenceClassification": Head(
            "classification", lm=False, config={"task_head": "sequence_classification"},
            tensors=(("head.classifier", "score"),)),
    },
    # old checkpoints carry the causal-mask buffers; the output projection is tied to wte
    optional=("h.{i}.attn.bias", "h.{i}.attn.masked_bias", "lm_head.weight"),
))
