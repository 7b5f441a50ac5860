"""Beam search as `transformers`' `generate(num_beams=…)` does it (its current, vectorised
algorithm), in numpy over the one decoder state every backend shares.

Per step and source: the log-softmaxed scores pass through the logits processors (not
renormalised unless `renormalize_logits`), are added to the running beams' scores, and the best
2·K continuations (K = num_beams) are kept; those ending the sequence (an EOS id, a stop string,
or the length limit) that rank among the best K become finished hypotheses scored
sum(log-probs) / length ** length_penalty, the best K others run on. A source is done when its K
finished hypotheses cannot be beaten (`early_stopping` False: judged at the current length,
"never": at the longest possible one when length_penalty > 0) or, with `early_stopping=True`,
once it has K of them. A finished source leaves the batch: it no longer costs a decoder row.

The (sources, K·V) totals are not sorted, nor even formed: `_best_continuations` finds the few
groups of columns that can hold a source's best 2·K and ranks only their members, so a step costs
a log-softmax and a max over the scores (split over the host threads), not a sort of K·V.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ferry.runtime.backends.base import GraphBackend
from ferry.runtime.decoding_state import decoding_state
from ferry.runtime.generation import GenerationOutput, resolve_run, with_overrides
from ferry.runtime.generation_config import GenerationConfig
from ferry.runtime.logits_processing import apply_processors, log_softmax
from ferry.runtime.special_ids import SpecialIds

NEG = np.float32(-1e9)  # `transformers`' stand-in for "impossible" in beam scores


def _best(scores: np.ndarray, count: int) -> np.ndarray:
    """(R, C) → (R, count) column indices of each row's `count` highest scores, highest first
    (ties: lower index first)."""
    columns = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.lexsort((columns, -scores), axis=1)[:, :count]


def _best_continuations(logprobs: np.ndarray, scores: np.ndarray, count: int,
                        group: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Each source's `count` best continuations: (A, K, V) step log-probs + (A, K) beam scores
    → (A, count) columns of the (A, K·V) totals, best first (ties: lower index first), and
    those totals.

    The totals are never formed whole. Each beam row's columns fall into strided groups
    (columns c, c + C, c + 2C, … — `group` of them, so the maxima are an elementwise max over
    contiguous slices, ~0.2 ns a score); a source's `count` best totals lie in the groups whose
    maximum (+ the beam's score) is at or above the `count`-th largest of those maxima, as
    `count` groups hold a total that high — a few groups per source, whose members alone are
    summed and ranked."""
    sources, beams, vocab = logprobs.shape
    width = vocab // group  # groups per beam row, besides the tail group of the last columns
    if width < 4 * count:  # a small vocabulary: rank every total
        totals = (logprobs + scores[:, :, None]).reshape(sources, beams * vocab)
        picked = _best(totals, count)
        return picked, np.take_along_axis(totals, picked, axis=1)
    body = width * group
    maxima = np.empty((sources, beams, width + 1), dtype=np.float32)
    logprobs[:, :, :body].reshape(sources, beams, group, width).max(axis=2, out=maxima[:, :, :-1])
    maxima[:, :, -1] = logprobs[:, :, body:].max(axis=2) if body < vocab else -np.inf
    maxima += scores[:, :, None]
    maxima = maxima.reshape(sources, -1)
    threshold = np.partition(maxima, maxima.shape[1] - count, axis=1)[:, -count]  # (A,)
    source, beam, column = np.unravel_index(np.flatnonzero(maxima >= threshold[:, None]),
                                            (sources, beams, width + 1))
    beam_row, body_groups = source * beams + beam, column < width
    columns = [column[body_groups, None] + width * np.arange(group)]  # (G_sel, group)
    rows = [np.repeat(beam_row[body_groups], group)]
    if not body_groups.all():  # the tail group's members
        tail = np.arange(body, vocab)
        columns.append(np.broadcast_to(tail, (int((~body_groups).sum()), len(tail))))
        rows.append(np.repeat(beam_row[~body_groups], len(tail)))
    row, column = np.concatenate(rows), np.concatenate([c.reshape(-1) for c in columns])
    values = logprobs.reshape(sources * beams, vocab)[row, column] + scores.reshape(-1)[row]
    source, flat = row // beams, (row % beams) * vocab + column
    order = np.lexsort((flat, -values, source))  # by source, best first, lower index on ties
    source, flat, values = source[order], flat[order], values[order]
    rank = np.arange(len(source)) - np.searchsorted(source, np.arange(sources))[source]
    kept = rank < count
    return flat[kept].reshape(sources, count), values[kept].reshape(sources, count)


def beam_search(graphs: dict[str, GraphBackend], input_ids: np.ndarray,
                attention_mask: np.ndarray, *, special: SpecialIds, config: GenerationConfig,
                stops: Callable[[np.ndarray], np.ndarray] | None = None) -> GenerationOutput:
    """Beam search for a padded batch; returns `num_return_sequences` hypotheses per source,
    best first, with their length-penalised scores."""
    special = with_overrides(special, config)
    batch, beams = len(input_ids), config.num_beams
    decoder = decoding_state(graphs, input_ids, attention_mask, copies=beams)
    start, ignored = decoder.start(special)  # (B·K, P), (B·K,)
    run = resolve_run(special, config, start.shape[1], stops)
    prompt, ignored = start[::beams], ignored[::beams]  # per source: (B, P), (B,)
    keep = max(2, 1 + len(run.eos)) * beams
    lp, early = config.length_penalty, config.early_stopping
    steps = run.new_tokens

    sources = np.arange(batch)  # the sources still searching, in decoder row order
    scores = np.zeros((batch, beams), dtype=np.float32)
    scores[:, 1:] = NEG  # all beams start identical: expand only the first
    tokens = np.zeros((batch, beams, 0), dtype=np.int64)
    logprobs = np.zeros((batch, beams, 0), dtype=np.float32)
    done_scores = np.full((batch, beams), NEG, dtype=np.float32)
    done_tokens = np.full((batch, beams, steps), run.pad, dtype=np.int64)
    done_logprobs = np.zeros((batch, beams, steps), dtype=np.float32)
    done_lengths = np.zeros((batch, beams), dtype=np.int64)
    done = np.zeros((batch, beams), dtype=bool)
    open_ = np.ones(batch, dtype=bool)  # can a running beam still beat a finished one?

    logits = decoder.first(start[:, -1:])
    workspace = np.empty((batch * beams, logits.shape[-1]), dtype=np.float32)  # steps' scores
    for step in range(steps):
        active = len(sources)
        length = run.prompt_length + step  # the sequences' length before this step's token
        sequences = np.concatenate([np.repeat(prompt[sources], beams, axis=0),
                                    tokens.reshape(active * beams, step)], axis=1)
        step_logprobs = log_softmax(logits, out=workspace[:active * beams])
        step_logprobs = apply_processors(
            step_logprobs, sequences, at=run.at(length, np.repeat(ignored[sources], beams)),
            config=config)
        if config.renormalize_logits:
            step_logprobs = log_softmax(step_logprobs, out=step_logprobs)
        vocab = step_logprobs.shape[-1]
        picked, top_scores = _best_continuations(  # (A, 2K) best first, their totals
            step_logprobs.reshape(active, beams, vocab), scores, keep)
        origin, token = picked // vocab, picked % vocab  # (A, 2K) beam, token
        rows = np.arange(active)[:, None]
        top_tokens = np.concatenate([tokens[rows, origin], token[:, :, None]], axis=2)
        top_logprobs = np.concatenate([
            logprobs[rows, origin],
            step_logprobs.reshape(active, beams, vocab)[rows, origin, token][:, :, None]], axis=2)
        ended = np.isin(token, run.eos) | (length + 1 >= run.max_length)  # (A, 2K)
        if run.stops is not None:
            ended |= run.stops(np.concatenate([np.repeat(prompt[sources], keep, axis=0),
                                               top_tokens.reshape(active * keep, step + 1)],
                                              axis=1)).reshape(active, keep)

        # the best K candidates that go on
        going = _best(top_scores + ended * NEG, beams)  # (A, K)
        scores = np.take_along_axis(top_scores + ended * NEG, going, axis=1)
        tokens = top_tokens[rows, going]
        logprobs = top_logprobs[rows, going]
        parents = np.take_along_axis(origin, going, axis=1)  # (A, K) beams they extend

        # the finished hypotheses: the best K of the old ones and those just ended
        finishing = ended & (np.arange(keep) < beams)[None, :]
        penalised = top_scores / np.float32((length + 1 - run.prompt_length) ** lp)
        penalised += (done[sources].all(axis=1, keepdims=True) & (early is True)) * NEG
        penalised += (~open_[sources])[:, None] * NEG
        penalised += (~finishing) * NEG
        merged = np.concatenate([done_scores[sources], penalised], axis=1)  # (A, K + 2K)
        best = _best(merged, beams)
        from_new = best >= beams
        new = np.maximum(best - beams, 0)
        old = np.minimum(best, beams - 1)
        padded = np.full((active, keep, steps), run.pad, dtype=np.int64)
        padded[:, :, : step + 1] = top_tokens
        padded_logprobs = np.zeros((active, keep, steps), dtype=np.float32)
        padded_logprobs[:, :, : step + 1] = top_logprobs
        done_tokens[sources] = np.where(from_new[:, :, None], padded[rows, new],
                                        done_tokens[sources][rows, old])
        done_logprobs[sources] = np.where(from_new[:, :, None], padded_logprobs[rows, new],
                                          done_logprobs[sources][rows, old])
        done_lengths[sources] = np.where(from_new, step + 1, done_lengths[sources][rows, old])
        done[sources] = np.where(from_new, finishing[rows, new], done[sources][rows, old])
        done_scores[sources] = np.take_along_axis(merged, best, axis=1)

        # can a running beam still beat the worst finished hypothesis?
        longest = (run.max_length if early == "never" and lp > 0.0 else length + 1)
        best_possible = scores[:, :1] / np.float32((longest - run.prompt_length) ** lp)
        worst = np.where(done[sources], done_scores[sources].min(axis=1, keepdims=True), NEG)
        open_[sources] &= (best_possible > worst).any(axis=1)

        frozen = ~open_[sources] | (done[sources].all(axis=1) & (early is True))
        if step == steps - 1 or frozen.all() or ended.all():
            break
        if frozen.any():  # sources that are done leave the batch
            going_on = ~frozen
            sources, scores = sources[going_on], scores[going_on]
            tokens, logprobs, parents = tokens[going_on], logprobs[going_on], parents[going_on]
            kept = np.flatnonzero(going_on)
            decoder.keep((kept[:, None] * beams + parents).reshape(-1))
        else:  # the beams of a source share its encoder outputs: only the caches move
            decoder.reorder((np.arange(active)[:, None] * beams + parents).reshape(-1))
        logits = decoder.next(tokens[:, :, -1].reshape(-1))
    return _hypotheses(done_tokens, done_logprobs, done_lengths, done_scores,
                       config.num_return_sequences, run.pad)


def _hypotheses(tokens: np.ndarray, logprobs: np.ndarray, lengths: np.ndarray,
                scores: np.ndarray, count: int, pad: int) -> GenerationOutput:
    """The `count` best finished hypotheses per source (they are kept best first), trimmed to
    the longest."""
    width = max(int(lengths[:, :count].max()), 1)
    sequences = tokens[:, :count, :width].reshape(-1, width)
    token_scores = logprobs[:, :count, :width].reshape(-1, width)
    mask = np.arange(width)[None, :] < lengths[:, :count].reshape(-1, 1)
    return GenerationOutput(np.where(mask, sequences, pad).astype(np.int64),
                            np.where(mask, token_scores, 0.0).astype(np.float32),
                            scores[:, :count].reshape(-1).astype(np.float32))
