"""What a served bundle can do, as checked requests and batched calls: a request body becomes a
batching key (requests with equal keys share a backend call) and a list of inputs; `run`
computes the results of one batch. HTTP is the app's business, not this file's."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ferry.errors import FerryError
from ferry.runtime.decoding_state import joinable
from ferry.runtime.generation import end_ids, with_overrides
from ferry.runtime.model import Generator
from ferry.runtime.serve.batcher import Admissions, QueuedRequest
from ferry.runtime.serve.limits import ServeLimits
from ferry.runtime.streaming import TextStream
from ferry.runtime.task_model import TaskModel
from ferry.runtime.tokenization import encode_each, text_list

TASK_ENDPOINTS = {"classify": "sequence_classification", "tag": "token_classification",
                  "answer": "question_answering"}
_alone = itertools.count()  # keys of requests that must not share a call


@dataclass(frozen=True)
class Completion:
    """One generated text and what a client is told about it."""

    text: str | list[str]  # a list with num_return_sequences > 1
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class StreamSink:
    """Where a batched stream hands one request its pieces (from the worker thread to the
    request's event loop) and says it has ended (`end`, at once: the rest of the batch may run
    on); `gone` once its client has left."""

    def __init__(self, emit: Callable[[str], None], end: Callable[[], None]) -> None:
        self.emit, self.end, self.gone = emit, end, False


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed every check: its batching key and its inputs."""

    key: Hashable
    inputs: list[Any]


class ModelService:
    """A loaded bundle (`ferry.runtime.load`) behind the server: its capabilities, request
    checks against `limits`, and batched execution (`run`)."""

    def __init__(self, model: Generator | TaskModel, limits: ServeLimits) -> None:
        self.model, self.limits = model, limits
        if isinstance(model, Generator):
            self.generator, self.tokenizer = model, model.codec.tokenizer
        else:
            self.generator, self.tokenizer = model.generator, model.tokenizer
        head = getattr(model, "model_config", {}).get("task_head")
        self.capabilities = ["generate"] if self.generator is not None else []
        self.capabilities += [name for name, kind in TASK_ENDPOINTS.items() if head == kind]
        if (isinstance(model, TaskModel) and "classify" not in self.capabilities
                and {"lm", "decoder_init"} & set(model.graphs)):
            self.capabilities.append("classify")  # zero-/few-shot from a prompt
        if self.generator is not None and self.generator.chat_template:
            self.capabilities.append("chat")

    # ------------------------------------------------------------------ checks

    def check(self, endpoint: str, body: Any) -> CheckedRequest:
        """The request body of `endpoint` checked; a FerryError names what is wrong."""
        if endpoint not in self.capabilities:
            raise FerryError(f"this bundle cannot {endpoint}; it serves "
                             f"{', '.join(self.capabilities) or 'nothing'}")
        if not isinstance(body, dict):
            raise FerryError("the request body must be a JSON object")
        return getattr(self, f"_check_{endpoint}")(body)

    def generation_settings(self, body: dict) -> tuple[list[str], dict, bool | int, bool]:
        """(texts, generation arguments, truncation, add_special_tokens) of a generation
        request, checked: the arguments by `generate()`'s names, the new tokens within
        `max_new_tokens` (a request that names no length gets at most that many), each input
        within `max_input_tokens`. `add_special_tokens` false: the inputs carry their special
        tokens as text (chat prompts)."""
        self._only(body, {"inputs", "parameters", "truncation", "add_special_tokens"})
        truncation = self._truncation(body.get("truncation", False))
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise FerryError(f"add_special_tokens must be true or false, got {special!r}")
        texts = self._texts(body.get("inputs"), "inputs", limit_tokens=not truncation)
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise FerryError("parameters must be a JSON object of generation arguments")
        config = self.generator.generation_config(**parameters)
        _, mask = self.generator.codec.encode(texts, truncation, add_special_tokens=special)
        budget = max(config.new_tokens(n) for n in self._decoder_prompt_lengths(mask))
        if budget > self.limits.max_new_tokens and not {"max_new_tokens", "max_length"} & set(
                parameters):  # the bundle's default: cut to the server's limit
            parameters = {**parameters, "max_new_tokens": self.limits.max_new_tokens}
            config = self.generator.generation_config(**parameters)
        elif budget > self.limits.max_new_tokens:
            raise FerryError(f"the request asks for {budget} new tokens; this server's limit "
                             f"max_new_tokens is {self.limits.max_new_tokens}")
        self.generator.check_room(mask, config)  # prompt + new tokens within the positions
        return texts, parameters, truncation, special

    def _check_generate(self, body: dict) -> CheckedRequest:
        texts, parameters, truncation, special = self.generation_settings(body)
        return CheckedRequest(self._generation_key("generate", parameters, truncation, special),
                              texts)

    @staticmethod
    def _generation_key(kind: str, parameters: dict, truncation: bool | int,
                        special: bool) -> Hashable:
        seeded = parameters.get("do_sample") and parameters.get("seed") is not None
        # a seeded sample is reproducible only alone: a batch draws its rows from one generator
        return (kind, json.dumps(parameters, sort_keys=True), truncation, special,
                next(_alone) if seeded else None)

    def check_stream(self, body: Any) -> tuple[Hashable, str]:
        """(batching key, text) of a streamed generation: one input, greedy or sampling."""
        if "generate" not in self.capabilities:
            raise FerryError("this bundle cannot generate")
        texts, parameters, truncation, special = self.generation_settings(
            body if isinstance(body, dict) else {})
        if len(texts) != 1 or not isinstance(body.get("inputs"), str):
            raise FerryError("a stream takes one input (a string)")
        self.generator.stream_config(**parameters)  # refused here, before it is queued
        return self._generation_key("stream", parameters, truncation, special), texts[0]

    def _check_classify(self, body: dict) -> CheckedRequest:
        self._only(body, {"inputs", "pairs", "prompt", "labels", "truncation"})
        truncation = self._truncation(body.get("truncation", False))
        texts = self._texts(body.get("inputs"), "inputs", limit_tokens=not truncation)
        pairs = body.get("pairs")
        if pairs is not None:
            pairs = text_list(pairs, "pairs")
            if len(pairs) != len(texts):
                raise FerryError(f"{len(texts)} inputs but {len(pairs)} pairs; give one each")
        options = {"prompt": body.get("prompt"), "labels": body.get("labels"),
                   "truncation": truncation}
        key = ("classify", json.dumps(options, sort_keys=True), pairs is not None)
        return CheckedRequest(key, [(t, None if pairs is None else p)
                                    for t, p in zip(texts, pairs or texts)])

    def _check_tag(self, body: dict) -> CheckedRequest:
        self._only(body, {"inputs", "truncation"})
        truncation = self._truncation(body.get("truncation", False))
        texts = self._texts(body.get("inputs"), "inputs", limit_tokens=not truncation)
        return CheckedRequest(("tag", truncation), texts)

    def _check_answer(self, body: dict) -> CheckedRequest:
        self._only(body, {"questions", "contexts"})
        questions = self._texts(body.get("questions"), "questions", limit_tokens=False)
        contexts = text_list(body.get("contexts"), "contexts")
        if len(questions) != len(contexts):
            raise FerryError(f"{len(questions)} questions but {len(contexts)} contexts; give "
                             "one context per question")
        # long contexts are read in overlapping windows: only the question is limited
        return CheckedRequest(("answer",), list(zip(questions, contexts)))

    def _texts(self, value: Any, what: str, *, limit_tokens: bool = True) -> list[str]:
        texts = text_list(value, what)
        if len(texts) > self.limits.max_inputs:
            raise FerryError(f"{len(texts)} {what} in one request; this server's limit "
                             f"max_inputs is {self.limits.max_inputs}")
        cap = self.limits.max_input_tokens
        if cap is not None and limit_tokens:
            longest = max(len(e.ids) for e in encode_each(self.tokenizer, texts))
            if longest > cap:
                raise FerryError(f"an input has {longest} tokens; this server's limit "
                                 f"max_input_tokens is {cap} (or ask for truncation)")
        return texts

    def _truncation(self, value: Any) -> bool | int:
        if isinstance(value, bool) or (isinstance(value, int) and value > 0):
            cap = self.limits.max_input_tokens
            if cap is not None and value is True:
                return cap
            return value
        raise FerryError(f"truncation must be true, false or a token count, got {value!r}")

    @staticmethod
    def _only(body: dict, known: set[str]) -> None:
        unknown = sorted(set(body) - known)
        if unknown:
            raise FerryError(f"unknown field(s) {unknown}; expected {sorted(known)}")

    # ------------------------------------------------------------------ batched calls

    def run(self, key: Hashable, inputs: list[Any]) -> list[Any]:
        """The results of one batch of inputs whose requests share `key`."""
        endpoint = key[0]
        model = self.model
        if endpoint in ("generate", "stream"):
            _, settings, truncation, special, _ = key
            run = self.complete if endpoint == "generate" else self.stream
            return run(inputs, json.loads(settings), truncation, special)
        if endpoint == "classify":
            options = json.loads(key[1])
            texts = [text for text, _ in inputs]
            pairs = [pair for _, pair in inputs] if key[2] else None
            return model.classify(texts, pairs, **options)
        if endpoint == "tag":
            return model.tag(inputs, truncation=key[1])
        if endpoint == "answer":
            return model.answer([q for q, _ in inputs], [c for _, c in inputs])
        raise FerryError(f"unknown endpoint {endpoint!r}")

    def continuous(self, key: Hashable) -> bool:
        """Whether a batch of `key` runs as a `StreamingBatch` (`run_continuous`): greedy or
        sampled generation, one sequence per input, each request answered as soon as its
        rows end. A decoder-only model's batch takes new requests between its steps."""
        if not self.limits.continuous or key[0] not in ("generate", "stream"):
            return False
        config = self.generator.generation_config(**json.loads(key[1]))
        return config.num_beams == 1 and config.num_return_sequences == 1

    def run_continuous(self, key: Hashable, admissions: Admissions) -> None:
        """Run a continuous batch of `key`: the requests `admissions` gives join it between
        steps while it has rows free (`limits.max_batch`, the graphs' batch rows) — not the
        batch of an encoder-decoder bundle exported before its step took the decoder's mask
        (`joinable`: its next batch forms as usual); each request is settled, and each stream
        ended, as soon as its own inputs are done; a request whose client left has its rows
        leave the batch."""
        endpoint, settings, truncation, special, _ = key
        parameters = json.loads(settings)
        batch = self.generator.streaming_batch(**parameters)
        rows = min(self.limits.max_batch,
                   self.generator.graphs["decoder_init"].spec.dims["batch"].max)
        joins, streamed = joinable(self.generator.graphs), endpoint == "stream"
        running: list[tuple[QueuedRequest, list[TextStream]]] = []
        first = True
        while True:
            room = rows - batch.rows if joins or first else 0
            first = False
            joining = self._admitted(key, admissions.take(room, batch.rows), rows)
            if joining:  # one prompt (or encoder) call for the group
                requests = [request for request, _ in joining]
                texts = [text for _, group in joining for text in group]
                streams = batch.add(*self.generator.encode(texts, truncation,
                                                           add_special_tokens=special),
                                    cancelled=_left(requests, streamed), pieces=streamed)
                for request, group in joining:
                    running.append((request, streams[:len(group)]))
                    streams = streams[len(group):]
            if not batch.rows:
                return
            batch.step()
            still = []
            for request, streams in running:
                if streamed:
                    for stream, (_, sink) in zip(streams, request.inputs):
                        _hand_over(stream, sink)
                if not all(stream.ended for stream in streams):
                    still.append((request, streams))
                elif streamed:
                    request.resolve([None] * len(streams))
                else:
                    request.resolve([Completion(s.text, s.prompt_tokens, s.tokens,
                                                s.finish_reason) for s in streams])
            running = still

    def _admitted(self, key: Hashable, requests: list[QueuedRequest], rows: int
                  ) -> list[tuple[QueuedRequest, list[str]]]:
        """The requests that join a streaming batch, with their texts (checked when they came
        in); one with more inputs than its `rows` is answered alone, by `run`."""
        admitted = []
        for request in requests:
            texts = [text for text, _ in request.inputs] if key[0] == "stream" else request.inputs
            if len(texts) <= rows:
                admitted.append((request, texts))
                continue
            try:  # more than a batch holds: in turn, alone
                request.resolve(self.run(key, request.inputs))
            except FerryError as error:
                request.fail(error)
        return admitted

    def complete(self, texts: list[str], parameters: dict, truncation: bool | int,
                 special: bool = True) -> list[Completion]:
        """Generate for `texts` in one call: a `Completion` per text."""
        generator = self.generator
        ids, mask = generator.codec.encode(texts, truncation, add_special_tokens=special)
        config = generator.generation_config(**parameters)
        sequences = generator.generate_ids(ids, mask, **parameters)
        per_input = config.num_return_sequences
        eos = set(end_ids(generator.special, config))
        pad = with_overrides(generator.special, config).pad
        results = []
        decoder_prompts = self._decoder_prompt_lengths(mask)
        for i, prompt_length in enumerate(mask.sum(axis=1).tolist()):
            rows = sequences[i * per_input : (i + 1) * per_input]
            lengths = [_generated_length(row, eos, pad) for row in rows]
            stopped = any(n and row[n - 1] in eos for row, n in zip(rows, lengths))
            budget = config.new_tokens(decoder_prompts[i])
            reason = "stop" if stopped or max(lengths) < budget else "length"
            decoded = generator.codec.decode(rows)
            results.append(Completion(decoded[0] if per_input == 1 else decoded,
                                      int(prompt_length), int(sum(lengths)), reason))
        return results

    def _decoder_prompt_lengths(self, mask: np.ndarray) -> list[int]:
        """What `GenerationConfig.new_tokens` counts as each row's prompt: a decoder-only
        model's prompt tokens, an encoder-decoder's decoder start token."""
        if "encoder" in self.generator.graphs:
            return [1] * len(mask)
        return [int(n) for n in mask.sum(axis=1)]

    def stream(self, inputs: list[tuple[str, StreamSink]], parameters: dict,
               truncation: bool | int, special: bool = True) -> list[None]:
        """Stream a batch of generations, each piece to its request's sink; the rows of
        clients that left leave the batch."""
        sinks = [sink for _, sink in inputs]
        for pieces in self.generator.stream_batch(
                [text for text, _ in inputs], truncation=truncation, add_special_tokens=special,
                cancelled=lambda: [sink.gone for sink in sinks], **parameters):
            for piece, sink in zip(pieces, sinks):
                if piece and not sink.gone:
                    sink.emit(piece)
                if piece is None and not sink.gone:  # ended in the step before
                    sink.gone = True
                    sink.end()
        return [None] * len(inputs)

    def warm_up(self) -> None:
        """One small call per capability, so the first client does not pay for it."""
        if "generate" in self.capabilities:
            self.complete(["warm up"], {"max_new_tokens": 2}, True)
        if "classify" in self.capabilities and "head" in self.model.graphs:
            self.model.classify(["warm up"], ["warm up"] if self.model.task.get("pairs") else None,
                                truncation=True)
        if "tag" in self.capabilities:
            self.model.tag(["warm up"], truncation=True)
        if "answer" in self.capabilities:
            self.model.answer(["warm up?"], ["warm up"])


def _left(requests: list[QueuedRequest], streamed: bool) -> Callable[[], list[bool]]:
    """Which of the requests' inputs nobody waits for any more: a stream's client left, or
    the request was abandoned (its client left, its time ran out)."""
    if streamed:
        sinks = [sink for request in requests for _, sink in request.inputs]
        return lambda: [sink.gone for sink in sinks]
    return lambda: [request.future.abandoned for request in requests
                    for _ in request.inputs]


def _hand_over(stream: TextStream, sink: StreamSink) -> None:
    """A stream's new piece to its sink, and its end, unless its client has left."""
    if sink.gone:
        return
    if stream.piece:
        sink.emit(stream.piece)
    if stream.ended:
        sink.gone = True
        sink.end()


def _generated_length(row: np.ndarray, eos: set[int], pad: int) -> int:
    """Tokens of a generated row up to and including its first EOS (the rest is padding)."""
    for position, token in enumerate(row.tolist()):
        if token in eos:
            return position + 1
    return int((row != pad).sum())
