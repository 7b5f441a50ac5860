"""Input corruptions of the self-supervised objectives, as pure functions of ids and a generator.

- `mask_tokens`: BERT's masked LM — 15% of ordinary tokens chosen (whole words as an option);
  of those 80% become `<mask>`, 10% a random token, 10% stay; only chosen positions are labelled.
- `span_corruption`: T5 — noise density 0.15 in spans of mean length 3; each noise span becomes
  one sentinel in the input, and the target lists every sentinel followed by the span it hides.
- `text_infilling`: BART — spans with Poisson(3) lengths covering ~30% of the tokens each become
  one `<mask>` (a zero-length span inserts one); the target is the original text.
- `factorisation_order`: XLNet — a random order of the tokens; the last 1/K of it are the
  targets, each seeing the context (the rest) and the targets before it.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def ngram_spans(maskable: np.ndarray, rng: np.random.Generator, *, probability: float,
                max_ngram: int) -> np.ndarray:
    """(T,) bool: spans of n ≤ `max_ngram` maskable tokens, n drawn with weight 1/n (ALBERT's
    n-gram masking), at random starts until `probability` of the maskable tokens are chosen."""
    budget = int(round(probability * int(maskable.sum())))
    lengths = np.arange(1, max_ngram + 1)
    weights = (1.0 / lengths) / (1.0 / lengths).sum()
    chosen = np.zeros(len(maskable), dtype=bool)
    for start in rng.permutation(np.flatnonzero(maskable)):
        if chosen.sum() >= budget:
            break
        n = min(int(rng.choice(lengths, p=weights)), budget - int(chosen.sum()))
        span = slice(start, start + n)
        if len(maskable[span]) == n and maskable[span].all() and not chosen[span].any():
            chosen[span] = True
    return chosen


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, *, mask_id: int, vocab_size: int,
                maskable: np.ndarray, probability: float = 0.15,
                word_starts: np.ndarray | None = None, max_ngram: int = 1
                ) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one (T,) sequence → (inputs, labels), labels IGNORE_INDEX where unchosen.

    Args:
        maskable: (T,) bool, False on special tokens (never chosen).
        word_starts: (T,) bool marking the first token of each word: whole-word masking chooses
            words and masks all their tokens.
        max_ngram: > 1: choose spans of up to this many tokens (`ngram_spans`).
    """
    if max_ngram > 1:
        chosen = ngram_spans(maskable, rng, probability=probability, max_ngram=max_ngram)
    elif word_starts is None:
        chosen = (rng.random(len(ids)) < probability) & maskable
    else:
        word_index = np.cumsum(word_starts) - 1  # (T,) word number of each token
        words_chosen = rng.random(int(word_index.max()) + 1) < probability
        chosen = words_chosen[np.maximum(word_index, 0)] & maskable
    labels = np.where(chosen, ids, IGNORE_INDEX)
    action = rng.random(len(ids))
    inputs = ids.copy()
    inputs[chosen & (action < 0.8)] = mask_id
    randomised = chosen & (action >= 0.8) & (action < 0.9)
    inputs[randomised] = rng.integers(0, vocab_size, size=int(randomised.sum()))
    return inputs, labels


def random_spans_mask(length: int, rng: np.random.Generator, *, noise_density: float,
                      mean_span_length: float) -> np.ndarray:
    """(length,) bool noise mask made of spans: round(length × density) noise tokens split into
    round(noise / mean span) spans, interleaved with as many non-noise spans, starting with
    non-noise. Span boundaries are uniformly random partitions."""
    noise = int(round(length * noise_density))
    noise = min(max(noise, 1), length - 1)
    spans = max(1, int(round(noise / mean_span_length)))
    spans = min(spans, noise, length - noise)

    def partition(total: int, parts: int) -> np.ndarray:
        """`parts` positive lengths summing to `total`, uniformly at random."""
        cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
        return np.diff(np.concatenate([[0], cuts, [total]]))

    noise_lengths = partition(noise, spans)
    keep_lengths = partition(length - noise, spans)
    mask = np.zeros(length, dtype=bool)
    position = 0
    for keep, span in zip(keep_lengths, noise_lengths):
        position += keep
        mask[position : position + span] = True
        position += span
    return mask


def span_corruption(ids: np.ndarray, rng: np.random.Generator, *, sentinel_ids: list[int],
                    eos_id: int, noise_density: float = 0.15, mean_span_length: float = 3.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of one (T,) sequence (without EOS) → (input ids, target ids), both
    ending with EOS."""
    mask = random_spans_mask(len(ids), rng, noise_density=noise_density,
                             mean_span_length=mean_span_length)
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # first token of each noise span
    if int(starts.sum()) > len(sentinel_ids):
        raise ValueError(f"{int(starts.sum())} noise spans need more than the "
                         f"{len(sentinel_ids)} sentinel tokens")
    inputs, targets, span = [], [], -1
    for token, noisy, start in zip(ids.tolist(), mask, starts):
        if start:
            span += 1
            inputs.append(sentinel_ids[span])
            targets.append(sentinel_ids[span])
        (targets if noisy else inputs).append(token)
    return (np.array(inputs + [eos_id], dtype=np.int64),
            np.array(targets + [eos_id], dtype=np.int64))


def text_infilling(ids: np.ndarray, rng: np.random.Generator, *, mask_id: int,
                   mask_ratio: float = 0.3, poisson_lambda: float = 3.0) -> np.ndarray:
    """BART text infilling of one (T,) sequence → corrupted input ids (the target is `ids`).

    Span lengths are drawn from Poisson(λ) until they cover round(T × mask_ratio) tokens; the
    spans start at random positions (in order, never overlapping) and each becomes one mask.
    """
    budget = int(round(len(ids) * mask_ratio))
    lengths: list[int] = []
    while sum(lengths) < budget:
        lengths.append(int(rng.poisson(poisson_lambda)))
    if lengths:
        lengths[-1] -= sum(lengths) - budget
    starts = np.sort(rng.choice(len(ids), size=min(len(lengths), len(ids)), replace=False))
    tokens = ids.tolist()
    output: list[int] = []
    position = 0
    for start, length in zip(starts.tolist(), lengths):
        start = max(start, position)  # an earlier span ran past this start: follow it
        if start >= len(tokens):
            break
        output += tokens[position:start] + [mask_id]  # a zero-length span inserts a mask
        position = start + length
    output += tokens[position:]
    return np.array(output, dtype=np.int64)


def factorisation_order(length: int, rng: np.random.Generator, *, partial_prediction: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """XLNet's permutation LM over `length` tokens (Yang et al., 2019, §2.3): a random
    factorisation order whose last ⌈length / K⌉ tokens (`partial_prediction` = K) are predicted.

    Returns:
        (T, T) bool `visible`, [i, j]: token i (its query stream) may see token j — j is context
        (not predicted: the context is read as a whole, as XLNet's implementation does) or a
        target earlier in the order; and (T,) bool `targets`.
    """
    order = rng.permutation(length)  # order[k]: the k-th token of the factorisation
    rank = np.empty(length, dtype=np.int64)
    rank[order] = np.arange(length)
    targets = rank >= length - int(np.ceil(length / partial_prediction))
    visible = ~targets[None, :] | (rank[None, :] < rank[:, None])  # (T, T)
    return visible, targets
