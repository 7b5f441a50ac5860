"""Text ↔ padded id arrays, through the bundle's `tokenizer.json` (Hugging Face tokenizers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ferry.batching import padding_mask, right_padded
from ferry.errors import FerryError


def text_list(texts: object, what: str = "texts") -> list[str]:
    """`texts` as a list of strings: one string, or a list / tuple of strings; anything else
    (nested lists, numbers, bytes) is one error naming `what`."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, list | tuple) and texts and all(isinstance(t, str) for t in texts):
        return list(texts)
    if isinstance(texts, list | tuple) and not texts:
        raise FerryError(f"no input {what} given")
    bad = next((t for t in texts if not isinstance(t, str)), texts) if isinstance(
        texts, list | tuple) else texts
    raise FerryError(f"{what} must be a string or a list of strings, got {type(bad).__name__} "
                     f"{bad!r:.60}")


def encode_each(tokenizer: Tokenizer, inputs: list, **options) -> list:
    """What `tokenizer.encode_batch(inputs, **options)` returns (inputs: texts or (text, pair)
    tuples), each input encoded on the calling thread, which keeps the GIL. `encode_batch`
    hands even one input to the tokenizers' own thread pool and releases the GIL for it: in a
    server, whose event loop, batch worker and ONNX Runtime threads already share the cores,
    the demo model served ~7 points of offline throughput less that way (13 alternating runs
    on a 2-core VM, docs/serve.md)."""
    return [tokenizer.encode(*item, **options) if isinstance(item, tuple)
            else tokenizer.encode(item, **options) for item in inputs]


def decode_each(tokenizer: Tokenizer, rows: list[list[int]]) -> list[str]:
    """`tokenizer.decode_batch(rows, skip_special_tokens=True)` on the calling thread (see
    `encode_each`)."""
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]


class TextCodec:
    """Encodes batches of text into padded (B, S) int64 ids + mask, and decodes ids to text."""

    def __init__(self, tokenizer: Tokenizer, *, pad_id: int, max_length: int,
                 add_special_tokens: bool = True, prompts: bool = False) -> None:
        """`prompts`: texts to be continued (decoder-only models): the tokenizer's leading
        special tokens are added (Llama's `<s>`, as Hugging Face's tokenizer adds it), its
        trailing ones are not (a `</s>` would end the text being continued)."""
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.max_length = max_length
        self.add_special_tokens = add_special_tokens
        self.trailing_specials = (
            self._trailing_special_count() if prompts and add_special_tokens else 0)

    def _trailing_special_count(self) -> int:
        """How many special tokens the tokenizer's post-processor appends to a single text."""
        probe = "a"
        bare = self.tokenizer.encode(probe, add_special_tokens=False).ids
        full = self.tokenizer.encode(probe, add_special_tokens=True).ids
        for start in range(len(full) - len(bare) + 1):
            if full[start:start + len(bare)] == bare:
                return len(full) - start - len(bare)
        return 0

    @classmethod
    def from_file(cls, path: str | Path, *, pad_id: int, max_length: int) -> TextCodec:
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise FerryError(f"{path} is not a readable tokenizer.json ({exc})") from exc
        return cls(tokenizer, pad_id=pad_id, max_length=max_length)

    def encode(self, texts: list[str], truncation: bool | int = False, *,
               add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Texts → (B, S) int64 ids right-padded with pad, and the (B, S) int64 1/0 mask. A
        text longer than the model's positions is refused, unless `truncation` (True: to the
        positions; an int: to that many tokens) cuts its end, as Hugging Face's
        `truncation=True, max_length=…` does. `add_special_tokens=False` encodes the text
        alone (a chat prompt writes its special tokens itself)."""
        from ferry.runtime.text_tasks import truncating, truncation_length

        limit = truncation_length(truncation, self.max_length)
        encoder = self.tokenizer if limit is None else truncating(self.tokenizer, limit)
        special = self.add_special_tokens and add_special_tokens
        trailing = self.trailing_specials if special else 0
        rows = [e.ids[:len(e.ids) - trailing] for e in encode_each(
            encoder, text_list(texts), add_special_tokens=special)]
        return pad_rows(rows, pad_id=self.pad_id, max_length=self.max_length)

    def decode(self, ids: np.ndarray) -> list[str]:
        """(B, T) ids → texts, special tokens (pad, eos, …) dropped."""
        return decode_each(self.tokenizer, [list(map(int, row)) for row in ids])


def pad_rows(
    rows: list[list[int]], *, pad_id: int, max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length id rows → (B, S) ids and mask; refuses a row longer than `max_length`."""
    longest = max(len(r) for r in rows)
    if longest > max_length:
        index = max(range(len(rows)), key=lambda i: len(rows[i]))
        raise FerryError(
            f"input {index} is {longest} tokens long but the model has {max_length} positions; "
            "shorten it or pass truncation=True (--truncate on the command line)"
        )
    return right_padded(rows, pad_id), padding_mask(rows)  # (B, S) each
