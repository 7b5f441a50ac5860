"""The model config: one dataclass describes every architecture ferry builds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ferry.errors import FerryError

ARCHITECTURES = ("encoder-decoder", "encoder-only", "decoder-only")
# Named variants; each value says which paper or model family uses it.
POSITIONALS = ("sinusoidal", "sinusoidal_concat", "learned", "rotary", "relative_bias",
               "relative_xl")
ROPE_SCALINGS = ("none", "linear", "llama3")
NORMS = ("layernorm", "rmsnorm")
FEED_FORWARDS = ("plain", "gated")
ATTENTION_BIASES = ("all", "qkv", "none")
ATTENTION_SCALES = ("inverse_sqrt", "none")
LM_HEAD_SCALES = ("none", "inverse_sqrt_d_model")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
EMBEDDING_SCALES = ("sqrt_d_model", "none")
EMBEDDING_NORMS = ("none", "layernorm")
LM_HEAD_TRANSFORMS = ("none", "dense_norm")
# Heads on top of the final states besides the LM head (see `ferry.model.heads`).
TASK_HEADS = ("none", "sequence_classification", "token_classification", "question_answering")
POOLED_POSITIONS = ("auto", "first", "last")


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
    # cosines (fairseq, Marian); "learned": a trained table per stack (BERT, GPT-2, BART);
    # "rotary": queries and keys rotated by their position (RoFormer, Su et al. 2021; Llama,
    # Mistral, Qwen); "relative_bias": a learned per-head bias for each bucketed query-key
    # distance, shared by a stack's layers (T5, Raffel et al. 2020); "relative_xl": sinusoids
    # of the query-key distance projected inside attention, with relative segment encodings
    # and segment recurrence (Transformer-XL, Dai et al. 2019; XLNet, Yang et al. 2019; an
    # encoder-only model, see `ferry.model.recurrent_encoder`)
    positional: str = "sinusoidal"
    position_offset: int = 0  # positions start at this table row (BART, mBART, RoBERTa: 2)
    rope_theta: float = 10000.0  # rotary: the base of the rotation wavelengths
    # rotary frequency scaling for contexts longer than pretraining: "linear" (positions ÷
    # factor, Chen et al. 2023), "llama3" (Llama 3.1's per-wavelength interpolation)
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 scaling: wavelengths above context/low are scaled
    rope_high_freq_factor: float = 4.0  # llama3 scaling: those below context/high are kept
    rope_original_max_positions: int = 8192  # llama3 scaling: the pretraining context
    relative_attention_num_buckets: int = 32  # relative_bias: distance buckets (T5: 32)
    relative_attention_max_distance: int = 128  # relative_bias: beyond it, one bucket (T5: 128)
    clamp_distance: int = 0  # relative_xl: |distances| beyond it count as it (clamp_len); 0: none
    # relative_xl: states of earlier segments each layer keeps attending to (Transformer-XL's
    # memory, XLNet's mem_len); exported graphs then take and return it, and the runtime reads
    # inputs longer than max_positions segment by segment; 0: no memory
    memory_length: int = 0
    # token embeddings × √d_model ("sqrt_d_model": the paper, Marian, mBART) or as they are
    # ("none": BERT, RoBERTa, GPT-2, BART)
    embedding_scale: str = "sqrt_d_model"
    # "layernorm": a LayerNorm over token + position (+ segment) embeddings, per stack (BERT,
    # RoBERTa, BART, mBART); "none": the paper, GPT-2, Marian
    embedding_norm: str = "none"
    # "post": LayerNorm after each residual (the paper); "pre": before each sublayer, stabler deep
    norm_placement: str = "post"
    # "layernorm" (Ba et al. 2016: centred, with a bias); "rmsnorm" (Zhang & Sennrich 2019:
    # scaled by the root mean square, no bias: T5, Llama, Mistral, Qwen)
    norm: str = "layernorm"
    # FFN non-linearity: "relu" (paper), "gelu" (BERT, BART), "gelu_tanh" (GPT-2's gelu_new),
    # "silu" (Marian's swish)
    activation: str = "relu"
    # "plain": act(x W1) W2 (the paper); "gated": (act(x Wg) ⊙ x W1) W2, GLU variants (Shazeer
    # 2020): with silu SwiGLU (Llama, Mistral, Qwen), with gelu_tanh GeGLU (T5 v1.1, Flan-T5)
    feed_forward: str = "plain"
    ffn_bias: bool = True  # biases in the FFN's projections (False: T5, Llama, Mistral, Qwen)
    # key/value heads: 0 = num_heads (multi-head); fewer share each K/V head among a group of
    # query heads (grouped-query attention, Ainslie et al. 2023; 1: multi-query, Shazeer 2019)
    num_kv_heads: int = 0
    head_size: int = 0  # width of each head; 0 = d_model // num_heads (T5's d_kv, Qwen3)
    # biases in the attention projections: "all" (the paper, BERT, GPT-2, BART), "qkv" (query,
    # key and value only: Qwen2), "none" (T5, Llama, Mistral, Qwen3)
    attention_bias: str = "all"
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys (Qwen3)
    # attention scores × "inverse_sqrt" 1/√head_size (the paper) or "none" (T5, whose
    # initialisation folds the scale into the query weights)
    attention_scale: str = "inverse_sqrt"
    tie_embeddings: bool = True  # output projection shares the token embedding matrix
    # "dense_norm": dense + activation + LayerNorm before the vocabulary projection (the MLM
    # heads of BERT and RoBERTa); "none": the projection alone
    lm_head_transform: str = "none"
    # a bias on the vocabulary logits (BERT's MLM decoder bias, BART's final_logits_bias)
    lm_head_bias: bool = False
    # final states × 1/√d_model before the vocabulary projection ("inverse_sqrt_d_model": T5
    # v1.0's tied output projection)
    lm_head_scale: str = "none"
    layer_norm_eps: float = 1e-5
    # factorised embedding parameterisation (ALBERT, Lan et al. 2020): token, position and
    # segment embeddings of this width, projected to d_model at the start of each stack, and an
    # MLM head transforming d_model back to it before the tied projection; 0: d_model wide,
    # no projection
    embedding_size: int = 0
    # cross-layer parameter sharing (ALBERT): a stack's layers share this many sets of weights,
    # layer i using set ⌊i · groups / layers⌋ (1: every layer the same weights); 0: none
    layer_groups: int = 0
    type_vocab_size: int = 0  # segment (token type) embeddings for sentence pairs; 0: none
    task_head: str = "none"  # a head of TASK_HEADS on an encoder-only / decoder-only model
    num_labels: int = 0  # classes of the task head
    # the position a sequence classification head pools: "first" (BERT's [CLS], through a
    # dense + tanh pooler), "last" (the last real token through the pooler: XLNet's <cls> at
    # the end); "auto": first for encoders, the last real token without pooler for decoder-only
    pooled_position: str = "auto"
    head_bias: bool = True  # the task head's output layer has a bias (False: GPT-2's score layer)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = {"int": int, "float": (int, float), "str": str, "bool": bool}[f.type]
            if not isinstance(value, kind) or (f.type != "bool" and isinstance(value, bool)):
                raise FerryError(f"invalid model config: {f.name} must be {f.type}, "
                                 f"got {value!r}")
        sizes = ("vocab_size", "d_model", "num_heads", "d_ff", "max_positions",
                 "relative_attention_num_buckets", "relative_attention_max_distance",
                 "rope_original_max_positions")
        counts = ("num_encoder_layers", "num_decoder_layers", "type_vocab_size", "num_labels",
                  "position_offset", "num_kv_heads", "head_size", "embedding_size",
                  "layer_groups", "clamp_distance", "memory_length")
        for name in sizes + counts:
            minimum = 0 if name in counts else 1
            if getattr(self, name) < minimum:
                raise FerryError(f"invalid model config: {name} must be ≥ {minimum}, "
                                 f"got {getattr(self, name)}")
        checks = [
            (self.architecture in ARCHITECTURES, f"architecture must be one of {ARCHITECTURES}"),
            (self.head_size > 0 or self.d_model % self.num_heads == 0,
             "d_model must be divisible by num_heads (or set head_size)"),
            (self.num_heads % self.kv_heads == 0,
             "num_heads must be a multiple of num_kv_heads"),
            (self.positional in POSITIONALS, f"positional must be one of {POSITIONALS}"),
            (self.positional != "rotary" or self.head_dim % 2 == 0,
             "rotary positions need an even head size"),
            (self.positional != "relative_bias" or self.architecture != "decoder-only",
             "relative_bias positions need an encoder (T5); decoder-only models use rotary"),
            (self.positional != "relative_xl" or self.architecture == "encoder-only",
             "relative_xl positions are XLNet's: they need an encoder-only model"),
            (self.positional == "relative_xl" or self.memory_length == 0,
             "memory_length (segment recurrence) needs relative_xl positions"),
            (self.positional != "relative_xl" or self.type_vocab_size == 0,
             "relative_xl encodes segments inside attention: set type_vocab_size to 0"),
            (self.pooled_position in POOLED_POSITIONS,
             f"pooled_position must be one of {POOLED_POSITIONS}"),
            (self.pooled_position == "auto" or self.architecture == "encoder-only",
             "pooled_position first|last needs an encoder-only model"),
            (self.rope_scaling in ROPE_SCALINGS, f"rope_scaling must be one of {ROPE_SCALINGS}"),
            (self.rope_theta > 0 and self.rope_scaling_factor > 0,
             "rope_theta and rope_scaling_factor must be > 0"),
            (self.rope_high_freq_factor > self.rope_low_freq_factor > 0,
             "rope_high_freq_factor must exceed rope_low_freq_factor > 0"),
            (self.norm in NORMS, f"norm must be one of {NORMS}"),
            (self.feed_forward in FEED_FORWARDS, f"feed_forward must be one of {FEED_FORWARDS}"),
            (self.attention_bias in ATTENTION_BIASES,
             f"attention_bias must be one of {ATTENTION_BIASES}"),
            (self.attention_scale in ATTENTION_SCALES,
             f"attention_scale must be one of {ATTENTION_SCALES}"),
            (self.lm_head_scale in LM_HEAD_SCALES,
             f"lm_head_scale must be one of {LM_HEAD_SCALES}"),
            (self.norm_placement in ("post", "pre"), "norm_placement must be post|pre"),
            (self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}"),
            (self.embedding_scale in EMBEDDING_SCALES,
             f"embedding_scale must be one of {EMBEDDING_SCALES}"),
            (self.embedding_norm in EMBEDDING_NORMS,
             f"embedding_norm must be one of {EMBEDDING_NORMS}"),
            (self.lm_head_transform in LM_HEAD_TRANSFORMS,
             f"lm_head_transform must be one of {LM_HEAD_TRANSFORMS}"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (all(self.layer_groups <= n for n in self.stack_depths),
             "layer_groups must not exceed a stack's layers"),
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
        """Width of each attention head."""
        return self.head_size or self.d_model // self.num_heads

    @property
    def embedding_width(self) -> int:
        """Width of the token, position and segment embeddings (ALBERT: narrower than d_model)."""
        return self.embedding_size or self.d_model

    @property
    def segment_inputs(self) -> bool:
        """Whether the model reads segment ids (`token_type_ids`): segment embeddings, or
        relative_xl's relative segment encodings."""
        return self.type_vocab_size > 0 or self.positional == "relative_xl"

    @property
    def stack_depths(self) -> tuple[int, ...]:
        """The layers of each stack the architecture has."""
        return tuple(n for n, present in ((self.num_encoder_layers, self.has_encoder),
                                          (self.num_decoder_layers, self.has_decoder)) if present)

    @property
    def kv_heads(self) -> int:
        """Key/value heads (fewer than `num_heads` under grouped-query attention)."""
        return self.num_kv_heads or self.num_heads

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
