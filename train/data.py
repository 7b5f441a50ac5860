"""Reading task files and turning them into token-id examples and padded batches."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from ferry.errors import FerryError
from ferry.runtime.records import read_records


def read_jsonl(path: str | Path, fields: list[str]) -> list[dict[str, str]]:
    """The string `fields` of every row of a task file (see `read_records`)."""
    return [values for _, values in read_records(path, dict.fromkeys(fields, str))]


def encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of every text (with the tokenizer's trailing EOS)."""
    return [e.ids for e in tokenizer.encode_batch(texts)]


def pad_tensor(rows: list[list[int]], pad: int) -> torch.Tensor:
    """Right-pad id rows into a (B, T) int64 tensor."""
    out = np.full((len(rows), max(len(r) for r in rows)), pad, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


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
