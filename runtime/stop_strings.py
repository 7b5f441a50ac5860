"""`stop_strings`: a sequence ends once its text ends in a stop string, as `transformers`'
`StopStringCriteria` decides it.

A stop string matches when it occurs in the text of the sequence's tokens and overlaps the last
token (it may start inside an earlier token and end inside the last one): checked after every
token, so a match anywhere earlier has already stopped the sequence. Each token's text is what
it adds to a decoded sequence (a byte-level `Ġ` or SentencePiece `▁` is a space), found once per
tokenizer by decoding it after a fixed prefix.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

_PREFIX = "abcdef"
_TOKEN_TEXTS: dict[int, tuple[Tokenizer, list[str]]] = {}


def token_texts(tokenizer: Tokenizer) -> list[str]:
    """Every token id's text (computed once per tokenizer)."""
    cached = _TOKEN_TEXTS.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        base = tokenizer.encode(_PREFIX, add_special_tokens=False).ids
        head = tokenizer.decode(base, skip_special_tokens=False)
        texts = tokenizer.decode_batch([base + [i] for i in range(tokenizer.get_vocab_size())],
                                       skip_special_tokens=False)
        cached = _TOKEN_TEXTS[id(tokenizer)] = (
            tokenizer, [t[len(head):] if t.startswith(head) else t for t in texts])
    return cached[1]


class StopStrings:
    """(N, T) sequences → (N,) whether each one's text ends in one of `strings`."""

    def __init__(self, tokenizer: Tokenizer, strings: tuple[str, ...]) -> None:
        self.texts = token_texts(tokenizer)
        self.strings = strings
        self.longest = max(len(s) for s in strings)

    def __call__(self, sequences: np.ndarray) -> np.ndarray:
        ended = np.zeros(len(sequences), dtype=bool)
        for row, ids in enumerate(sequences):
            last = self.texts[int(ids[-1])] if 0 <= ids[-1] < len(self.texts) else ""
            if not last:
                continue
            tail, position = last, len(ids) - 1
            while len(tail) < self.longest + len(last) and position > 0:
                position -= 1
                tail = self.texts[int(ids[position])] + tail
            before = len(tail) - len(last)  # where the last token's text starts in `tail`
            ended[row] = any(tail.find(s, max(0, before - len(s) + 1)) != -1
                             for s in self.strings)
        return ended
