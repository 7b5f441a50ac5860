"""The one generation loop, shared by every backend: encoder once (or the prompt, for a
decoder-only model), decoder step by step.

Greedy decoding and sampling share one loop (which can also stream tokens as they come); beam
search shares the same decoder bookkeeping. Everything here calls `GraphBackend.infer` on
name-keyed numpy arrays only, so a parity difference between backends points at a backend, never
at a second copy of the search code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ferry.runtime.backends.base import Feed, GraphBackend
from ferry.runtime.generation_config import GenerationConfig
from ferry.runtime.logits_processing import (
    BANNED,
    apply_processors,
    apply_warpers,
    log_softmax,
    sample,
)


@dataclass(frozen=True)
class SpecialIds:
    """The token ids generation needs: padding, the end of a sequence, and the token an
    encoder-decoder's decoder starts from (ferry's own models: `<s>`; BART: `</s>`; Marian:
    the pad token, as their checkpoints were trained)."""

    pad: int
    eos: int
    decoder_start: int

    @classmethod
    def from_ids(cls, ids: dict) -> SpecialIds:
        """From a checkpoint's or manifest's `special_ids` (role → id); bundles written before
        `decoder_start` was recorded start decoding from `bos`."""
        start = ids.get("decoder_start")
        return cls(pad=ids["pad"], eos=ids["eos"],
                   decoder_start=ids["bos"] if start is None else start)


@dataclass
class GenerationOutput:
    """Generated ids and their scores.

    sequences: (B·R, N) int64, R = num_return_sequences; each row ends at its EOS, padded after.
    token_scores: (B·R, N) float32 log-probability of each chosen token under the processed
        distribution (0 on padding).
    sequence_scores: (B·R,) float32; the length-penalised beam score for beam search, else the
        sum of token_scores.
    """

    sequences: np.ndarray
    token_scores: np.ndarray
    sequence_scores: np.ndarray


def renamed(outputs: Feed, old: str, new: str) -> Feed:
    """Outputs whose names start with `old` (e.g. present_), keyed with `new` (e.g. past_)."""
    return {new + k[len(old):]: v for k, v in outputs.items() if k.startswith(old)}


class Decoder:
    """Encoder-decoder state of a batch being decoded: cross-attention K/V and the KV cache.

    Args:
        copies: rows per source (beams, samples); the encoder runs once per source.
    """

    def __init__(self, graphs: dict[str, GraphBackend], input_ids: np.ndarray,
                 attention_mask: np.ndarray, *, copies: int = 1) -> None:
        self.graphs = graphs
        encoded = graphs["encoder"].infer({"input_ids": input_ids,
                                           "attention_mask": attention_mask})
        # (B·copies, nh, S, hs) per layer, computed once per request
        self.cross = {k: np.repeat(v, copies, axis=0)
                      for k, v in renamed(encoded, "cross_", "cross_").items()}
        self.mask = np.repeat(attention_mask, copies, axis=0)
        self.past: Feed = {}

    def first(self, start_ids: np.ndarray) -> np.ndarray:
        """(N, T) decoder prefix → (N, V) logits of the next token; starts the cache."""
        outputs = self.graphs["decoder_init"].infer({
            "input_ids": start_ids, "encoder_attention_mask": self.mask, **self.cross})
        self.past = renamed(outputs, "present_", "past_")
        return outputs["logits"][:, -1]

    def next(self, token_ids: np.ndarray) -> np.ndarray:
        """(N,) new tokens → (N, V) logits of the following token; grows the cache."""
        outputs = self.graphs["decoder_step"].infer({
            "input_ids": token_ids[:, None], "encoder_attention_mask": self.mask,
            **self.cross, **self.past})
        self.past = renamed(outputs, "present_", "past_")
        return outputs["logits"][:, -1]

    def reorder(self, rows: np.ndarray) -> None:
        """Keep cache rows `rows` (beam search's surviving beams), in that order."""
        self.past = {k: v[rows] for k, v in self.past.items()}

    def keep(self, rows: np.ndarray) -> None:
        """Drop every row but `rows` (finished sequences leave the batch)."""
        self.reorder(rows)
        self.cross = {k: v[rows] for k, v in self.cross.items()}
        self.mask = self.mask[rows]


class PromptDecoder:
    """Decoder-only state: the prompts, left-padded so every row's next token is in the last
    column, and the KV cache with its mask.

    Args:
        copies: rows per prompt (beams, samples); the prompt is run once per copy.
    """

    def __init__(self, graphs: dict[str, GraphBackend], input_ids: np.ndarray,
                 attention_mask: np.ndarray, *, copies: int = 1) -> None:
        self.graphs = graphs
        ids, mask = left_padded(input_ids, attention_mask)
        self.prompt = np.repeat(ids, copies, axis=0)  # (B·copies, S)
        self.mask = np.repeat(mask, copies, axis=0)
        self.past: Feed = {}

    def first(self, start_ids: np.ndarray) -> np.ndarray:
        """The prompts → (N, V) logits of the first new token (`start_ids` unused: a
        decoder-only model continues its prompt); starts the cache."""
        outputs = self.graphs["decoder_init"].infer({"input_ids": self.prompt,
                                                     "attention_mask": self.mask})
        self.past = renamed(outputs, "present_", "past_")
        return outputs["logits"][:, -1]

    def next(self, token_ids: np.ndarray) -> np.ndarray:
        """(N,) new tokens → (N, V) logits of the following token; grows cache and mask."""
        outputs = self.graphs["decoder_step"].infer({
            "input_ids": token_ids[:, None], "attention_mask": self.mask, **self.past})
        self.mask = np.concatenate([self.mask, np.ones((len(self.mask), 1), np.int64)], axis=1)
        self.past = renamed(outputs, "present_", "past_")
        return outputs["logits"][:, -1]

    def reorder(self, rows: np.ndarray) -> None:
        """Keep cache rows `rows` (beam search's surviving beams), in that order."""
        self.past = {k: v[rows] for k, v in self.past.items()}
        self.mask = self.mask[rows]

    keep = reorder  # finished sequences leave the batch: the same row selection


def left_padded(input_ids: np.ndarray, attention_mask: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's real tokens moved to the right end (padding first), with the matching mask."""
    lengths = attention_mask.sum(axis=1)
    width = int(lengths.max())
    ids = np.zeros((len(input_ids), width), dtype=np.int64)
    mask = (np.arange(width)[None, :] >= width - lengths[:, None]).astype(np.int64)
    for i, row in enumerate(input_ids):
        ids[i, width - lengths[i]:] = row[attention_mask[i] == 1]
    return ids, mask


def make_decoder(graphs: dict[str, GraphBackend], input_ids: np.ndarray,
                 attention_mask: np.ndarray, *, copies: int = 1) -> Decoder | PromptDecoder:
    """The decoding state for these graphs: encoder-decoder, or decoder-only continuing a
    prompt."""
    kind = Decoder if "encoder" in graphs else PromptDecoder
    return kind(graphs, input_ids, attention_mask, copies=copies)


def generate(graphs: dict[str, GraphBackend], input_ids: np.ndarray, attention_mask: np.ndarray,
             *, special: SpecialIds, config: GenerationConfig,
             on_token: Callable[[np.ndarray], None] | None = None) -> GenerationOutput:
    """Generate for a padded batch with the KV cache.

    Args:
        graphs: the `encoder`, `decoder_init` and `decoder_step` graph backends (decoder-only
            models: `decoder_init` and `decoder_step`, continuing `input_ids` as the prompt).
        input_ids: (B, S) int64 source ids (or prompts), right-padded; attention_mask: (B, S)
            1/0 int64.
        config: search settings, validated by the caller.
        on_token: greedy / sampling only: called with each step's (B·R,) new tokens (pad for
            rows already finished), for streaming.
    """
    if config.num_beams > 1:
        return _beam_search(graphs, input_ids, attention_mask, special=special, config=config)
    steps = token_stream(graphs, input_ids, attention_mask, special=special, config=config)
    tokens, scores = [], []
    for new_tokens, new_scores in steps:
        if on_token is not None:
            on_token(new_tokens)
        tokens.append(new_tokens)
        scores.append(new_scores)
    sequences = np.stack(tokens, axis=1)  # (B·R, N)
    token_scores = np.stack(scores, axis=1).astype(np.float32)
    return GenerationOutput(sequences, token_scores, token_scores.sum(axis=1))


def token_stream(graphs: dict[str, GraphBackend], input_ids: np.ndarray,
                    attention_mask: np.ndarray, *, special: SpecialIds,
                    config: GenerationConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Greedy or sampled decoding, one step at a time: yields each step's (B·R,) tokens (pad for
    finished rows) and their log-probs, so callers can stream."""
    copies = config.num_return_sequences
    decoder = make_decoder(graphs, input_ids, attention_mask, copies=copies)
    rows = len(decoder.mask)
    rng = np.random.default_rng(config.seed) if config.do_sample else None
    history = np.full((rows, 1), special.decoder_start, dtype=np.int64)  # decoder start included
    finished = np.zeros(rows, dtype=bool)
    active = np.arange(rows)  # the rows still generating, in the decoder's row order
    logits = decoder.first(history)  # (A, V) for the active rows
    for step in range(config.max_new_tokens):
        scores = apply_processors(logits.astype(np.float32, copy=True), history[active],
                                  step=step, eos=special.eos, config=config)
        if rng is not None:
            scores = apply_warpers(scores, config)
            chosen = sample(scores, rng)
        else:
            chosen = scores.argmax(axis=-1).astype(np.int64)
        next_ids = np.full(rows, special.pad, dtype=np.int64)
        next_ids[active] = chosen
        logprobs = np.zeros(rows, dtype=np.float32)
        if config.output_scores:
            logprobs[active] = np.take_along_axis(log_softmax(scores), chosen[:, None],
                                                  axis=-1)[:, 0]
        yield next_ids, logprobs
        finished |= next_ids == special.eos
        if finished.all() or step == config.max_new_tokens - 1:
            return
        history = np.concatenate([history, next_ids[:, None]], axis=1)
        running = ~finished[active]
        if not running.all():  # finished rows leave the batch: they stop costing compute
            decoder.keep(np.flatnonzero(running))
            active = active[running]
        logits = decoder.next(next_ids[active])


def _beam_search(graphs: dict[str, GraphBackend], input_ids: np.ndarray,
                 attention_mask: np.ndarray, *, special: SpecialIds,
                 config: GenerationConfig) -> GenerationOutput:
    """Beam search with length penalty, as Hugging Face's `num_beams` > 1 without sampling.

    Each step keeps, per source, the `num_beams` best unfinished continuations among the
    2·num_beams best candidates; a candidate ending in EOS becomes a finished hypothesis scored
    sum(log-probs) / length ** length_penalty (length counting the EOS).
    """
    batch, beams = len(input_ids), config.num_beams
    decoder = make_decoder(graphs, input_ids, attention_mask, copies=beams)
    history = np.full((batch * beams, 1), special.decoder_start, dtype=np.int64)
    token_logprobs = np.zeros((batch * beams, 0), dtype=np.float32)
    beam_scores = np.zeros((batch, beams), dtype=np.float64)
    beam_scores[:, 1:] = -1e9  # all beams start identical: expand only the first one
    finished: list[list[tuple[float, np.ndarray, np.ndarray]]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    logits = decoder.first(history)
    vocab = logits.shape[-1]
    for step in range(config.max_new_tokens):
        length = step + 1
        logprobs = log_softmax(apply_processors(logits.astype(np.float32, copy=True), history,
                                                step=step, eos=special.eos, config=config))
        candidates = (beam_scores.reshape(-1, 1) + logprobs).reshape(batch, beams * vocab)
        top = np.argsort(-candidates, axis=1, kind="stable")[:, : 2 * beams]  # (B, 2K)
        next_rows = np.repeat(np.arange(batch) * beams, beams)  # unfilled slots: ignored
        next_tokens = np.full(batch * beams, special.pad, dtype=np.int64)
        next_scores = np.full((batch, beams), -1e9)
        for b in range(batch):
            if done[b]:
                continue
            kept = 0
            for rank, flat in enumerate(top[b]):
                score = candidates[b, flat]
                if score <= BANNED:
                    break
                row, token = b * beams + flat // vocab, int(flat % vocab)
                if token == special.eos or step == config.max_new_tokens - 1:
                    if rank < beams:  # an EOS outside the top beams is not a real contender
                        tokens = np.append(history[row, 1:], token)
                        scores = np.append(token_logprobs[row], logprobs[row, token])
                        finished[b].append((score / length ** config.length_penalty,
                                            tokens, scores))
                    continue
                next_rows[b * beams + kept] = row
                next_tokens[b * beams + kept] = token
                next_scores[b, kept] = score
                kept += 1
                if kept == beams:
                    break
            finished[b].sort(key=lambda h: -h[0])
            del finished[b][beams:]
            done[b] = _beam_batch_done(finished[b], next_scores[b].max(), length, config)
        if done.all() or step == config.max_new_tokens - 1:
            break
        chosen = logprobs[next_rows, np.maximum(next_tokens, 0)]
        token_logprobs = np.concatenate([token_logprobs[next_rows], chosen[:, None]], axis=1)
        history = np.concatenate([history[next_rows], next_tokens[:, None]], axis=1)
        beam_scores = next_scores
        decoder.reorder(next_rows)
        logits = decoder.next(next_tokens)
    return _best_hypotheses(finished, config.num_return_sequences, special.pad)


def _beam_batch_done(hypotheses: list, best_running: float, length: int,
                     config: GenerationConfig) -> bool:
    """Whether a source's beam search can stop: enough finished hypotheses, and (unless
    early_stopping) no running beam that could still beat the worst of them."""
    if len(hypotheses) < config.num_beams:
        return False
    if config.early_stopping:
        return True
    return best_running / length ** config.length_penalty <= hypotheses[-1][0]


def _best_hypotheses(finished: list[list], count: int, pad: int) -> GenerationOutput:
    chosen = [h for hyps in finished for h in hyps[:count]]
    width = max(len(tokens) for _, tokens, _ in chosen)
    sequences = np.full((len(chosen), width), pad, dtype=np.int64)
    token_scores = np.zeros((len(chosen), width), dtype=np.float32)
    for i, (_, tokens, scores) in enumerate(chosen):
        sequences[i, : len(tokens)] = tokens
        token_scores[i, : len(scores)] = scores
    return GenerationOutput(sequences, token_scores,
                            np.array([score for score, _, _ in chosen], dtype=np.float32))


def graph_limits(graphs: dict[str, GraphBackend]) -> tuple[int, int]:
    """(vocabulary size, decoder positions) of generation graphs."""
    logits = next(t for t in graphs["decoder_step"].spec.outputs if t.name == "logits")
    return int(logits.shape[-1]), graphs["decoder_step"].spec.dims["past_len"].max + 1


def greedy_generate(graphs: dict[str, GraphBackend], input_ids: np.ndarray,
                    attention_mask: np.ndarray, *, special: SpecialIds,
                    max_new_tokens: int) -> np.ndarray:
    """Greedy decoding → (B, N) ids: `generate` with the default settings."""
    vocab_size, positions = graph_limits(graphs)
    config = GenerationConfig(max_new_tokens=max_new_tokens).validate(
        vocab_size=vocab_size, max_positions=positions)
    return generate(graphs, input_ids, attention_mask, special=special, config=config).sequences
