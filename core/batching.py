"""Rows into batches and batches into rows: right padding, and running a batch in chunks.

Shared by the runtime (tokenised inputs, generation and task inference in chunks of a graph's
batch range) and training (label and id tensors), so there is one padding rule.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def right_padded(rows: Sequence[Sequence[int]], pad: int, *, dtype=np.int64) -> np.ndarray:
    """Rows of different lengths → (B, S) array, S the longest row (at least 1), each row
    padded with `pad` on the right."""
    out = np.full((len(rows), max((len(r) for r in rows), default=0) or 1), pad, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def padding_mask(rows: Sequence[Sequence[int]]) -> np.ndarray:
    """(B, S) int64: 1 over each row's tokens, 0 over the padding `right_padded` adds."""
    return right_padded([[1] * len(r) for r in rows], 0)


def row_chunks(count: int, size: int) -> Iterator[slice]:
    """Slices that cover `count` rows in chunks of at most `size` (a graph's batch range)."""
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def joined_rows(pieces: Sequence[np.ndarray], pad=0) -> np.ndarray:
    """Chunks' outputs stacked along rows; 2-D pieces of different widths are first padded on
    the right with `pad` to the widest (generated sequences end at different lengths)."""
    if pieces[0].ndim < 2:
        return np.concatenate(pieces)
    width = max(p.shape[1] for p in pieces)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), *[(0, 0)] * (p.ndim - 2)),
                                  constant_values=pad) for p in pieces])
