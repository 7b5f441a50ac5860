"""The one definition of the Transformer, used by training, export and the torch runtime backend.

    from ferry.model import Transformer, TransformerConfig, preset
    model = Transformer(preset("tiny", vocab_size=1000))
"""

from ferry.model.checkpoint import load_checkpoint, save_checkpoint
from ferry.model.config import TransformerConfig
from ferry.model.presets import PRESETS, preset
from ferry.model.transformer import Transformer

__all__ = [
    "PRESETS",
    "Transformer",
    "TransformerConfig",
    "load_checkpoint",
    "preset",
    "save_checkpoint",
]
