"""ALBERT (Lan et al., 2020): BERT with factorised embeddings (E-wide token, position and segment
embeddings projected to the hidden size) and cross-layer parameter sharing (the layers applied
in turn from `num_hidden_groups` sets of weights), pretrained with masked LM and sentence-order
prediction.

ferry's `embedding_size` and `layer_groups` are the two ideas; a group of more than one layer
(`inner_group_num` > 1, used by no released checkpoint) is refused.
"""

from __future__ import annotations

from ferry.model.families.bert import (
    CONFIG_FIELDS,
    FIXED,
    HF_DEFAULTS,
    bert_derived,
    hf_common,
    mlm_tensors,
    zero_segments,
)
from ferry.model.families.family import Family, Head, register_family

LAYER = "encoder.albert_layer_groups.{i}.albert_layers.0"  # {i}: the group (a set of weights)
BODY = (
    ("embedding.tokens", "embeddings.word_embeddings"),
    ("embedding.segments", "embeddings.token_type_embeddings"),
    ("encoder.embed.learned_positions", "embeddings.position_embeddings"),
    ("encoder.embed.norm", "embeddings.LayerNorm"),
    ("encoder.embed.project", "encoder.embedding_hidden_mapping_in"),
    ("encoder.layers.{i}.self_attn.q_proj", f"{LAYER}.attention.query"),
    ("encoder.layers.{i}.self_attn.k_proj", f"{LAYER}.attention.key"),
    ("encoder.layers.{i}.self_attn.v_proj", f"{LAYER}.attention.value"),
    ("encoder.layers.{i}.self_attn.out_proj", f"{LAYER}.attention.dense"),
    ("encoder.layers.{i}.attn_residual.norm", f"{LAYER}.attention.LayerNorm"),
    ("encoder.layers.{i}.ffn.up", f"{LAYER}.ffn"),
    ("encoder.layers.{i}.ffn.down", f"{LAYER}.ffn_output"),
    ("encoder.layers.{i}.ffn_residual.norm", f"{LAYER}.full_layer_layer_norm"),
    ("head.pooler", "pooler"),
)
MLM = mlm_tensors("predictions", "dense", "LayerNorm")
MLM_CONFIG = {"lm_head_transform": "dense_norm", "lm_head_bias": True}
SOP = ("in_order", "swapped")  # sop_classifier: 0 = the segments in order, 1 = swapped
CLASSIFIER = {"task_head": "sequence_classification"}

ALBERT = register_family(Family(
    model_type="albert",
    body_prefix="albert",
    base_class="AlbertModel",
    config_fields={**CONFIG_FIELDS, "embedding_size": "embedding_size",
                   "layer_groups": "num_hidden_groups"},
    fixed={**FIXED, "position_offset": 0},
    requires={"position_embedding_type": ("absolute",), "inner_group_num": (1,)},
    hf_defaults={**HF_DEFAULTS, "hidden_act": "gelu_new", "embedding_size": 128,
                 "num_hidden_groups": 1, "inner_group_num": 1, "pad_token_id": 0},
    derived=bert_derived,
    hf_config=lambda ferry: {
        **hf_common(ferry), "inner_group_num": 1,
        "max_position_embeddings": ferry["max_positions"],
        "embedding_size": ferry["embedding_size"] or ferry["d_model"],
        "num_hidden_groups": ferry["layer_groups"] or ferry["num_encoder_layers"]},
    tensors=BODY,
    zeros_for_hf=zero_segments,
    heads={
        "AlbertModel": Head("encoder", lm=False),
        "AlbertForMaskedLM": Head("masked_lm", lm=True, config=MLM_CONFIG, tensors=MLM),
        "AlbertForPreTraining": Head(
            "masked_lm_sop", lm=True, labels=SOP,
            config={**MLM_CONFIG, **CLASSIFIER, "num_labels": 2},
            tensors=(*MLM, ("head.classifier", "sop_classifier.classifier"))),
        "AlbertForSequenceClassification": Head(
            "classification", lm=False, config=CLASSIFIER,
            tensors=(("head.classifier", "classifier"),)),
        "AlbertForTokenClassification": Head(
            "token_classification", lm=False, config={"task_head": "token_classification"},
            tensors=(("head.classifier", "classifier"),)),
        "AlbertForQuestionAnswering": Head(
            "question_answering", lm=False, config={"task_head": "question_answering"},
            tensors=(("head.span", "qa_outputs"),)),
    },
    optional=("embeddings.position_ids", "embeddings.token_type_ids",
              "predictions.decoder.weight", "pooler.weight", "pooler.bias"),
    special_tokens={"pad": "pad_token", "bos": "cls_token", "eos": "sep_token",
                    "unk": "unk_token", "mask": "mask_token"},
))
