"""Text streams of inputs decoded together: a `StreamingBatch` turns a `Decoding`'s tokens into
each input's text, piece by piece, and takes new inputs between steps on a decoder-only model
(continuous batching). `Generator.stream_batch` and the server's batches both run on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ferry.errors import FerryError
from ferry.runtime.generation import Cohort, Decoding
from ferry.runtime.generation_config import GenerationConfig

if TYPE_CHECKING:
    from ferry.runtime.model import Generator


@dataclass
class TextStream:
    """One input's generation in a `StreamingBatch`.

    text: the generated text so far (what its pieces join to); piece: the last step's new text
    ("" where it added none, e.g. a held-back partial character; None once the stream ended in
    an earlier step); tokens: generated tokens, an ending EOS included; stopped: it ended on an
    EOS id or a stop string (not on its budget, nor cancelled).
    """

    prompt_tokens: int
    text: str = ""
    piece: str | None = ""
    tokens: int = 0
    ended: bool = False
    stopped: bool = False

    @property
    def finish_reason(self) -> str:
        """OpenAI's name for why it ended: "stop" (EOS or stop string) or "length"."""
        return "stop" if self.stopped else "length"


class StreamingBatch:
    """Inputs generating together under one greedy or sampling config, each with its
    `TextStream`; `step` advances all of them. The batch takes new inputs (`add`) between
    steps: they run their prompts (or the encoder) and join the running rows (see `Decoding`).

    Args:
        generator: the loaded model; config: from its `stream_config`.
    """

    def __init__(self, generator: Generator, config: GenerationConfig) -> None:
        from ferry.runtime.stop_strings import StopStrings

        self.generator, self.config = generator, config
        stops = (StopStrings(generator.codec.tokenizer, config.stop_strings)
                 if config.stop_strings else None)
        self.decoding = Decoding(generator.graphs, special=generator.special, config=config,
                                 stops=stops)
        # those still streaming, and whether they want a piece per step
        self.groups: list[tuple[Cohort, list[TextStream], bool]] = []

    @property
    def rows(self) -> int:
        """Rows generating now or from the next step."""
        return self.decoding.rows

    def add(self, input_ids: np.ndarray, attention_mask: np.ndarray, *,
            cancelled: Callable[[], np.ndarray] | None = None,
            pieces: bool = True) -> list[TextStream]:
        """Start a (B, S) padded batch of inputs (`Generator.encode`); their streams take
        part from the next `step`. `cancelled()`, asked after each step, gives the (B,) inputs
        no longer wanted: they end there and leave the batch. `pieces=False`: their text is
        decoded once, when each ends (no `piece` per step). The batch of an encoder-decoder
        bundle exported before its step took the decoder's mask takes all its inputs in one
        `add` (a FerryError otherwise)."""
        if self.config.num_return_sequences != 1:
            raise FerryError("a streaming batch generates one sequence per input")
        self.generator.check_room(attention_mask, self.config)
        cohort = self.decoding.admit(input_ids, attention_mask, cancelled=cancelled)
        streams = [TextStream(int(n)) for n in attention_mask.sum(axis=1)]
        self.groups.append((cohort, streams, pieces))
        return list(streams)

    def step(self) -> None:
        """One token for every running input: each stream's `piece`, `text`, `tokens` and
        `ended` updated (an ended stream's last text comes in the step that ends it)."""
        self.decoding.step()
        for cohort, streams, pieces in self.groups:
            live = [i for i, stream in enumerate(streams) if not stream.ended]
            for stream in streams:
                stream.piece = None if stream.ended else ""
            decoded = live if pieces else [i for i in live if cohort.done[i]]
            texts = dict(zip(decoded, self.generator.codec.decode(cohort.generated[decoded])
                             if decoded else []))
            for row in live:
                stream, done = streams[row], bool(cohort.done[row])
                stream.tokens += 1
                so_far = texts.get(row)
                # the rest of an ended input's text; else hold back while the text ends in an
                # incomplete multi-byte character
                if so_far is not None and (done or (
                        so_far != stream.text and so_far.startswith(stream.text)
                        and not so_far.endswith("\ufffd"))):
                    stream.piece = so_far[len(stream.text):]
                    stream.text = so_far
                stream.ended, stream.stopped = done, bool(cohort.stopped[row])
        self.groups = [group for group in self.groups if not all(t.ended for t in group[1])]
