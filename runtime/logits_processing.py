"""Logits processors and warpers, in numpy, with Hugging Face's semantics and order.

Processors encode constraints (penalties, banned, forced and suppressed tokens) and run in every
mode; warpers (temperature, top-k, top-p, min-p, typical, epsilon, eta) reshape the distribution
and run only when sampling. Greedy decoding and sampling process the raw logits; beam search
processes the log-softmaxed scores (as `transformers` does), renormalising only when
`renormalize_logits` asks for it. All operate in place on (N, V) float32 scores, given each row's
sequence so far: the decoder start token (encoder-decoders) or the left-padded prompt
(decoder-only models), then the tokens generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ferry.runtime.generation_config import GenerationConfig
from ferry.runtime.host_parallel import axis_parts, run_parts

BANNED = np.float32(-np.inf)
EXP_CHUNK_ROWS = 8  # rows exponentiated at once by log_softmax: a few MB, reused from the heap


@dataclass(frozen=True)
class Step:
    """Where generation stands, as Hugging Face's processors see it.

    length: tokens in each row's sequence so far (`input_ids.shape[-1]`); prompt_length: that
    length before the first new token; step: new tokens so far; max_length: the length at which
    generation ends; eos: the end-of-sequence ids; ignored: (N,) leading tokens of each row the
    repetition penalty skips (a decoder-only prompt's left padding).
    """

    length: int
    prompt_length: int
    max_length: int
    eos: tuple[int, ...]
    ignored: np.ndarray

    @property
    def step(self) -> int:
        return self.length - self.prompt_length


def log_softmax(scores: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Row-wise log-softmax of (N, V) scores, in float32; -inf entries stay -inf.

    `out`: a float32 (N, V) array to write into (it may be `scores` itself), so a caller
    repeating this every step reuses one buffer instead of faulting in fresh pages. Large
    arrays are split by rows over the host threads (`host_parallel`); every row is computed as
    in one call."""
    if out is None:
        out = np.empty(scores.shape, dtype=np.float32)
    flat_in, flat_out = scores.reshape(-1, scores.shape[-1]), out.reshape(-1, out.shape[-1])

    def rows(part: slice) -> None:
        source, target = flat_in[part], flat_out[part]
        peak = source.max(axis=-1, keepdims=True)
        np.subtract(source, peak, out=target, dtype=np.float32)  # shifted
        total = np.empty(peak.shape, dtype=np.float32)
        for start in range(0, len(target), EXP_CHUNK_ROWS):  # exp in cache-sized pieces
            chunk = target[start:start + EXP_CHUNK_ROWS]
            total[start:start + len(chunk)] = np.exp(chunk).sum(axis=-1, keepdims=True)
        with np.errstate(divide="ignore"):
            np.subtract(target, np.log(total), out=target)

    run_parts(rows, axis_parts(len(flat_in), flat_out.nbytes))
    return out


def _softmax(scores: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(scores))


def apply_processors(scores: np.ndarray, sequences: np.ndarray, *, at: Step,
                     config: GenerationConfig) -> np.ndarray:
    """The constraints of every decoding mode, in `transformers`' order."""
    if config.repetition_penalty != 1.0:
        for row, seen in enumerate(sequences):
            ids = np.unique(seen[int(at.ignored[row]):])
            values = scores[row, ids]
            scores[row, ids] = np.where(values < 0, values * config.repetition_penalty,
                                        values / config.repetition_penalty)
    if config.no_repeat_ngram_size > 0:
        _ban_repeated_ngrams(scores, sequences, config.no_repeat_ngram_size)
    if config.bad_words_ids:
        _ban_bad_words(scores, sequences, config.bad_words_ids, at.eos)
    eos = list(at.eos)
    if at.length < config.min_length or at.step < config.min_new_tokens:
        scores[:, eos] = BANNED
    forced = [config.forced_bos_token_id] if (config.forced_bos_token_id is not None
                                              and at.length == 1) else []
    if config.forced_eos_token_id is not None and at.length == at.max_length - 1:
        forced = [config.forced_eos_token_id]
    if forced:
        scores[:, :] = BANNED
        scores[:, forced] = 0.0
    if config.exponential_decay_length_penalty is not None:
        start, factor = config.exponential_decay_length_penalty
        past = at.length - (start + at.prompt_length)
        if past > 0:
            values = scores[:, eos]
            boost = np.abs(values) * np.float32(factor ** past - 1)
            scores[:, eos] = values + np.where(np.isfinite(values), boost, 0.0)
    if config.suppress_tokens:
        scores[:, list(config.suppress_tokens)] = BANNED
    if config.begin_suppress_tokens:
        begin = at.prompt_length + (1 if at.prompt_length == 1
                                    and config.forced_bos_token_id is not None else 0)
        if at.length == begin:
            scores[:, list(config.begin_suppress_tokens)] = BANNED
    return scores


def _ban_repeated_ngrams(scores: np.ndarray, sequences: np.ndarray, n: int) -> None:
    """Forbid every token that would complete an n-gram already present in its row."""
    length = sequences.shape[1]
    if length < n:
        return
    for row, seen in enumerate(sequences.tolist()):
        prefix = tuple(seen[length - n + 1 :]) if n > 1 else ()
        banned = [seen[i + n - 1] for i in range(length - n + 1)
                  if tuple(seen[i : i + n - 1]) == prefix]
        scores[row, banned] = BANNED


def _ban_bad_words(scores: np.ndarray, sequences: np.ndarray,
                   bad_words: tuple[tuple[int, ...], ...], eos: tuple[int, ...]) -> None:
    """Forbid each bad word's last token where the row ends with the rest of it (a one-token
    word: always). A bad word that is just an EOS id is dropped, as `transformers` does."""
    for words in bad_words:
        if len(words) == 1 and words[0] in eos:
            continue
        *prefix, last = words
        if len(prefix) > sequences.shape[1]:
            continue
        rows = (np.ones(len(sequences), dtype=bool) if not prefix else
                (sequences[:, len(sequences[0]) - len(prefix):] == prefix).all(axis=1))
        scores[rows, last] = BANNED


def apply_warpers(scores: np.ndarray, config: GenerationConfig) -> np.ndarray:
    """Temperature, top-k, top-p, min-p, typical, epsilon and eta: sampling's warpers, in
    `transformers`' order and semantics (each keeps at least one token)."""
    if config.temperature != 1.0:
        scores /= np.float32(config.temperature)
    vocab = scores.shape[-1]
    if 0 < config.top_k < vocab:
        kth = np.partition(scores, vocab - config.top_k, axis=-1)[:, vocab - config.top_k]
        scores[scores < kth[:, None]] = BANNED
    if config.top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # least likely first
        ranked = np.take_along_axis(scores, order, axis=-1)
        cumulative = np.cumsum(_softmax(ranked), axis=-1)
        drop = cumulative <= (1 - config.top_p)
        drop[:, -1] = False
        np.put_along_axis(scores, order, np.where(drop, BANNED, ranked), axis=-1)
    if config.min_p > 0:
        probs = _softmax(scores)
        drop = probs < config.min_p * probs.max(axis=-1, keepdims=True)
        drop[np.arange(len(scores)), probs.argmax(axis=-1)] = False
        scores[drop] = BANNED
    if config.typical_p < 1.0:
        _typical(scores, config.typical_p)
    if 0 < config.epsilon_cutoff:
        _cut_below(scores, _softmax(scores) < config.epsilon_cutoff)
    if 0 < config.eta_cutoff:
        logp = log_softmax(scores)
        probs = np.exp(logp)
        entropy = -np.where(probs > 0, probs * logp, 0.0).sum(axis=-1, keepdims=True)
        eta = np.minimum(config.eta_cutoff, np.sqrt(config.eta_cutoff) * np.exp(-entropy))
        _cut_below(scores, probs < eta)
    return scores


def _cut_below(scores: np.ndarray, drop: np.ndarray) -> None:
    """Ban `drop`, but never a row's best token."""
    drop &= scores < scores.max(axis=-1, keepdims=True)
    scores[drop] = BANNED


def _typical(scores: np.ndarray, mass: float) -> None:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up
    to `mass` of probability."""
    logp = log_softmax(scores)
    probs = np.exp(logp)
    entropy = -np.nansum(logp * probs, axis=-1, keepdims=True)
    distance = np.abs(-logp - entropy)
    order = np.argsort(distance, axis=-1, kind="stable")
    ranked = np.take_along_axis(distance, order, axis=-1)
    cumulative = np.cumsum(_softmax(np.take_along_axis(scores, order, axis=-1)), axis=-1)
    last = np.minimum((cumulative < mass).sum(axis=-1), scores.shape[-1] - 1)
    drop = ranked > ranked[np.arange(len(scores)), last][:, None]
    drop[:, 0] = False
    np.put_along_axis(scores, order, np.where(drop, BANNED, np.take_along_axis(
        scores, order, axis=-1)), axis=-1)


def sample(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(scores), by inverse CDF with one uniform draw per row."""
    probs = np.exp(log_softmax(scores).astype(np.float64))
    cdf = np.cumsum(probs, axis=-1)
    draws = rng.random(len(scores)) * cdf[:, -1]
    picks = (cdf < draws[:, None]).sum(axis=-1)
    return np.minimum(picks, scores.shape[-1] - 1).astype(np.int64)
