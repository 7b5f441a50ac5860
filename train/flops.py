"""Model FLOPs per training step and the device's peak, for model FLOPs utilisation (MFU).

Counts the matmul FLOPs the model must do (forward + backward = 3 × forward, 2 FLOPs per
multiply-add) on the padded batch: the weight matmuls (6 × parameters × tokens, per stack) and the
attention score / value matmuls (12 × layers × d_model × context, per token). Embedding lookups,
norms and softmax are not counted, as in the PaLM MFU convention.
"""

from __future__ import annotations

import weakref

import torch

from ferry.model import Transformer

# Dense bf16/fp16 tensor-core peaks (FLOP/s) by GPU name fragment; TF32 is half of these.
GPU_PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
    "L40": 181e12, "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12,
}


_PARAM_COUNTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stack_params(model: Transformer) -> tuple[int, int]:
    """(encoder, decoder) parameter counts, computed once per model (called every step)."""
    if model not in _PARAM_COUNTS:
        _PARAM_COUNTS[model] = tuple(
            0 if stack is None else sum(p.numel() for p in stack.parameters())
            for stack in (model.encoder, model.decoder))
    return _PARAM_COUNTS[model]


def training_flops(model: Transformer, *, source_tokens: int, target_tokens: int,
                   source_len: int, target_len: int) -> float:
    """FLOPs of one forward + backward pass over a padded batch.

    Args:
        source_tokens / target_tokens: padded token counts through the encoder / decoder
            (for decoder-only models, pass the sequence as target and 0 as source).
        source_len / target_len: padded lengths, the attention context.
    """
    config = model.config
    d, layers_enc, layers_dec = config.d_model, config.num_encoder_layers, config.num_decoder_layers
    encoder_params, decoder_params = _stack_params(model)
    weight = 6 * encoder_params * source_tokens
    weight += 6 * (decoder_params + d * config.vocab_size) * target_tokens
    if model.encoder is None:
        layers_enc = 0
    attention = 12 * layers_enc * d * source_len * source_tokens
    if model.decoder is not None:
        cross = source_len if config.architecture == "encoder-decoder" else 0
        attention += 12 * layers_dec * d * (target_len + cross) * target_tokens
    return float(weight + attention)


def peak_flops(device: torch.device, precision: str, configured_tflops: float = 0.0
               ) -> float | None:
    """The device's peak FLOP/s for this precision, or None when unknown (then no MFU)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peak in GPU_PEAK_BF16.items():
        if fragment in name:
            return peak if precision in ("bf16", "fp16") else peak / 2
    return None
