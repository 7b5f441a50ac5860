"""Task files read as rows of strings, texts turned into token-id examples and padded batches,
and the seeded order in which the training loop reads the examples (`global_batch_indices`)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from ferry.batching import right_padded
from ferry.errors import FerryError
from ferry.records import read_records


def read_jsonl(path: str | Path, fields: list[str]) -> list[dict[str, str]]:
    """The string `fields` of every row of a task file (see `read_records`)."""
    return [values for _, values in read_records(path, dict.fromkeys(fields, str))]


def encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of every text (with the tokenizer's trailing EOS)."""
    return [e.ids for e in tokenizer.encode_batch(texts)]


def pad_tensor(rows: list[list[int]], pad: int) -> torch.Tensor:
    """Right-pad id rows into a (B, T) int64 tensor."""
    return torch.from_numpy(right_padded(rows, pad))


@functools.lru_cache(maxsize=2)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded permutation (int64 array: 8 bytes per example, so millions of blocks fit)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).numpy()


def global_batch_indices(step: int, *, num_examples: int, batch_size: int, seed: int
                         ) -> list[int]:
    """Example indices of optimizer step `step` (1-based).

    Each epoch is a fresh seeded permutation; its last partial batch is dropped, so every step
    sees `batch_size` examples. A pure function of the step: a resumed run reads exactly the
    data the uninterrupted run would have read.
    """
    if num_examples < batch_size:
        raise FerryError(f"the training split has {num_examples} examples, fewer than "
                         f"batch_size {batch_size}; lower optim.batch_size")
    per_epoch = num_examples // batch_size
    epoch, position = divmod(step - 1, per_epoch)
    start = position * batch_size
    return _epoch_order(num_examples, seed, epoch)[start : start + batch_size].tolist()
