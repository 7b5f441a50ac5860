"""Logits processors and warpers, in numpy, shared by greedy, sampling and beam search.

Processors encode constraints (penalties, banned and forced tokens) and run in every mode;
warpers (temperature, top-k, top-p) reshape the distribution and run only when sampling. All
operate in place on (N, V) float32 scores, given the (N, t) tokens generated so far (the decoder
start token included, as Hugging Face does).
"""

from __future__ import annotations

import numpy as np

from ferry.runtime.generation_config import GenerationConfig

BANNED = np.float32(-np.inf)


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, V) scores, in float32; -inf entries stay -inf."""
    shifted = scores - scores.max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def apply_processors(scores: np.ndarray, tokens: np.ndarray, *, step: int, eos: int,
                     config: GenerationConfig) -> np.ndarray:
    """Constraints that hold in every decoding mode. `step` counts generated tokens so far."""
    if config.repetition_penalty != 1.0:
        for row, seen in enumerate(tokens):
            ids = np.unique(seen)
            values = scores[row, ids]
            scores[row, ids] = np.where(values < 0, values * config.repetition_penalty,
                                        values / config.repetition_penalty)
    if config.no_repeat_ngram_size > 0:
        _ban_repeated_ngrams(scores, tokens, config.no_repeat_ngram_size)
    if step < config.min_new_tokens:
        scores[:, eos] = BANNED
    if config.suppress_tokens:
        scores[:, list(config.suppress_tokens)] = BANNED
    forced = (config.forced_bos_token_id if step == 0 else
              config.forced_eos_token_id if step == config.max_new_tokens - 1 else None)
    if forced is not None:
        scores[:, :] = BANNED
        scores[:, forced] = 0.0
    return scores


def _ban_repeated_ngrams(scores: np.ndarray, tokens: np.ndarray, n: int) -> None:
    """Forbid every token that would complete an n-gram already present in its row."""
    length = tokens.shape[1]
    if length + 1 < n:
        return
    for row, seen in enumerate(tokens.tolist()):
        prefix = tuple(seen[length - n + 1 :]) if n > 1 else ()
        banned = [seen[i + n - 1] for i in range(length - n + 1)
                  if tuple(seen[i : i + n - 1]) == prefix]
        scores[row, banned] = BANNED


def apply_warpers(scores: np.ndarray, config: GenerationConfig) -> np.ndarray:
    """Temperature, then top-k, then top-p (nucleus), as in Hugging Face's sampling order."""
    if config.temperature != 1.0:
        scores /= np.float32(config.temperature)
    vocab = scores.shape[-1]
    if 0 < config.top_k < vocab:
        kth = np.partition(scores, vocab - config.top_k, axis=-1)[:, vocab - config.top_k]
        scores[scores < kth[:, None]] = BANNED
    if config.top_p < 1.0:
        order = np.argsort(-scores, axis=-1, kind="stable")  # most likely first
        probs = np.exp(log_softmax(np.take_along_axis(scores, order, axis=-1)))
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = (np.cumsum(probs, axis=-1) - probs) >= config.top_p
        np.put_along_axis(scores, order, np.where(drop, BANNED, np.take_along_axis(
            scores, order, axis=-1)), axis=-1)
    return scores


def sample(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(scores), by inverse CDF with one uniform draw per row."""
    probs = np.exp(log_softmax(scores).astype(np.float64))
    cdf = np.cumsum(probs, axis=-1)
    draws = rng.random(len(scores)) * cdf[:, -1]
    picks = (cdf < draws[:, None]).sum(axis=-1)
    return np.minimum(picks, scores.shape[-1] - 1).astype(np.int64)
