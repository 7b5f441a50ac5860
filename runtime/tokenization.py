"""Text ↔ padded id arrays, through the bundle's `tokenizer.json` (Hugging Face tokenizers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ferry.errors import FerryError


class TextCodec:
    """Encodes batches of text into padded (B, S) int64 ids + mask, and decodes ids to text."""

    def __init__(self, tokenizer: Tokenizer, *, pad_id: int, max_length: int,
                 add_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.max_length = max_length
        # False for decoder-only prompts: a trailing `</s>` would end the text being continued
        self.add_special_tokens = add_special_tokens

    @classmethod
    def from_file(cls, path: str | Path, *, pad_id: int, max_length: int) -> TextCodec:
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise FerryError(f"{path} is not a readable tokenizer.json ({exc})") from exc
        return cls(tokenizer, pad_id=pad_id, max_length=max_length)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts → (B, S) int64 ids right-padded with pad, and the (B, S) int64 1/0 mask."""
        if not texts:
            raise FerryError("no input texts given")
        rows = [e.ids for e in self.tokenizer.encode_batch(
            list(texts), add_special_tokens=self.add_special_tokens)]
        return pad_rows(rows, pad_id=self.pad_id, max_length=self.max_length)

    def decode(self, ids: np.ndarray) -> list[str]:
        """(B, T) ids → texts, special tokens (pad, eos, …) dropped."""
        return self.tokenizer.decode_batch([list(map(int, row)) for row in ids],
                                           skip_special_tokens=True)


def pad_rows(
    rows: list[list[int]], *, pad_id: int, max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length id rows → (B, S) ids and mask; refuses a row longer than `max_length`."""
    longest = max(len(r) for r in rows)
    if longest > max_length:
        index = max(range(len(rows)), key=lambda i: len(rows[i]))
        raise FerryError(
            f"input {index} is {longest} tokens long but the model has {max_length} positions; "
            "shorten the input"
        )
    ids = np.full((len(rows), max(longest, 1)), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask
