"""Prompt-based classification: fill a template, score each label's word with the language model,
pick the best (PET / GPT-3 style). Shared by the runtime (zero- and few-shot) and training
(prompt-based fine-tuning), so both build exactly the same rows.

A template holds `{text}` (and `{text_pair}` for pairs) and `{label}` where the label word goes:
"{text} All in all, it was {label}." A masked LM sees `<mask>` tokens in place of the word and
scores them; a causal LM scores the word's tokens after the prefix. Few-shot examples are filled
with their own label word and put before the query, one per line (in-context learning).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from ferry.errors import FerryError

TEXT, PAIR, LABEL = "{text}", "{text_pair}", "{label}"


@dataclass(frozen=True)
class Prompt:
    """A template and a verbalizer: `labels[i]` is scored through the word `words[i]`."""

    template: str
    labels: tuple[str, ...]
    words: tuple[str, ...]

    @classmethod
    def parse(cls, template: str, labels: str | list[str]) -> Prompt:
        """`labels` as "a,b" or ["a", "b"]; `label=word` gives a label its own verbalizer word
        (e.g. "positive=great,negative=terrible")."""
        items = [x.strip() for x in (labels.split(",") if isinstance(labels, str) else labels)]
        items = [x for x in items if x]
        if len(items) < 2:
            raise FerryError(f"a prompt needs at least two labels, got {items}; pass e.g. "
                             "--labels positive,negative")
        if template.count(LABEL) != 1 or TEXT not in template:
            raise FerryError(f"a prompt template needs {TEXT} and exactly one {LABEL}, got "
                             f"{template!r}; e.g. \"{TEXT} It was {LABEL}.\"")
        names = tuple(x.partition("=")[0].strip() for x in items)
        words = tuple((x.partition("=")[2] or x.partition("=")[0]).strip() for x in items)
        if len(set(names)) != len(names):
            raise FerryError(f"prompt labels repeat: {list(names)}")
        return cls(template=template, labels=names, words=words)

    def to_dict(self) -> dict:
        return {"template": self.template, "labels": list(self.labels), "words": list(self.words)}

    @classmethod
    def from_dict(cls, data: dict) -> Prompt:
        return cls(template=data["template"], labels=tuple(data["labels"]),
                   words=tuple(data["words"]))

    def fill(self, text: str, pair: str | None, word: str) -> tuple[str, int, int]:
        """The filled template and the (start, end) characters of the label word in it."""
        if PAIR in self.template and pair is None:
            raise FerryError(f"the prompt template uses {PAIR}; give a pair for every text")
        before, after = self.template.split(LABEL)

        def put(part: str) -> str:
            return part.replace(TEXT, text).replace(PAIR, pair or "")

        prefix = put(before)
        return prefix + word + put(after), len(prefix), len(prefix) + len(word)

    def demonstrations(self, examples: list[tuple[str, str | None, str]]) -> str:
        """Few-shot examples (text, pair, label) filled with their label word, one per line."""
        lines = []
        for text, pair, label in examples:
            if label not in self.labels:
                raise FerryError(f"few-shot example label {label!r} is not one of {self.labels}")
            lines.append(self.fill(text, pair, self.words[self.labels.index(label)])[0] + "\n")
        return "".join(lines)


@dataclass(frozen=True)
class PromptRows:
    """One row per (input, label): ids, and where the label word's tokens are scored.

    `positions[r]` are the indices in row r whose logits score `targets[r]` (a masked LM reads
    the masked positions themselves; a causal LM the positions before them).
    """

    ids: list[list[int]]
    positions: list[list[int]]
    targets: list[list[int]]
    num_labels: int


@dataclass(frozen=True)
class FilledPrompt:
    """One (input, label) row as tokenized: its ids and which of them are the label word."""

    ids: list[int]
    label_tokens: list[int]


def filled_prompts(tokenizer: Tokenizer, prompt: Prompt, texts: list[str],
                   pairs: list[str] | None = None, *, max_length: int,
                   examples: list[tuple[str, str | None, str]] = ()) -> list[FilledPrompt]:
    """Every label of `prompt` filled in for every text and tokenized (row i·L + j: text i,
    label j). Training does this once per example; `model_rows` then makes the model's view."""
    context = prompt.demonstrations(list(examples))
    shift = len(context)
    rows = []
    for i, text in enumerate(texts):
        for word in prompt.words:
            filled, start, end = prompt.fill(text, pairs[i] if pairs else None, word)
            encoding = tokenizer.encode(context + filled)
            label_tokens = [t for t, (a, b) in enumerate(encoding.offsets)
                            if b > a and a < end + shift and b > start + shift]
            if not label_tokens:
                raise FerryError(f"the label word {word!r} has no tokens in the filled prompt")
            if len(encoding.ids) > max_length:
                raise FerryError(f"the filled prompt for input {i} is {len(encoding.ids)} tokens "
                                 f"but the model has {max_length} positions; shorten the input, "
                                 "the template or the examples")
            rows.append(FilledPrompt(list(encoding.ids), label_tokens))
    return rows


def model_rows(filled: list[FilledPrompt], *, num_labels: int, masked: bool, mask_id: int
               ) -> PromptRows:
    """What the model reads: a masked LM sees `<mask>` on the label word and scores those
    positions; a causal LM sees the word and scores it from the positions before."""
    ids, positions, targets = [], [], []
    for row in filled:
        if not masked and row.label_tokens[0] == 0:
            raise FerryError("a causal LM needs text before {label} in the template")
        words = [row.ids[t] for t in row.label_tokens]
        shown = list(row.ids)
        if masked:
            for t in row.label_tokens:
                shown[t] = mask_id
        ids.append(shown)
        positions.append(row.label_tokens if masked else [t - 1 for t in row.label_tokens])
        targets.append(words)
    return PromptRows(ids, positions, targets, num_labels)


def prompt_rows(tokenizer: Tokenizer, prompt: Prompt, texts: list[str],
                pairs: list[str] | None = None, *, masked: bool, mask_id: int, max_length: int,
                examples: list[tuple[str, str | None, str]] = ()) -> PromptRows:
    """Rows for scoring every label of `prompt` on every text (row i·L + j: text i, label j)."""
    filled = filled_prompts(tokenizer, prompt, texts, pairs, max_length=max_length,
                            examples=examples)
    return model_rows(filled, num_labels=len(prompt.words), masked=masked, mask_id=mask_id)


def label_scores(log_probs_at: list[np.ndarray], rows: PromptRows) -> np.ndarray:
    """(B, L) mean log-probability of each label word, from each row's (n, V) log-probs at its
    scored positions."""
    scores = np.array([float(lp[np.arange(len(t)), t].mean())
                       for lp, t in zip(log_probs_at, rows.targets)])
    return scores.reshape(-1, rows.num_labels)
