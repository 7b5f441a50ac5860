"""BERT (Devlin et al., 2019) and RoBERTa (Liu et al., 2019): post-norm encoders with learned
positions, segment embeddings and a LayerNorm over the summed embeddings.

RoBERTa differs in data only: positions count from `padding_idx + 1` (row 2), one segment, and
its heads' tensor names.
"""

from __future__ import annotations

from ferry.model.families.family import HF_ACTIVATIONS, Family, Head, hf_activation, register_family

LAYER = "encoder.layer.{i}"
BODY = (
    ("embedding.tokens", "embeddings.word_embeddings"),
    ("embedding.segments", "embeddings.token_type_embeddings"),
    ("encoder.embed.learned_positions", "embeddings.position_embeddings"),
    ("encoder.embed.norm", "embeddings.LayerNorm"),
    ("encoder.layers.{i}.self_attn.q_proj", f"{LAYER}.attention.self.query"),
    ("encoder.layers.{i}.self_attn.k_proj", f"{LAYER}.attention.self.key"),
    ("encoder.layers.{i}.self_attn.v_proj", f"{LAYER}.attention.self.value"),
    ("encoder.layers.{i}.self_attn.out_proj", f"{LAYER}.attention.output.dense"),
    ("encoder.layers.{i}.attn_residual.norm", f"{LAYER}.attention.output.LayerNorm"),
    ("encoder.layers.{i}.ffn.up", f"{LAYER}.intermediate.dense"),
    ("encoder.layers.{i}.ffn.down", f"{LAYER}.output.dense"),
    ("encoder.layers.{i}.ffn_residual.norm", f"{LAYER}.output.LayerNorm"),
)
CONFIG_FIELDS = {
    "vocab_size": "vocab_size", "d_model": "hidden_size", "num_heads": "num_attention_heads",
    "num_encoder_layers": "num_hidden_layers", "d_ff": "intermediate_size",
    "dropout": "hidden_dropout_prob", "layer_norm_eps": "layer_norm_eps",
    "type_vocab_size": "type_vocab_size",
}
FIXED = {
    "architecture": "encoder-only", "num_decoder_layers": 0, "positional": "learned",
    "embedding_scale": "none", "embedding_norm": "layernorm", "norm_placement": "post",
    "head_bias": True,
}
REQUIRES = {"position_embedding_type": ("absolute",), "is_decoder": (False,),
            "add_cross_attention": (False,)}
HF_DEFAULTS = {"hidden_act": "gelu", "hidden_dropout_prob": 0.1, "layer_norm_eps": 1e-12,
               "type_vocab_size": 2, "max_position_embeddings": 512, "tie_word_embeddings": True,
               "position_embedding_type": "absolute", "is_decoder": False,
               "add_cross_attention": False}
MLM_CONFIG = {"lm_head_transform": "dense_norm", "lm_head_bias": True}
QA = Head("question_answering", lm=False, config={"task_head": "question_answering"},
          tensors=(("head.span", "qa_outputs"),))
TOKENS = Head("token_classification", lm=False, config={"task_head": "token_classification"},
              tensors=(("head.classifier", "classifier"),))
NSP = ("is_next", "random")  # BERT's seq_relationship: 0 = the next sentence, 1 = a random one


def mlm_tensors(prefix: str, dense: str, norm: str) -> tuple[tuple[str, ...], ...]:
    """An MLM head's tensors: transform, tied decoder, and the bias saved under two names."""
    return (("lm_head.dense", f"{prefix}.{dense}"), ("lm_head.norm", f"{prefix}.{norm}"),
            ("lm_head.bias", f"{prefix}.bias", f"{prefix}.decoder.bias"),
            ("lm_head.projection", f"{prefix}.decoder"))


def bert_derived(hf: dict) -> dict:
    return {"activation": hf_activation(hf["hidden_act"], "hidden_act"),
            "tie_embeddings": bool(hf["tie_word_embeddings"]),
            "max_positions": hf["max_position_embeddings"]}


def hf_common(ferry: dict) -> dict:
    return {"hidden_act": {v: k for k, v in HF_ACTIVATIONS.items()}[ferry["activation"]],
            "tie_word_embeddings": ferry["tie_embeddings"],
            "position_embedding_type": "absolute", "is_decoder": False,
            "add_cross_attention": False,
            "type_vocab_size": ferry["type_vocab_size"] or 1}  # a zero row: `zero_segments`


def zero_segments(ferry: dict) -> dict[str, tuple[int, ...]]:
    """A model without segment embeddings gets one zero row: the classes always hold them."""
    width = ferry.get("embedding_size") or ferry["d_model"]
    return {} if ferry["type_vocab_size"] else {
        "embeddings.token_type_embeddings.weight": (1, width)}


BERT = register_family(Family(
    model_type="bert",
    body_prefix="bert",
    base_class="BertModel",
    config_fields=CONFIG_FIELDS,
    fixed={**FIXED, "position_offset": 0},
    requires=REQUIRES,
    hf_defaults={**HF_DEFAULTS, "pad_token_id": 0},
    derived=bert_derived,
    hf_config=lambda ferry: {**hf_common(ferry),
                             "max_position_embeddings": ferry["max_positions"]},
    tensors=(*BODY, ("head.pooler", "pooler.dense")),
    zeros_for_hf=zero_segments,
    heads={
        "BertModel": Head("encoder", lm=False),
        "BertForMaskedLM": Head("masked_lm", lm=True, config=MLM_CONFIG,
                                tensors=mlm_tensors("cls.predictions", "transform.dense",
                                             "transform.LayerNorm")),
        "BertForPreTraining": Head(
            "masked_lm_nsp", lm=True, labels=NSP,
            config={**MLM_CONFIG, "task_head": "sequence_classification", "num_labels": 2},
            tensors=(*mlm_tensors("cls.predictions", "transform.dense", "transform.LayerNorm"),
                     ("head.classifier", "cls.seq_relationship"))),
        "BertForNextSentencePrediction": Head(
            "next_sentence", lm=False, labels=NSP,
            config={"task_head": "sequence_classification", "num_labels": 2},
            tensors=(("head.classifier", "cls.seq_relationship"),)),
        "BertForSequenceClassification": Head(
            "classification", lm=False, config={"task_head": "sequence_classification"},
            tensors=(("head.classifier", "classifier"),)),
        "BertForTokenClassification": TOKENS,
        "BertForQuestionAnswering": QA,
    },
    optional=("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids",
              "cls.predictions.decoder.weight"),
    special_tokens={"pad": "pad_token", "bos": "cls_token", "eos": "sep_token",
                    "unk": "unk_token", "mask": "mask_token"},
))


def _roberta_derived(hf: dict) -> dict:
    offset = hf["pad_token_id"] + 1  # positions count from the padding index + 1
    return {**bert_derived(hf), "position_offset": offset,
            "max_positions": hf["max_position_embeddings"] - offset}


ROBERTA = register_family(Family(
    model_type="roberta",
    body_prefix="roberta",
    base_class="RobertaModel",
    config_fields=CONFIG_FIELDS,
    fixed=FIXED,
    requires=REQUIRES,
    hf_defaults={**HF_DEFAULTS, "pad_token_id": 1},
    derived=_roberta_derived,
    hf_config=lambda ferry: {
        **hf_common(ferry),
        "max_position_embeddings": ferry["max_positions"] + ferry["position_offset"],
        "pad_token_id": ferry["position_offset"] - 1},
    tensors=BODY,
    zeros_for_hf=zero_segments,
    heads={
        "RobertaModel": Head("encoder", lm=False),
        "RobertaForMaskedLM": Head("masked_lm", lm=True, config=MLM_CONFIG,
                                   tensors=mlm_tensors("lm_head", "dense", "layer_norm")),
        "RobertaForSequenceClassification": Head(
            "classification", lm=False, config={"task_head": "sequence_classification"},
            tensors=(("head.pooler", "classifier.dense"),
                     ("head.classifier", "classifier.out_proj"))),
        "RobertaForTokenClassification": TOKENS,
        "RobertaForQuestionAnswering": QA,
    },
    optional=("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids",
              "lm_head.decoder.weight"),
))
