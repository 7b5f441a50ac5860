"""Encoder-only and decoder-only models on one backend: classify, tag, answer, score prompts.

The bundle says what the model was trained for (`manifest["task"]`): its labels, whether it
reads sentence pairs, and the prompt of a prompt-trained model. Any model with an `lm` graph
(a masked or causal language model) also classifies zero- or few-shot from a prompt.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from ferry.batching import joined_rows, padding_mask, right_padded, row_chunks
from ferry.errors import FerryError
from ferry.graph_spec import MEMORY_INPUTS
from ferry.runtime.backends.base import Feed, GraphBackend, GraphSet
from ferry.runtime.bundle import Bundle
from ferry.runtime.logits_processing import log_softmax
from ferry.runtime.prompts import Prompt, label_scores, prompt_rows
from ferry.runtime.recurrence import LONG_INPUT_SEGMENTS, has_memory, infer_segments
from ferry.runtime.special_ids import SpecialIds
from ferry.runtime.text_tasks import (
    EncodedBatch,
    best_span,
    bio_entities,
    context_tokens,
    encode_texts,
    first_tokens,
    pad_encodings,
    truncating,
    word_spans,
)
from ferry.runtime.tokenization import encode_each, text_list

MAX_ANSWER_TOKENS = 30
STRIDE = 32  # context tokens shared by neighbouring windows of an over-long QA input


class TaskModel(GraphSet):
    """A task-head or language model (encoder-only / decoder-only) on one backend.

    Thread-safe once loaded: backends hold no per-call state.
    """

    def __init__(self, graphs: dict[str, GraphBackend], tokenizer: Tokenizer, *,
                 special: SpecialIds, model_config: dict, task: dict, backend: str,
                 bundle: Bundle | None = None, generator=None) -> None:
        self.graphs = graphs
        self.tokenizer = tokenizer
        self.special = special
        self.model_config = model_config
        self.task = task
        self.backend = backend
        self.bundle = bundle
        # a segment-recurrent model (XLNet's memory) reads longer inputs segment by segment
        self.max_length = model_config["max_positions"] * (
            LONG_INPUT_SEGMENTS if model_config.get("memory_length") else 1)
        self.labels = list(task.get("labels") or [])
        self.generator = generator  # a decoder-only LM's `Generator` over the same graphs

    # ------------------------------------------------------------------ generation

    def as_generator(self):
        """The `Generator` that generates with this bundle's graphs (decoder-only LMs)."""
        if self.generator is None:
            raise FerryError("this bundle cannot generate: only decoder-only language models "
                             "(and encoder-decoders) have the decoder_init/decoder_step graphs")
        return self.generator

    def generate(self, prompts: str | list[str], **kwargs) -> list[str] | list[list[str]]:
        """Continue each prompt (a decoder-only LM); arguments as `Generator.generate`."""
        return self.as_generator().generate(prompts, **kwargs)

    def generate_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                     **kwargs) -> np.ndarray:
        """(B, S) right-padded prompt ids → (B·R, N) continuation ids."""
        return self.as_generator().generate_ids(input_ids, attention_mask, **kwargs)

    def chat(self, messages: list[dict[str, str]], **kwargs) -> str | list[str]:
        """The assistant's answer to a conversation, by the bundle's chat template (a
        decoder-only LM imported from Hugging Face); arguments as `Generator.chat`."""
        return self.as_generator().chat(messages, **kwargs)

    def stream(self, prompt: str, **kwargs):
        """Yield the continuation of one prompt piece by piece."""
        return self.as_generator().stream(prompt, **kwargs)

    # ------------------------------------------------------------------ running graphs

    def _graph(self, name: str, purpose: str) -> GraphBackend:
        if name not in self.graphs:
            raise FerryError(f"this bundle cannot {purpose}: it has no {name!r} graph (graphs: "
                             f"{sorted(self.graphs)}); export a model trained for it")
        return self.graphs[name]

    def _infer(self, graph: GraphBackend, feed: Feed) -> Feed:
        """Run `feed` in chunks of the graph's batch range (and, through a recurrent graph, in
        segments) and join the outputs."""
        run = (lambda part: infer_segments(graph, part)) if has_memory(graph.spec) else graph.infer
        pieces = [run({k: v[rows] for k, v in feed.items()})
                  for rows in row_chunks(len(feed["input_ids"]), graph.spec.dims["batch"].max)]
        return {name: joined_rows([p[name] for p in pieces]) for name in pieces[0]}

    def _encode(self, texts: list[str], pairs: list[str] | None = None,
                truncation: bool | int = False) -> EncodedBatch:
        return encode_texts(self.tokenizer, texts, pairs, pad=self.special.pad,
                            max_length=self.max_length, truncation=truncation)

    def _head(self, kind: str, batch: EncodedBatch, purpose: str) -> Feed:
        graph = self._graph("head", purpose)
        if self.model_config["task_head"] != kind:
            raise FerryError(f"this bundle's head is {self.model_config['task_head']}, not "
                             f"{kind}; it cannot {purpose}")
        return self._infer(graph, batch.feed(graph.spec.input_names))

    # ------------------------------------------------------------------ tasks

    def classify(self, texts: str | list[str], pairs: str | list[str] | None = None, *,
                 prompt: str | None = None, labels: str | list[str] | None = None,
                 examples: list[tuple[str, str | None, str]] = (),
                 truncation: bool | int = False) -> list[dict]:
        """Classify each text (or text pair): `[{"label", "score", "scores"}]`, scores being
        probabilities per label.

        With a classification head the head decides. With `prompt` and `labels` (or a model
        trained with a prompt), the language model scores each label's word in the template;
        `examples` are few-shot demonstrations (text, pair, label) put before each input.
        `truncation` (head only) cuts over-long inputs (True: to the model's positions; an
        int: to that many tokens) instead of refusing them.
        """
        texts = text_list(texts)
        pairs = None if pairs is None else text_list(pairs, "pairs")
        use_prompt = (prompt is not None or labels is not None or bool(examples)
                      or "head" not in self.graphs)
        if use_prompt:
            chosen = self.prompt(prompt, labels)
            probabilities = np.exp(log_softmax(
                self.score_labels(texts, chosen, pairs, examples=examples)))
            names = chosen.labels
        else:
            if self.task.get("pairs") and pairs is None:
                raise FerryError("this model classifies sentence pairs; give a pair per text")
            logits = self._head("sequence_classification",
                                self._encode(texts, pairs, truncation), "classify")["logits"]
            probabilities, names = np.exp(log_softmax(logits)), self.labels
        return [{"label": names[int(p.argmax())], "score": float(p.max()),
                 "scores": {name: float(v) for name, v in zip(names, p)}}
                for p in probabilities]

    def prompt(self, template: str | None = None, labels: str | list[str] | None = None
               ) -> Prompt:
        """The given template/labels, falling back to the prompt the model was trained with."""
        stored = Prompt.from_dict(self.task["prompt"]) if self.task.get("prompt") else None
        if stored is not None:
            if template is None and labels is None:
                return stored
            template = stored.template if template is None else template
            labels = ([f"{n}={w}" for n, w in zip(stored.labels, stored.words)]
                      if labels is None else labels)
        if template is None or labels is None:
            raise FerryError("prompt-based classification needs a template and labels, e.g. "
                             "--prompt \"{text} It was {label}.\" --labels good,bad")
        return Prompt.parse(template, labels)

    def score_labels(self, texts: list[str], prompt: Prompt, pairs: list[str] | None = None, *,
                     examples: list[tuple[str, str | None, str]] = ()) -> np.ndarray:
        """(B, L) mean log-probability of each label word filled into the prompt."""
        # a decoder-only LM scores with its prompt graph: the same logits, one weights copy
        graph = self._graph("decoder_init" if "decoder_init" in self.graphs else "lm",
                            "score prompts")
        masked = self.model_config["architecture"] == "encoder-only"
        rows = prompt_rows(self.tokenizer, prompt, texts, pairs, masked=masked,
                           mask_id=self.special.mask, max_length=self.max_length,
                           examples=examples)
        ids, mask = right_padded(rows.ids, self.special.pad), padding_mask(rows.ids)  # (B, S)
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        logits = self._infer(graph, {k: arrays[k] for k in graph.spec.input_names
                                     if k not in MEMORY_INPUTS})["logits"]
        picked = [logits[r, pos].astype(np.float64) for r, pos in enumerate(rows.positions)]
        return label_scores([log_softmax(x) for x in picked], rows)

    def tag(self, texts: str | list[str], *, truncation: bool | int = False) -> list[dict]:
        """Label each whitespace-separated word: `[{"words", "tags", "entities"}]`, entities
        as {"type", "text", "start", "end"} with word indices [start, end). With `truncation`,
        words cut off an over-long text get the tag None."""
        words = [t.split() for t in text_list(texts)]
        if any(not w for w in words):
            raise FerryError("tag needs non-empty texts")
        joined = [word_spans(w) for w in words]
        batch = self._encode([text for text, _ in joined], truncation=truncation)
        logits = self._head("token_classification", batch, "tag words")["logits"]  # (B, S, L)
        results = []
        for i, (ws, (_, spans)) in enumerate(zip(words, joined)):
            firsts = first_tokens(batch.encodings[i], spans)
            tags = [self.labels[int(logits[i, t].argmax())] if t >= 0 else None for t in firsts]
            entities = [{"type": kind, "text": " ".join(ws[a:b]), "start": a, "end": b}
                        for kind, a, b in bio_entities([t or "O" for t in tags])]
            results.append({"words": ws, "tags": tags, "entities": entities})
        return results

    def answer(self, questions: str | list[str], contexts: str | list[str], *,
               max_answer_tokens: int = MAX_ANSWER_TOKENS, stride: int = STRIDE) -> list[dict]:
        """The answer span of each question in its context: `[{"answer", "score", "start",
        "end"}]` with character offsets into the context.

        A question + context longer than the model's positions is read as overlapping windows
        of the context (`stride` tokens shared by neighbours, as Hugging Face's QA pipeline
        does); the best span of any window wins."""
        questions, contexts = text_list(questions, "questions"), text_list(contexts, "contexts")
        if len(questions) != len(contexts):
            raise FerryError(f"{len(questions)} questions but {len(contexts)} contexts; give "
                             "one context per question")
        if not isinstance(stride, int) or not 0 <= stride < self.max_length // 2:
            raise FerryError(f"stride must be an integer in [0, {self.max_length // 2}), got "
                             f"{stride!r}")
        windowed = truncating(self.tokenizer, self.max_length, stride=stride,
                              strategy="only_second")
        try:
            encodings = encode_each(windowed, list(zip(questions, contexts)))
        except Exception as exc:  # tokenizers: the question alone leaves no room
            raise FerryError(f"a question leaves no room for its context in the model's "
                             f"{self.max_length} positions; shorten it ({exc})") from exc
        windows = [(i, w) for i, e in enumerate(encodings) for w in (e, *e.overflowing)]
        batch = pad_encodings([w for _, w in windows], pad=self.special.pad)
        out = self._head("question_answering", batch, "answer questions")
        best: dict[int, tuple[float, int, int]] = {}
        for row, (i, window) in enumerate(windows):
            allowed = np.zeros(out["start_logits"].shape[1], dtype=bool)
            allowed[: len(window.ids)] = context_tokens(window)
            if not allowed.any():
                continue
            first, last, score = best_span(out["start_logits"][row], out["end_logits"][row],
                                           allowed, max_answer_tokens)
            if i not in best or score > best[i][0]:
                best[i] = (score, window.offsets[first][0], window.offsets[last][1])
        results = []
        for i, context in enumerate(contexts):
            if i not in best:
                raise FerryError(f"context {i} has no tokens to answer from; give a non-empty "
                                 "context")
            score, start, end = best[i]
            text = context[start:end]
            stripped = len(text) - len(text.lstrip())
            results.append({"answer": text.strip(), "score": score, "start": start + stripped,
                            "end": start + stripped + len(text.strip())})
        return results
