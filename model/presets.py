"""Named model sizes: plain functions with literal numbers; `preset(name, **overrides)`."""

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


PRESETS: dict[str, Callable[[], TransformerConfig]] = {
    "tiny": tiny, "small": small, "base": base, "big": big,
}


def preset(name: str, **overrides) -> TransformerConfig:
    """The named preset with any fields replaced, e.g. `preset("base", vocab_size=8000)`."""
    if name not in PRESETS:
        raise FerryError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[name]()
    return TransformerConfig.from_dict({**dataclasses.asdict(config), **overrides})
