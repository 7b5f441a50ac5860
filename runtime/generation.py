"""The one generation loop, shared by every backend: encoder once (or the prompt, for a
decoder-only model), decoder step by step.

Greedy decoding and sampling share one loop (which can also stream tokens as they come); beam
search (`beam_search.py`) drives the same decoding state (`decoding_state.py`). Everything here
calls `GraphBackend.infer` on name-keyed numpy arrays only, so a parity difference between
backends points at a backend, never at a second copy of the search code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ferry.errors import FerryError
from ferry.runtime.backends.base import GraphBackend
from ferry.runtime.decoding_state import decoding_state, joinable
from ferry.runtime.generation_config import GenerationConfig
from ferry.runtime.logits_processing import (
    Step,
    apply_processors,
    apply_warpers,
    log_softmax,
    sample,
)
from ferry.runtime.special_ids import SpecialIds


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


@dataclass(frozen=True)
class Run:
    """What one generation call resolves before its first step: the EOS ids, the padding id,
    how long the sequences are (`transformers`' `input_ids.shape[-1]`) at the start and at the
    end, and the stop strings' check."""

    eos: tuple[int, ...]
    pad: int
    prompt_length: int
    new_tokens: int
    stops: Callable[[np.ndarray], np.ndarray] | None

    @property
    def max_length(self) -> int:
        return self.prompt_length + self.new_tokens

    def at(self, length: int, ignored: np.ndarray) -> Step:
        return Step(length=length, prompt_length=self.prompt_length,
                    max_length=self.max_length, eos=self.eos, ignored=ignored)

    def ends(self, sequences: np.ndarray) -> np.ndarray:
        """(N,) whether each sequence just ended: its last token is an EOS id, or its text
        ends in a stop string."""
        # a broadcast comparison: np.isin costs ~16 µs a call on a batch of ids, every step
        ended = (sequences[:, -1:] == np.asarray(self.eos)).any(axis=1)
        if self.stops is not None:
            ended |= self.stops(sequences)
        return ended


def resolve_run(special: SpecialIds, config: GenerationConfig, prompt_length: int,
                stops: Callable[[np.ndarray], np.ndarray] | None) -> Run:
    """The `Run` of a call whose sequences start `prompt_length` tokens long (`special`: the
    ids with the call's overrides, `with_overrides`)."""
    new_tokens = config.new_tokens(prompt_length)
    if new_tokens < 1:
        raise FerryError(f"invalid generation argument max_length={config.max_length}: it "
                         f"leaves no room after the {prompt_length} tokens the sequences start "
                         "with; raise it or pass max_new_tokens")
    return Run(eos=end_ids(special, config), pad=special.pad, prompt_length=prompt_length,
               new_tokens=new_tokens, stops=stops)


def end_ids(special: SpecialIds, config: GenerationConfig) -> tuple[int, ...]:
    """The ids that end a sequence in a call: its `eos_token_id`(s), else the bundle's EOS."""
    return tuple(config.eos_token_id or (special.eos,))


def with_overrides(special: SpecialIds, config: GenerationConfig) -> SpecialIds:
    """The bundle's special ids with the call's overrides (pad, eos, decoder start)."""
    return dataclasses.replace(
        special, pad=special.pad if config.pad_token_id is None else config.pad_token_id,
        eos=(config.eos_token_id or (special.eos,))[0],
        decoder_start=(special.decoder_start if config.decoder_start_token_id is None
                       else config.decoder_start_token_id))


def generate(graphs: dict[str, GraphBackend], input_ids: np.ndarray, attention_mask: np.ndarray,
             *, special: SpecialIds, config: GenerationConfig,
             on_token: Callable[[np.ndarray], None] | None = None,
             stops: Callable[[np.ndarray], np.ndarray] | None = None) -> GenerationOutput:
    """Generate for a padded batch with the KV cache, as `transformers`' `generate()` does.

    Args:
        graphs: the `encoder`, `decoder_init` and `decoder_step` graph backends (decoder-only
            models: `decoder_init` and `decoder_step`, continuing `input_ids` as the prompt).
        input_ids: (B, S) int64 source ids (or prompts), right-padded; attention_mask: (B, S)
            1/0 int64.
        config: search settings, validated by the caller.
        on_token: greedy / sampling only: called with each step's (B·R,) new tokens (pad for
            rows already finished), for streaming.
        stops: (N, T) sequences → (N,) whether each ends in a stop string (`stop_strings`).
    """
    if config.num_beams > 1:
        from ferry.runtime.beam_search import beam_search

        return beam_search(graphs, input_ids, attention_mask, special=special, config=config,
                           stops=stops)
    steps = token_stream(graphs, input_ids, attention_mask, special=special, config=config,
                         stops=stops)
    tokens, scores = [], []
    for new_tokens, new_scores, _ in steps:
        if on_token is not None:
            on_token(new_tokens)
        tokens.append(new_tokens)
        scores.append(new_scores)
    sequences = np.stack(tokens, axis=1)  # (B·R, N)
    token_scores = np.stack(scores, axis=1).astype(np.float32)
    return GenerationOutput(sequences, token_scores, token_scores.sum(axis=1))


def token_stream(graphs: dict[str, GraphBackend], input_ids: np.ndarray,
                 attention_mask: np.ndarray, *, special: SpecialIds, config: GenerationConfig,
                 stops: Callable[[np.ndarray], np.ndarray] | None = None,
                 cancelled: Callable[[], np.ndarray] | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Greedy or sampled decoding, one step at a time: yields each step's (B·R,) tokens (pad for
    finished rows), their log-probs and the (B·R,) rows finished after it (a row's last token
    is in the step that finishes it), so callers can stream. The processors see the raw
    logits, as in `transformers`. `cancelled()`, asked after each step, gives the (B·R,) rows
    no longer wanted (a streaming client left): they finish there and leave the batch."""
    decoding = Decoding(graphs, special=special, config=config, stops=stops)
    cohort = decoding.admit(input_ids, attention_mask, cancelled=cancelled)
    while not cohort.ended:
        decoding.step()
        yield cohort.tokens, cohort.logprobs, cohort.done


class Cohort:
    """Rows admitted to a `Decoding` together (one call's inputs × num_return_sequences): their
    sequences so far, their own `Run` (prompt length, new-token budget) and, after each step
    they took part in, that step's `tokens` (pad for rows finished before), `logprobs` and
    `done` (rows finished after it; all once the cohort has `ended`)."""

    def __init__(self, run: Run, sequences: np.ndarray, ignored: np.ndarray,
                 cancelled: Callable[[], np.ndarray] | None) -> None:
        self.run, self.sequences, self.ignored = run, sequences, ignored  # (N, T), (N,)
        self.cancelled = cancelled
        rows = len(sequences)
        self.finished = np.zeros(rows, dtype=bool)
        self.stopped = np.zeros(rows, dtype=bool)  # ended by an EOS id or a stop string
        self.active = np.arange(rows)  # the rows still generating
        self.steps = 0
        self.ended = False
        self.tokens = self.logprobs = self.done = None

    @property
    def generated(self) -> np.ndarray:
        """(N, steps) the new tokens so far, pad after each row's end."""
        return self.sequences[:, self.run.prompt_length:]


class Decoding:
    """Greedy or sampled decoding of a batch that new inputs may join between steps
    (continuous batching): `admit` runs their prompts and they take part from the next `step`
    on, each `Cohort` under its own run (prompt, budget, processors' view), finished rows
    leaving at once. Joining a running batch needs steps that number each row's positions by
    its own mask (`joinable`): a decoder-only model's, and an encoder-decoder's exported since
    its step takes the decoder's attention mask; an older encoder-decoder bundle's batch takes
    all its inputs in one `admit`.

    Args:
        config: search settings (num_beams 1), validated by the caller; sampling draws from one
            generator seeded by `config.seed`.
    """

    def __init__(self, graphs: dict[str, GraphBackend], *, special: SpecialIds,
                 config: GenerationConfig,
                 stops: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.graphs, self.config, self.stops = graphs, config, stops
        self.special = with_overrides(special, config)
        self.rng = np.random.default_rng(config.seed) if config.do_sample else None
        self.state = None  # the running rows' decoding state (cohorts' active rows, in order)
        self.cohorts: list[Cohort] = []  # those with active rows, in the state's row order
        self.logits: np.ndarray | None = None  # (A, V) for the next step, once advanced
        self.joining: list[tuple[Cohort, object, np.ndarray]] = []  # admitted, prompts run

    @property
    def rows(self) -> int:
        """Rows generating or admitted to the next step."""
        return sum(int((~c.finished[c.active]).sum()) for c in self.cohorts if not c.ended) + sum(
            len(c.active) for c, _, _ in self.joining)

    def admit(self, input_ids: np.ndarray, attention_mask: np.ndarray, *,
              cancelled: Callable[[], np.ndarray] | None = None) -> Cohort:
        """Run the prompts (or the encoder) of a padded batch, (B, S) ids + mask; its B·R rows
        take part from the next `step`. `cancelled()`, asked after each step, gives the rows
        no longer wanted."""
        if self.rows and not joinable(self.graphs):
            raise FerryError("this bundle's encoder-decoder batch takes all its inputs in one "
                             "add (its decoder_step, exported by an older ferry, takes no "
                             "attention_mask; re-export it to batch continuously)")
        state = decoding_state(self.graphs, input_ids, attention_mask,
                               copies=self.config.num_return_sequences)
        sequences, ignored = state.start(self.special)  # (N, P), (N,)
        run = resolve_run(self.special, self.config, sequences.shape[1], self.stops)
        cohort = Cohort(run, sequences, ignored, cancelled)
        self.joining.append((cohort, state, state.first(sequences[:, -1:])))  # (N, V) logits
        return cohort

    def step(self) -> None:
        """One step of every cohort: advance the running rows by their last tokens, join the
        admitted ones, choose each row's next token; cohorts' `tokens` / `logprobs` / `done`
        tell the result."""
        self._advance()
        offset = 0
        for cohort in self.cohorts:
            logits = self.logits[offset:offset + len(cohort.active)]
            offset += len(cohort.active)
            self._choose(cohort, logits)

    def _advance(self) -> None:
        """The running rows' logits for this step (their finished rows gone), then the
        admitted cohorts' rows appended."""
        running = [c for c in self.cohorts if not c.ended]
        if self.cohorts:
            keep, offset, tokens = [], 0, []
            for cohort in self.cohorts:
                width = len(cohort.active)
                if not cohort.ended:
                    still = ~cohort.finished[cohort.active]
                    keep.append(offset + np.flatnonzero(still))
                    tokens.append(cohort.tokens[cohort.active[still]])
                    cohort.active = cohort.active[still]
                offset += width
            kept = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
            if len(kept) == 0:
                self.state, self.logits = None, None
            else:
                if len(kept) < offset:  # finished rows leave the batch: no more compute
                    self.state.keep(kept)
                self.logits = self.state.next(np.concatenate(tokens))
        self.cohorts = running if self.state is not None else []
        for cohort, state, logits in self.joining:
            if self.state is None:
                self.state, self.logits = state, logits
            else:
                self.state.join(state)
                self.logits = np.concatenate([self.logits, logits])
            self.cohorts.append(cohort)
        self.joining = []

    def _choose(self, cohort: Cohort, logits: np.ndarray) -> None:
        """The cohort's next tokens from its (A, V) logits, as `transformers` chooses them."""
        config, run, active = self.config, cohort.run, cohort.active
        at = run.at(cohort.sequences.shape[1], cohort.ignored[active])
        # the step's logits are this loop's own (a fresh array per step): processed in place
        scores = apply_processors(logits if logits.dtype == np.float32 and logits.flags.writeable
                                  else logits.astype(np.float32),
                                  cohort.sequences[active], at=at, config=config)
        if self.rng is not None:
            scores = apply_warpers(scores, config)
        if config.renormalize_logits:
            scores = log_softmax(scores)
        chosen = sample(scores, self.rng) if self.rng is not None else scores.argmax(axis=-1)
        rows = len(cohort.sequences)
        next_ids = np.full(rows, run.pad, dtype=np.int64)
        next_ids[active] = chosen
        logprobs = np.zeros(rows, dtype=np.float32)
        if config.output_scores:
            logprobs[active] = np.take_along_axis(log_softmax(scores), chosen[:, None],
                                                  axis=-1)[:, 0]
        cohort.sequences = np.concatenate([cohort.sequences, next_ids[:, None]], axis=1)
        ended = run.ends(cohort.sequences[active])
        cohort.stopped[active] = ended
        cohort.finished[active] |= ended
        if cohort.cancelled is not None:
            cohort.finished |= np.asarray(cohort.cancelled(), dtype=bool)
        cohort.steps += 1
        cohort.ended = bool(cohort.finished.all()) or cohort.steps == run.new_tokens
        cohort.tokens, cohort.logprobs = next_ids, logprobs
        cohort.done = np.ones(rows, dtype=bool) if cohort.ended else cohort.finished.copy()


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
