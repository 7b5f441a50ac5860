"""The one generation loop, shared by every backend: encoder once, decoder step by step.

The loop only calls `GraphBackend.infer` on name-keyed numpy arrays, so a parity difference between
backends points at a backend, never at a second copy of the search code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ferry.errors import FerryError
from ferry.runtime.backends.base import Feed, GraphBackend


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eos: int


def renamed(outputs: Feed, old: str, new: str) -> Feed:
    """Outputs whose names start with `old` (e.g. present_), keyed with `new` (e.g. past_)."""
    return {new + k[len(old):]: v for k, v in outputs.items() if k.startswith(old)}


def greedy_generate(
    graphs: dict[str, GraphBackend],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    special: SpecialIds,
    max_new_tokens: int,
) -> np.ndarray:
    """Greedy decoding with the self-attention KV cache over a padded batch.

    Args:
        graphs: the `encoder`, `decoder_init` and `decoder_step` graph backends.
        input_ids: (B, S) int64 source ids, right-padded.
        attention_mask: (B, S) int64, 1 on real tokens.
        max_new_tokens: stop after this many generated tokens.

    Returns:
        (B, N) int64 generated ids, N ≤ max_new_tokens; each row ends at its EOS and is padded
        after it. Generation stops when every row has produced EOS.
    """
    longest = graphs["decoder_step"].spec.dims["past_len"].max + 1  # decoder positions
    if not 1 <= max_new_tokens <= longest:
        raise FerryError(f"max_new_tokens must be between 1 and the model's {longest} decoder "
                         f"positions, got {max_new_tokens}")
    batch = input_ids.shape[0]
    encoded = graphs["encoder"].infer({"input_ids": input_ids, "attention_mask": attention_mask})
    cross = renamed(encoded, "cross_", "cross_")  # (B, nh, S, hs) per layer, computed once
    outputs = graphs["decoder_init"].infer({
        "input_ids": np.full((batch, 1), special.bos, dtype=np.int64),
        "encoder_attention_mask": attention_mask, **cross,
    })
    finished = np.zeros(batch, dtype=bool)
    generated: list[np.ndarray] = []
    for step in range(max_new_tokens):
        next_ids = outputs["logits"][:, -1].argmax(axis=-1).astype(np.int64)  # (B,)
        next_ids = np.where(finished, special.pad, next_ids)
        generated.append(next_ids)
        finished |= next_ids == special.eos
        if finished.all() or step == max_new_tokens - 1:
            break
        outputs = graphs["decoder_step"].infer({
            "input_ids": next_ids[:, None], "encoder_attention_mask": attention_mask,
            **cross, **renamed(outputs, "present_", "past_"),
        })
    return np.stack(generated, axis=1)  # (B, N)
