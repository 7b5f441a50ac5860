"""Named model sizes: plain functions with literal numbers; `preset(name, **overrides)`.

`tiny` … `big` are the paper's Transformer; `bert_base`, `albert_base`, `xlnet_base`, `gpt2_small`,
`bart_base`,
`marian_base`, `t5_small` and `llama_small` are those families' shapes and options, so a model
trained from one of them exports to Hugging Face (`ferry export hf`) as that family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ferry.errors import FerryError
from ferry.model.config import TransformerConfig


def tiny() -> TransformerConfig:
    """For tests: trains and exports in seconds."""
    return TransformerConfig(
        d_model=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, d_ff=128,
        dropout=0.0, max_positions=128, vocab_size=1000,
    )


def small() -> TransformerConfig:
    """The demo's size: learns the date task on two CPU cores in a few minutes."""
    return TransformerConfig(
        d_model=128, num_heads=4, num_encoder_layers=3, num_decoder_layers=3, d_ff=512,
        dropout=0.1, max_positions=128, vocab_size=2000, norm_placement="pre",
    )


def base() -> TransformerConfig:
    """Transformer base from the paper: d_model 512, 8 heads, 6+6 layers, FFN 2048."""
    return TransformerConfig(
        d_model=512, num_heads=8, num_encoder_layers=6, num_decoder_layers=6, d_ff=2048,
        dropout=0.1, max_positions=512, vocab_size=32000,
    )


def big() -> TransformerConfig:
    """Transformer big from the paper: d_model 1024, 16 heads, 6+6 layers, FFN 4096."""
    return TransformerConfig(
        d_model=1024, num_heads=16, num_encoder_layers=6, num_decoder_layers=6, d_ff=4096,
        dropout=0.3, max_positions=512, vocab_size=32000,
    )


def albert_base() -> TransformerConfig:
    """ALBERT-base's shape and options (Lan et al., 2020): 128-wide embeddings projected to 768,
    12 layers sharing one set of weights (12 M parameters); exports to Hugging Face as ALBERT."""
    return TransformerConfig(
        architecture="encoder-only", d_model=768, num_heads=12, num_encoder_layers=12,
        num_decoder_layers=0, d_ff=3072, dropout=0.0, max_positions=512, vocab_size=30000,
        positional="learned", embedding_scale="none", embedding_norm="layernorm",
        activation="gelu_tanh", layer_norm_eps=1e-12, type_vocab_size=2,
        lm_head_transform="dense_norm", lm_head_bias=True, embedding_size=128, layer_groups=1,
    )


def bert_base() -> TransformerConfig:
    """BERT-base's shape and options (Devlin et al., 2019): exports to Hugging Face as BERT."""
    return TransformerConfig(
        architecture="encoder-only", d_model=768, num_heads=12, num_encoder_layers=12,
        num_decoder_layers=0, d_ff=3072, dropout=0.1, max_positions=512, vocab_size=30522,
        positional="learned", embedding_scale="none", embedding_norm="layernorm",
        activation="gelu", layer_norm_eps=1e-12, type_vocab_size=2,
        lm_head_transform="dense_norm", lm_head_bias=True,
    )


def gpt2_small() -> TransformerConfig:
    """GPT-2 small's shape and options (Radford et al., 2019): exports as GPT-2."""
    return TransformerConfig(
        architecture="decoder-only", d_model=768, num_heads=12, num_encoder_layers=0,
        num_decoder_layers=12, d_ff=3072, dropout=0.1, max_positions=1024, vocab_size=50257,
        positional="learned", embedding_scale="none", norm_placement="pre",
        activation="gelu_tanh", head_bias=False,
    )


def bart_base() -> TransformerConfig:
    """BART-base's shape and options (Lewis et al., 2020): exports as BART."""
    return TransformerConfig(
        d_model=768, num_heads=12, num_encoder_layers=6, num_decoder_layers=6, d_ff=3072,
        dropout=0.1, max_positions=1024, vocab_size=50265, positional="learned",
        position_offset=2, embedding_scale="none", embedding_norm="layernorm",
        activation="gelu", lm_head_bias=True,
    )


def marian_base() -> TransformerConfig:
    """An opus-mt Marian model's shape and options: the paper's base Transformer with SiLU and
    concatenated sinusoids; exports as Marian."""
    return TransformerConfig(
        d_model=512, num_heads=8, num_encoder_layers=6, num_decoder_layers=6, d_ff=2048,
        dropout=0.1, max_positions=512, vocab_size=58101, positional="sinusoidal_concat",
        activation="silu", lm_head_bias=True,
    )


def t5_small() -> TransformerConfig:
    """Flan-T5-small's shape and options (T5 v1.1, Raffel et al. 2020; Chung et al. 2022):
    RMSNorm, relative position bias, GeGLU, no biases, unscaled attention; exports as T5."""
    return TransformerConfig(
        d_model=512, num_heads=6, head_size=64, num_encoder_layers=8, num_decoder_layers=8,
        d_ff=1024, dropout=0.1, max_positions=512, vocab_size=32128, positional="relative_bias",
        norm="rmsnorm", norm_placement="pre", layer_norm_eps=1e-6, embedding_scale="none",
        feed_forward="gated", activation="gelu_tanh", ffn_bias=False, attention_bias="none",
        attention_scale="none", tie_embeddings=False,
    )


def llama_small() -> TransformerConfig:
    """SmolLM-135M's shape with Llama's options (Touvron et al., 2023): RMSNorm, rotary
    positions, SwiGLU, grouped-query attention (9 query heads share 3 key/value heads), no
    biases, tied embeddings; exports as Llama."""
    return TransformerConfig(
        architecture="decoder-only", d_model=576, num_heads=9, num_kv_heads=3,
        num_encoder_layers=0, num_decoder_layers=30, d_ff=1536, dropout=0.0,
        max_positions=2048, vocab_size=49152, positional="rotary", rope_theta=10000.0,
        norm="rmsnorm", norm_placement="pre", embedding_scale="none", feed_forward="gated",
        activation="silu", ffn_bias=False, attention_bias="none", head_bias=False,
    )


def xlnet_base() -> TransformerConfig:
    """XLNet-base's shape and options (Yang et al., 2019): 12 post-norm layers with Transformer-XL
    relative attention and relative segments, 384 states of memory (its pretraining's mem_len);
    exports to Hugging Face as XLNet."""
    return TransformerConfig(
        architecture="encoder-only", d_model=768, num_heads=12, num_encoder_layers=12,
        num_decoder_layers=0, d_ff=3072, dropout=0.1, max_positions=512, vocab_size=32000,
        positional="relative_xl", memory_length=384, embedding_scale="none",
        attention_bias="none", activation="gelu", layer_norm_eps=1e-12, lm_head_bias=True,
    )


PRESETS: dict[str, Callable[[], TransformerConfig]] = {
    "tiny": tiny, "small": small, "base": base, "big": big, "bert_base": bert_base,
    "albert_base": albert_base, "xlnet_base": xlnet_base,
    "gpt2_small": gpt2_small, "bart_base": bart_base, "marian_base": marian_base,
    "t5_small": t5_small, "llama_small": llama_small,
}


def preset(name: str, **overrides) -> TransformerConfig:
    """The named preset with any fields replaced, e.g. `preset("base", vocab_size=8000)`."""
    if name not in PRESETS:
        raise FerryError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[name]()
    return TransformerConfig.from_dict({**dataclasses.asdict(config), **overrides})
