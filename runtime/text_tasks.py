"""Text ↔ arrays for the task heads, shared by training and the runtime (numpy only).

- single texts and sentence pairs → padded ids, mask and segment ids;
- words ↔ sub-word tokens (sequence labelling labels each word's first token);
- BIO tags → entity spans (`tag`; training's entity-level F1);
- answer character span ↔ token span, and the best span from start/end logits (extractive QA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding, Tokenizer

from ferry.batching import padding_mask, right_padded
from ferry.errors import FerryError
from ferry.graph_spec import MEMORY_INPUTS
from ferry.runtime.tokenization import encode_each, text_list


@dataclass(frozen=True)
class EncodedBatch:
    """A padded batch: (B, S) int64 ids, mask and segment ids, plus the tokenizer encodings
    (offsets into the texts)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    encodings: list[Encoding]

    def feed(self, input_names: list[str]) -> dict[str, np.ndarray]:
        """The arrays a graph with these inputs takes."""
        arrays = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                  "token_type_ids": self.token_type_ids}
        return {name: arrays[name] for name in input_names if name not in MEMORY_INPUTS}


_TRUNCATING: dict[tuple[int, int, int, str], tuple[Tokenizer, Tokenizer]] = {}


def truncating(tokenizer: Tokenizer, max_length: int, *, stride: int = 0,
               strategy: str = "longest_first") -> Tokenizer:
    """A copy of `tokenizer` that cuts every encoding to `max_length` tokens (special tokens
    included), as Hugging Face's `truncation=True, max_length=…`; with `stride`, the cut-off
    tokens come back as overlapping windows in `Encoding.overflowing` (for extractive QA).
    The shared tokenizer itself is never changed; copies are made once per setting."""
    key = (id(tokenizer), max_length, stride, strategy)
    cached = _TRUNCATING.get(key)
    if cached is None or cached[0] is not tokenizer:
        copy = Tokenizer.from_str(tokenizer.to_str())
        copy.no_padding()
        copy.enable_truncation(max_length, stride=stride, strategy=strategy)
        # the original is kept alongside, so its id cannot be reused by another tokenizer
        cached = _TRUNCATING[key] = (tokenizer, copy)
    return cached[1]


def truncation_length(truncation: bool | int, max_length: int) -> int | None:
    """The token count to cut inputs to: None (no cutting: too long is an error), the model's
    `max_length` (`True`), or a given count (an int, at most `max_length`)."""
    if truncation is False:
        return None
    if truncation is True:
        return max_length
    if not isinstance(truncation, int) or not 1 <= truncation <= max_length:
        raise FerryError(f"truncation must be True, False or a token count in [1, {max_length}] "
                         f"(the model's positions), got {truncation!r}")
    return truncation


def pad_encodings(encodings: list[Encoding], *, pad: int) -> EncodedBatch:
    """Encodings → a right-padded batch of ids, mask and segment ids."""
    rows = [e.ids for e in encodings]
    return EncodedBatch(right_padded(rows, pad), padding_mask(rows),  # (B, S) each
                        right_padded([e.type_ids for e in encodings], 0), encodings)


def encode_texts(tokenizer: Tokenizer, texts: list[str], pairs: list[str] | None = None, *,
                 pad: int, max_length: int, truncation: bool | int = False) -> EncodedBatch:
    """Texts (or text pairs: `text </s> pair </s>`, the pair in segment 1) → a padded batch.
    An input longer than `max_length` tokens is refused with its index, unless `truncation`
    (True: to `max_length`; an int: to that many tokens) cuts it."""
    texts = text_list(texts)
    pairs = None if pairs is None else text_list(pairs, "pairs")
    if pairs is not None and len(pairs) != len(texts):
        raise FerryError(f"{len(texts)} texts but {len(pairs)} pairs; give one pair per text")
    limit = truncation_length(truncation, max_length)
    encoder = tokenizer if limit is None else truncating(tokenizer, limit)
    encodings = encode_each(encoder, list(zip(texts, pairs)) if pairs is not None else texts)
    longest = max(len(e.ids) for e in encodings)
    if longest > max_length:
        index = max(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        raise FerryError(f"input {index} is {longest} tokens long but the model has "
                         f"{max_length} positions; shorten it or pass truncation=True "
                         "(--truncate on the command line)")
    return pad_encodings(encodings, pad=pad)


def word_spans(words: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Words joined by spaces, and each word's (start, end) character span in that text."""
    spans, position = [], 0
    for word in words:
        spans.append((position, position + len(word)))
        position += len(word) + 1
    return " ".join(words), spans


def first_tokens(encoding: Encoding, spans: list[tuple[int, int]]) -> list[int]:
    """The index of each word's first sub-word token (-1 for a word with no token of its own,
    e.g. cut off by truncation). A token belongs to the word holding its last character, so a
    byte-level token that carries the preceding space still maps to its word."""
    first = [-1] * len(spans)
    word_of = {}
    for w, (start, end) in enumerate(spans):
        for c in range(start, end):
            word_of[c] = w
    for t, (start, end) in enumerate(encoding.offsets):
        if end <= start or encoding.special_tokens_mask[t]:
            continue
        w = word_of.get(end - 1)
        if w is not None and first[w] == -1:
            first[w] = t
    return first


def bio_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word + 1) of every entity in a BIO tag sequence; an `I-X` that
    does not continue an `X` starts a new entity (as conlleval counts it)."""
    entities: list[tuple[str, int, int]] = []
    current: list | None = None
    for i, tag in enumerate(tags + ["O"]):
        prefix, _, kind = tag.partition("-")
        continues = current is not None and prefix == "I" and kind == current[0]
        if current is not None and not continues:
            entities.append((current[0], current[1], i))
            current = None
        if prefix in ("B", "I") and not continues:
            current = [kind, i]
    return entities


def context_tokens(encoding: Encoding) -> np.ndarray:
    """(S,) bool: the tokens of the second sequence (the context of a question/context pair)."""
    return np.array([seq == 1 and not special and end > start for seq, special, (start, end) in
                     zip(encoding.sequence_ids, encoding.special_tokens_mask, encoding.offsets)],
                    dtype=bool)


def answer_token_span(encoding: Encoding, start_char: int, end_char: int) -> tuple[int, int] | None:
    """The (first, last) context tokens overlapping the answer's characters, or None when the
    answer is not inside the encoded context."""
    inside = [t for t, ((start, end), ctx) in enumerate(zip(encoding.offsets,
                                                               context_tokens(encoding)))
              if ctx and start < end_char and end > start_char]
    return (inside[0], inside[-1]) if inside else None


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, allowed: np.ndarray,
              max_answer_tokens: int) -> tuple[int, int, float]:
    """(first, last, score) maximising start + end logits over allowed tokens with
    first ≤ last < first + max_answer_tokens."""
    length = len(start_logits)
    scores = start_logits[:, None] + end_logits[None, :]  # (S, S): [first, last]
    offsets = np.arange(length)[None, :] - np.arange(length)[:, None]  # last - first
    valid = (offsets >= 0) & (offsets < max_answer_tokens) & allowed[:, None] & allowed[None, :]
    if not valid.any():
        raise FerryError("the context has no tokens to answer from; give a non-empty context")
    scores = np.where(valid, scores, -np.inf)
    first, last = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return int(first), int(last), float(scores[first, last])

