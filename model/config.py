"""The model config: one dataclass describes every architecture ferry builds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ferry.errors import FerryError

ARCHITECTURES = ("encoder-decoder", "encoder-only", "decoder-only")
# Named variants; each value says which paper or model family uses it.
POSITIONALS = ("sinusoidal", "sinusoidal_concat", "learned")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
EMBEDDING_SCALES = ("sqrt_d_model", "none")
EMBEDDING_NORMS = ("none", "layernorm")
LM_HEAD_TRANSFORMS = ("none", "dense_norm")
# Heads on top of the final states besides the LM head (see `ferry.model.heads`).
TASK_HEADS = ("none", "sequence_classification", "token_classification", "question_answering")


@dataclass(frozen=True)
class TransformerConfig:
    """Shape and options of a Transformer ("Attention Is All You Need" and its descendants)."""

    architecture: str = "encoder-decoder"  # "encoder-decoder" | "encoder-only" | "decoder-only"
    vocab_size: int = 32000
    d_model: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6  # ignored by decoder-only models
    num_decoder_layers: int = 6  # ignored by encoder-only models
    d_ff: int = 2048  # inner size of the position-wise feed-forward network
    dropout: float = 0.1
    max_positions: int = 512  # longest sequence the positional encoding covers
    # "sinusoidal": sin/cos interleaved (the paper); "sinusoidal_concat": all sines, then all
    # cosines (fairseq, Marian); "learned": a trained table per stack (BERT, GPT-2, BART)
    positional: str = "sinusoidal"
    position_offset: int = 0  # positions start at this table row (BART, mBART, RoBERTa: 2)
    # token embeddings × √d_model ("sqrt_d_model": the paper, Marian, mBART) or as they are
    # ("none": BERT, RoBERTa, GPT-2, BART)
    embedding_scale: str = "sqrt_d_model"
    # "layernorm": a LayerNorm over token + position (+ segment) embeddings, per stack (BERT,
    # RoBERTa, BART, mBART); "none": the paper, GPT-2, Marian
    embedding_norm: str = "none"
    # "post": LayerNorm after each residual (the paper); "pre": before each sublayer, stabler deep
    norm_placement: str = "post"
    # FFN non-linearity: "relu" (paper), "gelu" (BERT, BART), "gelu_tanh" (GPT-2's gelu_new),
    # "silu" (Marian's swish)
    activation: str = "relu"
    tie_embeddings: bool = True  # output projection shares the token embedding matrix
    # "dense_norm": dense + activation + LayerNorm before the vocabulary projection (the MLM
    # heads of BERT and RoBERTa); "none": the projection alone
    lm_head_transform: str = "none"
    # a bias on the vocabulary logits (BERT's MLM decoder bias, BART's final_logits_bias)
    lm_head_bias: bool = False
    layer_norm_eps: float = 1e-5
    type_vocab_size: int = 0  # segment (token type) embeddings for sentence pairs; 0: none
    task_head: str = "none"  # a head of TASK_HEADS on an encoder-only / decoder-only model
    num_labels: int = 0  # classes of the task head
    head_bias: bool = True  # the task head's output layer has a bias (False: GPT-2's score layer)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = {"int": int, "float": (int, float), "str": str, "bool": bool}[f.type]
            if not isinstance(value, kind) or (f.type != "bool" and isinstance(value, bool)):
                raise FerryError(f"invalid model config: {f.name} must be {f.type}, "
                                 f"got {value!r}")
        sizes = ("vocab_size", "d_model", "num_heads", "d_ff", "max_positions")
        counts = ("num_encoder_layers", "num_decoder_layers", "type_vocab_size", "num_labels",
                  "position_offset")
        for name in sizes + counts:
            minimum = 0 if name in counts else 1
            if getattr(self, name) < minimum:
                raise FerryError(f"invalid model config: {name} must be ≥ {minimum}, "
                                 f"got {getattr(self, name)}")
        checks = [
            (self.architecture in ARCHITECTURES, f"architecture must be one of {ARCHITECTURES}"),
            (self.d_model % self.num_heads == 0, "d_model must be divisible by num_heads"),
            (self.positional in POSITIONALS, f"positional must be one of {POSITIONALS}"),
            (self.norm_placement in ("post", "pre"), "norm_placement must be post|pre"),
            (self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}"),
            (self.embedding_scale in EMBEDDING_SCALES,
             f"embedding_scale must be one of {EMBEDDING_SCALES}"),
            (self.embedding_norm in EMBEDDING_NORMS,
             f"embedding_norm must be one of {EMBEDDING_NORMS}"),
            (self.lm_head_transform in LM_HEAD_TRANSFORMS,
             f"lm_head_transform must be one of {LM_HEAD_TRANSFORMS}"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.type_vocab_size == 0 or self.architecture == "encoder-only",
             "type_vocab_size (segment embeddings) needs an encoder-only model"),
            (self.task_head in TASK_HEADS, f"task_head must be one of {TASK_HEADS}"),
            (self.task_head == "none" or self.architecture != "encoder-decoder",
             "an encoder-decoder model has no task head: train tasks text-to-text"),
            (self.task_head != "token_classification" or self.architecture == "encoder-only",
             "token_classification needs an encoder-only model"),
            (self.task_head != "question_answering" or self.architecture == "encoder-only",
             "question_answering needs an encoder-only model"),
            (self.num_labels >= 2 if self.task_head.endswith("classification")
             else self.num_labels == 0,
             "num_labels must be ≥ 2 with a classification head and 0 with any other"),
        ]
        for ok, message in checks:
            if not ok:
                raise FerryError(f"invalid model config: {message} (got {self})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def has_encoder(self) -> bool:
        return self.architecture in ("encoder-decoder", "encoder-only")

    @property
    def has_decoder(self) -> bool:
        return self.architecture in ("encoder-decoder", "decoder-only")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TransformerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FerryError(
                f"unknown model config key(s) {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**data)
