"""XLNet (Yang et al., 2019): a post-norm encoder with Transformer-XL relative attention, relative
segment encodings and segment recurrence, pretrained by permutation language modelling.

ferry's `positional: relative_xl` is the whole attention scheme (`ferry.model.recurrent_encoder`);
`mem_len` becomes `memory_length`, `clamp_len` `clamp_distance`. Its attention projections are
stored as bare (d_model, heads, head_dim) tensors (`head_split`). Options of the original
pretraining pipeline that change the forward pass (`bi_data`, `same_length`, `reuse_len`, the
unidirectional `attn_type`) and `XLNetForQuestionAnswering`'s beam-search head are refused by name.
"""

from __future__ import annotations

from ferry.model.families.family import HF_ACTIVATIONS, Family, Head, hf_activation, register_family

LAYER = "layer.{i}"
PROJECTIONS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o", "position_proj": "r"}
BODY = (
    ("embedding.tokens", "word_embedding"),
    ("encoder.query_embedding", "mask_emb"),
    *((f"encoder.layers.{{i}}.self_attn.{ours}.weight", f"{LAYER}.rel_attn.{theirs}")
      for ours, theirs in PROJECTIONS.items()),
    ("encoder.layers.{i}.self_attn.content_bias", f"{LAYER}.rel_attn.r_w_bias"),
    ("encoder.layers.{i}.self_attn.position_bias", f"{LAYER}.rel_attn.r_r_bias"),
    ("encoder.layers.{i}.self_attn.segment_bias", f"{LAYER}.rel_attn.r_s_bias"),
    ("encoder.layers.{i}.self_attn.segment_embed", f"{LAYER}.rel_attn.seg_embed"),
    ("encoder.layers.{i}.attn_residual.norm", f"{LAYER}.rel_attn.layer_norm"),
    ("encoder.layers.{i}.ffn.up", f"{LAYER}.ff.layer_1"),
    ("encoder.layers.{i}.ffn.down", f"{LAYER}.ff.layer_2"),
    ("encoder.layers.{i}.ffn_residual.norm", f"{LAYER}.ff.layer_norm"),
)
# o maps heads → d_model and is stored (d_model, heads, head_dim): already (out, in) once flat
IN_OUT = tuple(f"{LAYER}.rel_attn.{theirs}" for theirs in ("q", "k", "v", "r"))


def xlnet_derived(hf: dict) -> dict:
    return {"activation": hf_activation(hf["ff_activation"], "ff_activation"),
            "memory_length": hf["mem_len"] or 0, "clamp_distance": max(hf["clamp_len"], 0),
            "head_size": hf["d_head"] or hf["d_model"] // hf["n_head"],
            # relative positions have no table: the longest segment ferry's graphs take
            "max_positions": 512}


def xlnet_config(ferry: dict) -> dict:
    return {"ff_activation": {v: k for k, v in HF_ACTIVATIONS.items()}[ferry["activation"]],
            "mem_len": ferry["memory_length"] or None, "clamp_len": ferry["clamp_distance"] or -1,
            "d_head": ferry["head_size"] or ferry["d_model"] // ferry["num_heads"],
            "attn_type": "bi", "bi_data": False, "same_length": False, "reuse_len": None,
            "summary_type": "last", "summary_use_proj": True, "summary_activation": "tanh"}


XLNET = register_family(Family(
    model_type="xlnet",
    body_prefix="transformer",
    base_class="XLNetModel",
    config_fields={"vocab_size": "vocab_size", "d_model": "d_model", "num_heads": "n_head",
                   "num_encoder_layers": "n_layer", "d_ff": "d_inner", "dropout": "dropout",
                   "layer_norm_eps": "layer_norm_eps"},
    fixed={"architecture": "encoder-only", "num_decoder_layers": 0, "positional": "relative_xl",
           "embedding_scale": "none", "embedding_norm": "none",
           "norm_placement": "post", "attention_bias": "none", "tie_embeddings": True,
           "type_vocab_size": 0, "head_bias": True},
    requires={"attn_type": ("bi",), "bi_data": (False,), "same_length": (False,),
              "reuse_len": (None, 0), "summary_type": ("last",), "summary_use_proj": (True,),
              "summary_activation": ("tanh",)},
    hf_defaults={"d_model": 1024, "n_layer": 24, "n_head": 16, "d_inner": 4096,
                 "ff_activation": "gelu", "layer_norm_eps": 1e-12, "dropout": 0.1,
                 "mem_len": 512, "reuse_len": None, "clamp_len": -1, "attn_type": "bi",
                 "bi_data": False, "same_length": False, "d_head": None,
                 "summary_type": "last", "summary_use_proj": True,
                 "summary_activation": "tanh", "pad_token_id": 5},
    derived=xlnet_derived,
    hf_config=xlnet_config,
    tensors=BODY,
    head_split=(*IN_OUT, f"{LAYER}.rel_attn.o"),
    transposed=IN_OUT,
    heads={
        "XLNetModel": Head("encoder", lm=False),
        "XLNetLMHeadModel": Head("permutation_lm", lm=True, config={"lm_head_bias": True},
                                 tensors=(("lm_head.bias", "lm_loss.bias"),)),
        "XLNetForSequenceClassification": Head(
            "classification", lm=False,
            config={"task_head": "sequence_classification", "pooled_position": "last"},
            tensors=(("head.pooler", "sequence_summary.summary"),
                     ("head.classifier", "logits_proj"))),
        "XLNetForTokenClassification": Head(
            "token_classification", lm=False, config={"task_head": "token_classification"},
            tensors=(("head.classifier", "classifier"),)),
        "XLNetForQuestionAnsweringSimple": Head(
            "question_answering", lm=False, config={"task_head": "question_answering"},
            tensors=(("head.span", "qa_outputs"),)),
    },
    optional=("lm_loss.weight",),
))
