"""Generation arguments, named as in Hugging Face `generate()` where they mean the same."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ferry.errors import FerryError


def _has_type(value: object, annotation: str) -> bool:
    """`value` against a field's annotation (`int`, `float`, `bool`, `int | None`,
    `tuple[int, ...]`); bools are not ints here, and floats must be finite."""
    for kind in (k.strip() for k in annotation.split("|")):
        if kind == "None" and value is None:
            return True
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if (kind == "float" and isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value)):
            return True
        if kind == "bool" and isinstance(value, bool):
            return True
        if kind == "tuple[int, ...]" and isinstance(value, tuple) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return True
    return False


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens: greedy, beam search or sampling, with optional constraints."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0  # EOS is suppressed until this many tokens have been generated
    do_sample: bool = False
    temperature: float = 1.0  # sampling: logits / temperature
    top_k: int = 0  # sampling: keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # sampling: keep the smallest set whose probability reaches top_p
    seed: int | None = None  # sampling: numpy seed; None draws fresh entropy
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum of log-probs / length ** length_penalty
    early_stopping: bool = False  # beam search stops once num_beams hypotheses are finished
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0  # CTRL: > 1 discourages tokens already generated
    no_repeat_ngram_size: int = 0  # forbid repeating any n-gram of this size; 0 disables
    suppress_tokens: tuple[int, ...] = ()  # token ids never generated
    forced_bos_token_id: int | None = None  # forced as the first generated token
    forced_eos_token_id: int | None = None  # forced as the token at max_new_tokens
    # greedy / sampling: compute each chosen token's log-probability (a log-softmax over the
    # vocabulary per step); off, token scores are 0. Beam search always scores.
    output_scores: bool = False

    def validate(self, *, vocab_size: int, max_positions: int) -> GenerationConfig:
        """Raise FerryError naming the first invalid argument; returns self."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _has_type(value, str(f.type)):
                raise FerryError(f"invalid generation argument {f.name}={value!r}: expected "
                                 f"{f.type}")
        checks = [
            ("max_new_tokens", 1 <= self.max_new_tokens <= max_positions,
             f"between 1 and the model's {max_positions} decoder positions"),
            ("min_new_tokens", 0 <= self.min_new_tokens <= self.max_new_tokens,
             "between 0 and max_new_tokens"),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_k", self.top_k >= 0, "≥ 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("num_beams", self.num_beams >= 1, "≥ 1"),
            ("num_return_sequences", self.num_return_sequences >= 1, "≥ 1"),
            ("num_return_sequences",
             self.do_sample or self.num_return_sequences <= self.num_beams,
             "≤ num_beams (or use do_sample)"),
            ("num_beams", not (self.do_sample and self.num_beams > 1),
             "1 when do_sample is set (beam sampling is not supported)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "None or an integer ≥ 0"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, "≥ 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise FerryError(f"invalid generation argument {name}={getattr(self, name)!r}: "
                                 f"expected {expected}")
        for name in ("forced_bos_token_id", "forced_eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < vocab_size:
                raise FerryError(f"invalid generation argument {name}={value}: expected a "
                                 f"token id in [0, {vocab_size})")
        bad = [t for t in self.suppress_tokens if not 0 <= t < vocab_size]
        if bad:
            raise FerryError(f"invalid generation argument suppress_tokens: {bad} are not token "
                             f"ids in [0, {vocab_size})")
        return self

    @classmethod
    def from_kwargs(cls, **kwargs) -> GenerationConfig:
        """A config from keyword arguments; an unknown name is an error listing the known."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise FerryError(f"unknown generation argument(s) {unknown}; known: {known}")
        if isinstance(kwargs.get("suppress_tokens"), list | tuple):
            kwargs["suppress_tokens"] = tuple(kwargs["suppress_tokens"])
        return cls(**kwargs)
