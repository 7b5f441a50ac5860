"""Generation arguments: Hugging Face `generate()`'s names, meaning what they mean there.

Every argument ferry accepts behaves as in `transformers` (the oracle tests in
`tests/test_generate_oracle.py` hold ferry's tokens against `generate()`'s); the few deliberate
differences are listed in `DIFFERENCES` (and docs/runtime.md). A `generate()` argument ferry
does not implement is refused by name with the reason (`REFUSED`), never accepted and ignored.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ferry.errors import FerryError

DEFAULT_MAX_NEW_TOKENS = 64

# Hugging Face generate() arguments ferry does not implement, with why and what to use.
REFUSED = {
    "num_beam_groups": "group (diverse) beam search is not implemented (transformers 5 moved "
                       "it out of its core too)",
    "diversity_penalty": "group (diverse) beam search is not implemented",
    "penalty_alpha": "contrastive search is not implemented",
    "guidance_scale": "classifier-free guidance is not implemented",
    "sequence_bias": "not implemented; bad_words_ids bans sequences",
    "encoder_repetition_penalty": "not implemented",
    "encoder_no_repeat_ngram_size": "not implemented",
    "prefix_allowed_tokens_fn": "constrained decoding by callback is not implemented",
    "constraints": "constrained beam search is not implemented",
    "force_words_ids": "constrained beam search is not implemented",
    "assistant_model": "assisted (speculative) decoding is not implemented",
    "max_time": "not implemented; bound the output with max_new_tokens",
    "return_dict_in_generate": "use generate_output() for scores alongside the ids",
    "output_logits": "use generate_output(): it returns each chosen token's log-probability",
    "output_attentions": "not available from the exported graphs",
    "output_hidden_states": "not available from the exported graphs",
    "bos_token_id": "the decoder starts from decoder_start_token_id (or the bundle's)",
    "forced_decoder_ids": "deprecated in transformers; use forced_bos_token_id",
    "low_memory": "not implemented",
    "top_h": "not implemented",
    "watermarking_config": "not implemented",
}

# Where ferry deliberately differs from transformers' generate() (docs/runtime.md has this table).
DIFFERENCES = {
    "max_new_tokens": "defaults to 64 new tokens (transformers: max_length=20 in all)",
    "seed": "ferry's own: sampling draws from a seeded numpy generator, so a seed gives the "
            "same samples on every backend (not the same samples as torch's RNG)",
    "output_scores": "generate_output() returns each chosen token's log-probability under the "
                     "processed distribution (what compute_transition_scores gives), not the "
                     "full per-step score matrix",
    "num_beams with do_sample": "beam sampling is not implemented",
    "use_cache": "always True: ferry decodes with its KV cache (False is refused)",
}


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens: greedy, beam search or sampling, with optional constraints."""

    max_new_tokens: int | None = None  # None: from max_length, else DEFAULT_MAX_NEW_TOKENS
    max_length: int | None = None  # prompt (decoder-only) or decoder start + new tokens
    min_new_tokens: int = 0  # EOS is suppressed until this many tokens have been generated
    min_length: int = 0  # EOS is suppressed while the sequence (as max_length counts) is shorter
    do_sample: bool = False
    temperature: float = 1.0  # sampling: logits / temperature
    top_k: int = 50  # sampling: keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # sampling: keep the smallest set whose probability reaches top_p
    min_p: float = 0.0  # sampling: drop tokens below min_p × the top token's probability
    typical_p: float = 1.0  # sampling: locally typical sampling's mass
    epsilon_cutoff: float = 0.0  # sampling: drop tokens below this probability
    eta_cutoff: float = 0.0  # sampling: entropy-dependent cutoff (eta sampling)
    seed: int | None = None  # sampling: numpy seed; None draws fresh entropy
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum of log-probs / length ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False or "never"
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0  # CTRL: > 1 discourages tokens already in the sequence
    no_repeat_ngram_size: int = 0  # forbid repeating any n-gram of this size; 0 disables
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences never generated
    suppress_tokens: tuple[int, ...] = ()  # token ids never generated
    begin_suppress_tokens: tuple[int, ...] = ()  # token ids not generated first
    forced_bos_token_id: int | None = None  # forced when the sequence has one token
    forced_eos_token_id: int | None = None  # forced as the last token the length allows
    # (start, factor): after `start` new tokens, EOS's score grows by factor ** (n - start)
    exponential_decay_length_penalty: tuple[int, float] | None = None
    renormalize_logits: bool = False  # log-softmax the scores again after every processor
    stop_strings: tuple[str, ...] = ()  # stop a sequence once its text ends in one of these
    eos_token_id: tuple[int, ...] | None = None  # ends a sequence; default: the bundle's
    pad_token_id: int | None = None  # fills finished rows; default: the bundle's
    decoder_start_token_id: int | None = None  # encoder-decoders; default: the bundle's
    use_cache: bool = True  # ferry always decodes with its KV cache
    # greedy / sampling: compute each chosen token's log-probability (a log-softmax over the
    # vocabulary per step); off, token scores are 0. Beam search always scores.
    output_scores: bool = False

    def new_tokens(self, prompt_length: int) -> int:
        """How many tokens to generate after a sequence of `prompt_length` tokens (the
        decoder start token, or a decoder-only model's padded prompt)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return self.max_length - prompt_length
        return DEFAULT_MAX_NEW_TOKENS

    def validate(self, *, vocab_size: int, max_positions: int) -> GenerationConfig:
        """Raise FerryError naming the first invalid argument; returns self."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _has_type(value, str(f.type)):
                raise FerryError(f"invalid generation argument {f.name}={value!r}: expected "
                                 f"{f.type}")
        limit = f"between 1 and the model's {max_positions} decoder positions"
        checks = [
            ("max_new_tokens", self.max_new_tokens is None
             or 1 <= self.max_new_tokens <= max_positions, limit),
            ("max_length", self.max_length is None or 1 <= self.max_length <= 2 * max_positions,
             "a positive length"),
            ("min_new_tokens", self.min_new_tokens >= 0, "≥ 0"),
            ("min_length", self.min_length >= 0, "≥ 0"),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_k", self.top_k >= 0, "≥ 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("typical_p", 0 < self.typical_p <= 1, "in (0, 1]"),
            ("epsilon_cutoff", 0 <= self.epsilon_cutoff < 1, "in [0, 1)"),
            ("eta_cutoff", 0 <= self.eta_cutoff < 1, "in [0, 1)"),
            ("num_beams", self.num_beams >= 1, "≥ 1"),
            ("num_return_sequences", self.num_return_sequences >= 1, "≥ 1"),
            ("num_return_sequences",
             self.do_sample or self.num_return_sequences <= self.num_beams,
             "≤ num_beams (or use do_sample)"),
            ("num_beams", not (self.do_sample and self.num_beams > 1),
             "1 when do_sample is set (beam sampling is not supported)"),
            ("early_stopping", self.early_stopping in (True, False, "never"),
             'True, False or "never"'),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, "≥ 0"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "None or an integer ≥ 0"),
            ("exponential_decay_length_penalty", self.exponential_decay_length_penalty is None
             or (self.exponential_decay_length_penalty[0] >= 0
                 and self.exponential_decay_length_penalty[1] > 0), "(start ≥ 0, factor > 0)"),
            ("bad_words_ids", all(self.bad_words_ids), "non-empty token sequences"),
            ("stop_strings", all(self.stop_strings), "non-empty strings"),
            ("eos_token_id", self.eos_token_id is None or len(self.eos_token_id) > 0,
             "a token id or a non-empty list of them"),
            ("use_cache", self.use_cache, "True (ferry always decodes with its KV cache; "
                                          "the tokens are the same)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise FerryError(f"invalid generation argument {name}={getattr(self, name)!r}: "
                                 f"expected {expected}")
        tokens = {
            "forced_bos_token_id": [self.forced_bos_token_id],
            "forced_eos_token_id": [self.forced_eos_token_id],
            "pad_token_id": [self.pad_token_id],
            "decoder_start_token_id": [self.decoder_start_token_id],
            "eos_token_id": list(self.eos_token_id or ()),
            "suppress_tokens": list(self.suppress_tokens),
            "begin_suppress_tokens": list(self.begin_suppress_tokens),
            "bad_words_ids": [t for words in self.bad_words_ids for t in words],
        }
        for name, ids in tokens.items():
            bad = [t for t in ids if t is not None and not 0 <= t < vocab_size]
            if bad:
                raise FerryError(f"invalid generation argument {name}: {bad} are not token ids "
                                 f"in [0, {vocab_size})")
        return self

    @classmethod
    def from_kwargs(cls, **kwargs) -> GenerationConfig:
        """A config from keyword arguments (lists become tuples, one eos id a 1-tuple); a
        `generate()` argument ferry does not implement is refused with why, an unknown name
        with the known ones."""
        refused = sorted(set(kwargs) & set(REFUSED))
        if refused:
            raise FerryError(f"generation argument {refused[0]} is not supported by ferry: "
                             f"{REFUSED[refused[0]]}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise FerryError(f"unknown generation argument(s) {unknown}; known: {known}")
        if isinstance(kwargs.get("eos_token_id"), int) and not isinstance(
                kwargs["eos_token_id"], bool):
            kwargs["eos_token_id"] = (kwargs["eos_token_id"],)
        for name in ("suppress_tokens", "begin_suppress_tokens", "eos_token_id", "stop_strings",
                     "exponential_decay_length_penalty"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        if isinstance(kwargs.get("stop_strings"), str):
            kwargs["stop_strings"] = (kwargs["stop_strings"],)
        if isinstance(kwargs.get("bad_words_ids"), list | tuple):
            kwargs["bad_words_ids"] = tuple(
                tuple(words) if isinstance(words, list | tuple) else words
                for words in kwargs["bad_words_ids"])
        return cls(**kwargs)


def _has_type(value: object, annotation: str) -> bool:
    """`value` against a field's annotation (`int`, `float`, `bool`, `int | None`,
    `tuple[int, ...]`, …); bools are not ints here, and floats must be finite."""
    for kind in (k.strip() for k in annotation.split("|")):
        if kind == "None" and value is None:
            return True
        if kind == "int" and _is_int(value):
            return True
        if kind == "float" and _is_number(value):
            return True
        if kind == "bool" and isinstance(value, bool):
            return True
        if kind == "str" and isinstance(value, str):
            return True
        if kind == "tuple[int, ...]" and isinstance(value, tuple) and all(map(_is_int, value)):
            return True
        if kind == "tuple[str, ...]" and isinstance(value, tuple) and all(
                isinstance(v, str) for v in value):
            return True
        if kind == "tuple[tuple[int, ...], ...]" and isinstance(value, tuple) and all(
                isinstance(v, tuple) and all(map(_is_int, v)) for v in value):
            return True
        if kind == "tuple[int, float]" and isinstance(value, tuple) and len(value) == 2 and \
                _is_int(value[0]) and _is_number(value[1]):
            return True
    return False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))
