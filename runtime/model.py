"""`ferry.runtime.load(bundle, backend=...)`: text or ids in, text or ids out, on any backend."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ferry.batching import joined_rows, row_chunks
from ferry.errors import FerryError
from ferry.runtime.backends.base import GraphBackend, GraphSet, backend_loader, parse_backend
from ferry.runtime.bundle import Bundle
from ferry.runtime.chat import ChatTemplate
from ferry.runtime.generation import GenerationOutput, generate, graph_limits
from ferry.runtime.generation_config import GenerationConfig
from ferry.runtime.special_ids import SpecialIds
from ferry.runtime.stop_strings import StopStrings
from ferry.runtime.streaming import StreamingBatch, TextStream
from ferry.runtime.task_model import TaskModel
from ferry.runtime.tokenization import TextCodec, text_list
from ferry.runtime.variant_choice import fastest_model, measures


def integer_array(values: object, name: str) -> np.ndarray:
    """`values` as int64, refusing what is not integers already (floats would be truncated)."""
    try:
        array = np.asarray(values)
    except ValueError as exc:  # ragged nested lists
        raise FerryError(f"{name} must be a rectangular array of integers ({exc})") from exc
    if array.dtype.kind not in "iu":
        raise FerryError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64)


class Generator(GraphSet):
    """A generative model on one backend: text → text, ids → ids, or a token stream. An
    encoder-decoder maps each source to its output; a decoder-only model continues each prompt
    (the output is the continuation alone).

    Generation arguments are those of `GenerationConfig` (Hugging Face `generate()` names):
    greedy by default; `num_beams` for beam search; `do_sample` with `temperature`, `top_k`,
    `top_p`, `seed` for sampling; penalties and forced / suppressed tokens in every mode. A
    bundle imported from Hugging Face carries its model's `generation_config.json` settings as
    defaults (`generation_defaults`), which arguments override, as in `generate()`.
    Thread-safe once loaded: backends hold no per-call state.
    """

    def __init__(
        self, graphs: dict[str, GraphBackend], codec: TextCodec, special: SpecialIds,
        *, backend: str, bundle: Bundle | None = None,
    ) -> None:
        self.graphs = graphs
        self.codec = codec
        self.special = special
        self.backend = backend
        self.bundle = bundle
        self.generation_defaults = dict(bundle.manifest.generation) if bundle else {}
        self.vocab_size, self.decoder_positions = graph_limits(graphs)
        # a Hugging Face tokenizer's chat template ({"template", "special_tokens"}), if any
        self.chat_template = dict(bundle.manifest.chat_template) if bundle else {}
        self._compiled_chat: ChatTemplate | None = None  # compiled on first use (jinja2)
        # validating a config costs more than a served request's other checks together, and
        # callers (a server's clients) repeat the same few settings: kept by their JSON text
        self._config_of_json = functools.lru_cache(maxsize=256)(
            lambda text: self._validated_config(json.loads(text)))

    def generation_config(self, **kwargs) -> GenerationConfig:
        """A validated GenerationConfig (frozen; the same object for the same arguments): the
        bundle's defaults, overridden by `kwargs`; an invalid argument is a FerryError naming
        it."""
        try:
            text = json.dumps(kwargs, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError):  # not JSON (numpy numbers, NaN): validated afresh
            return self._validated_config(kwargs)
        return self._config_of_json(text)

    def _validated_config(self, kwargs: dict) -> GenerationConfig:
        config = GenerationConfig.from_kwargs(**{**self.generation_defaults, **kwargs}).validate(
            vocab_size=self.vocab_size, max_positions=self.decoder_positions)
        rows = self.graphs["decoder_init"].spec.dims["batch"].max
        for name in ("num_beams", "num_return_sequences"):
            if getattr(config, name) > rows:
                raise FerryError(f"invalid generation argument {name}={getattr(config, name)}: "
                                 f"expected at most {rows}, the rows the graphs take at once")
        return config

    def generate(self, texts: str | list[str], *, truncation: bool | int = False,
                 **kwargs) -> list[str] | list[list[str]]:
        """Generate for each text: one string per input, or a list of `num_return_sequences`
        strings per input when that is > 1. `truncation` cuts over-long inputs (True: to the
        model's positions; an int: to that many tokens) instead of refusing them."""
        config = self.generation_config(**kwargs)
        return self._texts(*self.codec.encode(text_list(texts), truncation), config)

    def _texts(self, input_ids: np.ndarray, attention_mask: np.ndarray,
               config: GenerationConfig) -> list[str] | list[list[str]]:
        """Generated texts: one per input, or a list of `num_return_sequences` per input."""
        decoded = self.codec.decode(self._generate(input_ids, attention_mask, config).sequences)
        per_input = config.num_return_sequences
        if per_input == 1:
            return decoded
        return [decoded[i : i + per_input] for i in range(0, len(decoded), per_input)]

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a conversation (`[{"role", "content"}, …]`) by the bundle's chat
        template, ending where the assistant's answer begins — what `transformers`'
        `apply_chat_template(messages, add_generation_prompt=True)` makes."""
        if not self.chat_template:
            raise FerryError("this bundle has no chat template (only bundles imported from a "
                             "Hugging Face tokenizer that has one do); use generate")
        if self._compiled_chat is None:
            self._compiled_chat = ChatTemplate(self.chat_template["template"],
                                               self.chat_template["special_tokens"])
        return self._compiled_chat.render(messages)

    def chat(self, messages: list[dict[str, str]], **kwargs) -> str | list[str]:
        """The assistant's answer to a conversation (a list of them with
        num_return_sequences > 1); arguments as `generate`."""
        ids, mask = self.codec.encode([self.chat_prompt(messages)], add_special_tokens=False)
        return self._texts(ids, mask, self.generation_config(**kwargs))[0]

    def generate_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                     **kwargs) -> np.ndarray:
        """(B, S) int64 source ids (right-padded) + optional mask → (B·R, N) generated ids."""
        return self._generate(input_ids, attention_mask,
                              self.generation_config(**kwargs)).sequences

    def generate_output(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                        **kwargs) -> GenerationOutput:
        """Like `generate_ids`, with per-token log-probs and sequence scores."""
        return self._generate(input_ids, attention_mask,
                              self.generation_config(output_scores=True, **kwargs))

    def _generate(self, input_ids, attention_mask, config: GenerationConfig) -> GenerationOutput:
        input_ids, attention_mask = self._checked(input_ids, attention_mask)
        self.check_room(attention_mask, config)
        # Batches larger than the graphs' declared batch range run in chunks (a seeded sampler
        # is reseeded per chunk with seed + chunk index).
        stops = (StopStrings(self.codec.tokenizer, config.stop_strings)
                 if config.stop_strings else None)
        chunk = self.graphs["decoder_init"].spec.dims["batch"].max // config.num_beams
        chunk = max(1, chunk // config.num_return_sequences)
        pieces = []
        for index, rows in enumerate(row_chunks(len(input_ids), chunk)):
            chunk_config = config if config.seed is None or index == 0 else dataclasses.replace(
                config, seed=config.seed + index)
            pieces.append(generate(self.graphs, input_ids[rows], attention_mask[rows],
                                   special=self.special, config=chunk_config, stops=stops))
        return GenerationOutput(
            joined_rows([p.sequences for p in pieces], self.special.pad),
            joined_rows([p.token_scores for p in pieces], 0.0),
            joined_rows([p.sequence_scores for p in pieces]),
        )

    def check_room(self, attention_mask: np.ndarray, config: GenerationConfig) -> None:
        """Refuse a decoder-only batch whose longest prompt plus its new tokens exceeds the
        model's positions (a prompt shares them with its continuation)."""
        if "encoder" in self.graphs or not attention_mask.size:
            return
        longest = int(attention_mask.sum(axis=1).max())
        if longest + config.new_tokens(longest) > self.decoder_positions:
            raise FerryError(f"a prompt of {longest} tokens plus {config.new_tokens(longest)} "
                             f"new tokens exceeds the model's {self.decoder_positions} "
                             "positions; lower max_new_tokens or shorten the prompt")

    def encode(self, texts: str | list[str], truncation: bool | int = False, *,
               add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Texts → the (B, S) right-padded ids and mask generation takes, checked."""
        return self._checked(*self.codec.encode(text_list(texts), truncation,
                                                add_special_tokens=add_special_tokens))

    def streaming_batch(self, **kwargs) -> StreamingBatch:
        """An empty `StreamingBatch` under these generation arguments (greedy or sampling):
        `add` inputs, `step` them; a decoder-only model's batch takes new inputs between
        steps (continuous batching)."""
        return StreamingBatch(self, self.stream_config(**kwargs))

    def stream_config(self, **kwargs) -> GenerationConfig:
        """`generation_config` for streaming: greedy or sampling, one sequence per input."""
        config = self.generation_config(**kwargs)
        if config.num_beams > 1 or config.num_return_sequences > 1:
            raise FerryError(f"streaming needs num_beams=1 and num_return_sequences=1 (got "
                             f"{config.num_beams} and {config.num_return_sequences}; the "
                             "bundle's generation defaults apply unless you pass them)")
        return config

    def stream(self, text: str, *, truncation: bool | int = False, **kwargs) -> Iterator[str]:
        """Yield the generated text for one input piece by piece as tokens arrive (greedy or
        sampling). The pieces join to exactly what `generate` returns."""
        if not isinstance(text, str):
            raise FerryError(f"stream takes one text (a string), got {type(text).__name__}")
        for pieces in self.stream_batch([text], truncation=truncation, **kwargs):
            if pieces[0]:
                yield pieces[0]

    def stream_batch(self, texts: list[str], *, truncation: bool | int = False,
                     cancelled: Callable[[], Sequence[bool]] | None = None,
                     add_special_tokens: bool = True,
                     **kwargs) -> Iterator[list[str | None]]:
        """Generate for several inputs at once, yielding after each step the new text of every
        input ("" where the step added none, e.g. a held-back partial character; None once the
        input has ended: its last text came in an earlier step). Each input's pieces join to
        exactly what `generate` returns for it. Greedy or
        sampling; inputs beyond the graphs' batch rows stream in turn. `cancelled()`, asked
        after each step, says which inputs are no longer wanted: their rows leave the batch
        (they cost no more compute) and get no more text. `add_special_tokens=False` for
        prompts that carry their special tokens as text (`chat_prompt`)."""
        config = self.stream_config(**kwargs)
        input_ids, attention_mask = self.encode(texts, truncation,
                                                add_special_tokens=add_special_tokens)
        rows = self.graphs["decoder_init"].spec.dims["batch"].max
        streams: list[TextStream | None] = [None] * len(input_ids)  # None: not started yet
        for index, chunk in enumerate(row_chunks(len(input_ids), rows)):
            chunk_config = config if config.seed is None or index == 0 else dataclasses.replace(
                config, seed=config.seed + index)  # as `generate` reseeds its chunks
            batch = StreamingBatch(self, chunk_config)
            stopped = None if cancelled is None else (
                lambda rows=chunk: np.asarray(cancelled(), dtype=bool)[rows])
            streams[chunk] = batch.add(input_ids[chunk], attention_mask[chunk],
                                       cancelled=stopped)
            while batch.rows:
                ended = [stream is not None and stream.ended for stream in streams]
                batch.step()
                yield [None if done else "" if stream is None else stream.piece
                       for stream, done in zip(streams, ended)]

    def _checked(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        input_ids = integer_array(input_ids, "input_ids")
        if input_ids.ndim != 2:
            raise FerryError(f"input_ids must be a (batch, length) array, got shape "
                             f"{input_ids.shape}")
        if input_ids.shape[1] > self.codec.max_length:
            raise FerryError(f"input_ids has length {input_ids.shape[1]} but the model has "
                             f"{self.codec.max_length} positions; shorten the input")
        if input_ids.size and not 0 <= input_ids.min() <= input_ids.max() < self.vocab_size:
            raise FerryError(f"input_ids must lie in [0, {self.vocab_size}) (the model's "
                             f"vocabulary), got values in [{input_ids.min()}, "
                             f"{input_ids.max()}]; encode text with the bundle's tokenizer")
        if attention_mask is None:
            attention_mask = (input_ids != self.special.pad).astype(np.int64)
        attention_mask = integer_array(attention_mask, "attention_mask")
        if attention_mask.shape != input_ids.shape or not np.isin(attention_mask, (0, 1)).all():
            raise FerryError(f"attention_mask must be 1/0 of input_ids' shape {input_ids.shape}, "
                             f"got shape {attention_mask.shape}")
        return input_ids, attention_mask


def check_option(backend: str, name: str, value: object, annotation: str) -> None:
    """A backend option against its loader's annotation (`int`, `str | None`, `list[str] |
    None`, …); integers must be ≥ 0 (thread counts, device ids). One error naming it."""
    kinds = [k.strip() for k in annotation.split("|")]
    ok = (value is None and "None" in kinds) or any(
        (kind == "int" and isinstance(value, int) and not isinstance(value, bool) and value >= 0)
        or (kind == "str" and isinstance(value, str))
        or (kind == "bool" and isinstance(value, bool))
        or (kind == "list[str]" and isinstance(value, list | tuple)
            and all(isinstance(v, str) for v in value))
        for kind in kinds)
    if not ok:
        expected = " or ".join("an integer ≥ 0" if k == "int" else k for k in kinds)
        raise FerryError(f"backend {backend!r} option {name}={value!r}: expected {expected}")


def load(bundle: str | Path | Bundle, backend: str = "onnxruntime", **options
         ) -> Generator | TaskModel:
    """Open a bundle (verifying checksums) and load its graphs on `backend`: a `Generator`
    for an encoder-decoder bundle, a `TaskModel` (classify / tag / answer / prompts) for an
    encoder-only or decoder-only one.

    Args:
        bundle: a bundle directory written by `ferry export onnx`, or an opened `Bundle`.
        backend: `name[:precision]`: "onnxruntime" (numpy + onnxruntime only; on a CPU, of
            the bundle's fused and portable fp32 graphs the faster on this machine — measured
            at the bundle's first load here and recorded, `ferry.runtime.variant_choice`; also
            "onnxruntime-cuda" / "onnxruntime-tensorrt" for those providers), "tensorrt"
            (engines built by `ferry export tensorrt`) or "torch" (the reference; "torch-cuda");
            a precision variant after a colon, e.g. "onnxruntime:int8", "tensorrt:fp16".
        options: backend options, e.g. `intra_op_threads=2` or `providers=["cuda"]` for
            onnxruntime, `device="cuda"` for torch.
    """
    name, implied = parse_backend(backend)
    options = {**implied, **options}
    loader = backend_loader(name)
    if not isinstance(bundle, str | Path | Bundle):
        raise FerryError(f"bundle must be a bundle directory's path, got {bundle!r}")
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    ids = bundle.special_ids
    codec = TextCodec.from_file(bundle.file("tokenizer"), pad_id=ids["pad"],
                                max_length=bundle.model_config["max_positions"])
    parameters = {p: v for p, v in inspect.signature(loader).parameters.items() if p != "bundle"}
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise FerryError(f"backend {name!r} has no option(s) {unknown}; it accepts "
                         f"{list(parameters)}")
    for option, value in options.items():
        check_option(name, option, value, str(parameters[option].annotation))
    if name == "onnxruntime" and measures(bundle, options):  # this CPU's faster fp32 variant
        model, _ = fastest_model(bundle, options, lambda precision: load(
            bundle, backend, **options, precision=precision))
        return model
    graphs = loader(bundle, **options)
    # the precision asked for, else the one the loader chose (onnxruntime: fused or fp32)
    precision = options.get("precision") or next(iter(graphs.values())).precision
    label = backend if precision == "fp32" or ":" in backend else f"{backend}:{precision}"
    special = SpecialIds.from_ids(ids)
    if bundle.manifest.architecture != "encoder-decoder":
        prompts = TextCodec(codec.tokenizer, pad_id=ids["pad"], max_length=codec.max_length,
                            prompts=True)
        generator = (Generator(graphs, prompts, special, backend=label, bundle=bundle)
                     if "decoder_step" in graphs else None)
        return TaskModel(graphs, codec.tokenizer, special=special, model_config=bundle.model_config,
                         task=bundle.manifest.task, backend=label, bundle=bundle,
                         generator=generator)
    return Generator(graphs, codec, special, backend=label, bundle=bundle)
