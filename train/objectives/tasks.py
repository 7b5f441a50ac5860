"""Fine-tuning tasks on an encoder-only or decoder-only model with a task head, and prompt-based
fine-tuning (PET) through the language-model head.

- `classification`: single texts or sentence pairs (`data.pair_field`) → one of the labels.
  Encoders pool the first token; decoder-only models read the last one. Metrics: accuracy
  (picks the best checkpoint) and macro-F1.
- `token_classification`: BIO tags per word, aligned to each word's first sub-word token.
  Metric: entity-level F1.
- `question_answering`: the answer's start and end token in a question/context pair (SQuAD-style
  `answer` + `answer_start`). Metrics: exact match and token F1.
- `prompt_classification`: the labels' words scored in a template by the masked / causal LM,
  trained with cross-entropy over the labels; no new parameters.

Task files are JSON Lines or CSV/TSV (see `ferry.records.read_records`); a label missing from
the training split, or any malformed line, is an error naming the file and line.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import Counter
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ferry.errors import FerryError
from ferry.model import Transformer, TransformerConfig
from ferry.records import read_records
from ferry.runtime.prompts import FilledPrompt, Prompt, filled_prompts, model_rows
from ferry.runtime.text_tasks import (
    answer_token_span,
    best_span,
    context_tokens,
    first_tokens,
    word_spans,
)
from ferry.train.data import pad_tensor
from ferry.train.objectives.base import (
    IGNORE_INDEX,
    Batch,
    Objective,
    on_model_device,
    register_objective,
)
from ferry.train.task_metrics import accuracy, answer_scores, entity_f1, macro_f1


def _cut(ids: list[int], length: int) -> list[int]:
    """At most `length` ids, keeping the final `</s>`."""
    return ids if len(ids) <= length else ids[: length - 1] + ids[-1:]


class _TaskObjective(Objective):
    """Shared by the fine-tuning tasks: task files, labels, the model's head, device moves."""

    stage = "finetune"
    kind: ClassVar[str]  # what the runtime offers for it: classification | tagging | qa
    task_head: ClassVar[str] = "none"

    def __init__(self, config, tokenizer, special, log=print):
        super().__init__(config, tokenizer, special, log)
        self.labels: list[str] = list(config.data.labels)
        self.architecture = "encoder-only"  # set from the model by `model_overrides`

    @abstractmethod
    def _fields(self) -> dict[str, type]:
        """The fields a row of the task file must hold, with their types."""

    def _records(self, path: str) -> list[tuple[int, dict]]:
        return read_records(path, self._fields())

    def _label_ids(self, path: str, records: list[tuple[int, dict]], names: list[list[str]]
                   ) -> list[list[int]]:
        """Class names → indices; the training split (loaded first) fixes the label set when
        `data.labels` is empty, and any other unknown name is an error at its line."""
        if not self.labels:
            self.labels = sorted({n for row in names for n in row})
            if len(self.labels) < 2:
                raise FerryError(f"{path}: every row has the label {self.labels}; a classifier "
                                 "needs at least two")
        index = {name: i for i, name in enumerate(self.labels)}
        for (line, _), row in zip(records, names):
            unknown = [n for n in row if n not in index]
            if unknown:
                raise FerryError(f"{path}:{line}: unknown label {unknown[0]!r}; expected one of "
                                 f"{self.labels} (set data.labels to add one)")
        return [[index[n] for n in row] for row in names]

    def model_overrides(self, model: TransformerConfig) -> dict:
        self.architecture = model.architecture
        overrides = {"task_head": self.task_head,
                     "num_labels": 0 if self.task_head == "question_answering"
                     else len(self.labels)}
        # segment embeddings, unless the model reads segment ids already (relative_xl: no table)
        if self._pairs and model.architecture == "encoder-only" and not model.segment_inputs:
            overrides["type_vocab_size"] = 2
        return overrides

    @property
    def _pairs(self) -> bool:
        return False

    def task_metadata(self) -> dict:
        return {"kind": self.kind, "labels": self.labels, "pairs": self._pairs, "lm": False}

    def _head(self, model: Transformer, batch: Batch) -> torch.Tensor:
        batch = on_model_device(model, batch)
        return model(batch["input_ids"], batch["attention_mask"],
                     token_type_ids=batch.get("token_type_ids"), outputs="head")

    def _inputs(self, rows: list[list[int]], types: list[list[int]] | None = None) -> Batch:
        input_ids = pad_tensor(rows, self.special["pad"])  # (B, S)
        batch = {"input_ids": input_ids,
                 "attention_mask": (input_ids != self.special["pad"]).long()}
        if types is not None:
            batch["token_type_ids"] = pad_tensor(types, 0)
        return batch

    def shape(self, batch: Batch) -> tuple[int, int, int, int]:
        tokens = batch["input_ids"]
        if self.architecture == "decoder-only":
            return 0, tokens.numel(), 0, tokens.shape[1]
        return tokens.numel(), 0, tokens.shape[1], 0


@register_objective
class ClassificationObjective(_TaskObjective):
    """Sequence classification of single texts or pairs."""

    name = "classification"
    kind = "classification"
    architectures = ("encoder-only", "decoder-only")
    metric = "accuracy"
    higher_is_better = True
    task_head = "sequence_classification"

    @property
    def _pairs(self) -> bool:
        return bool(self.config.data.pair_field)

    def _fields(self) -> dict[str, type]:
        data = self.config.data
        fields = {data.text_field: str, data.label_field: str}
        if data.pair_field:
            fields[data.pair_field] = str
        return fields

    def tokenizer_texts(self, path: str) -> Iterator[str]:
        data = self.config.data
        for _, row in self._records(path):
            yield row[data.text_field]
            if data.pair_field:
                yield row[data.pair_field]

    def _texts(self, records: list[tuple[int, dict]]) -> tuple[list[str], list[str] | None]:
        data = self.config.data
        texts = [row[data.text_field] for _, row in records]
        pairs = [row[data.pair_field] for _, row in records] if data.pair_field else None
        return texts, pairs

    def load(self, path: str) -> list[tuple[list[int], list[int], int]]:
        records = self._records(path)
        labels = self._label_ids(path, records,
                                 [[row[self.config.data.label_field]] for _, row in records])
        texts, pairs = self._texts(records)
        encodings = self.tokenizer.encode_batch(list(zip(texts, pairs)) if pairs else texts)
        length = self.config.data.max_source_len
        return [(_cut(e.ids, length), _cut(e.type_ids, length), label[0])
                for e, label in zip(encodings, labels)]

    def collate(self, examples: list, rng: np.random.Generator | None = None) -> Batch:
        batch = self._inputs([ids for ids, _, _ in examples],
                             [types for _, types, _ in examples] if self._pairs else None)
        batch["labels"] = torch.tensor([label for _, _, label in examples])  # (B,)
        return batch

    def loss_sum(self, model: Transformer, batch: Batch) -> torch.Tensor:
        logits = self._head(model, batch)  # (B, L)
        return F.cross_entropy(logits.float(), batch["labels"].to(logits.device),
                               label_smoothing=self.config.optim.label_smoothing,
                               reduction="sum")

    def _scores(self, model: Transformer, batch: Batch) -> torch.Tensor:
        """(B, L) class scores (logits)."""
        return self._head(model, batch)

    @torch.no_grad()
    def evaluate(self, model: Transformer, examples: list) -> dict[str, float]:
        total_loss, expected, predicted = 0.0, [], []
        for _, batch in self.eval_batches(examples):
            scores = self._scores(model, batch).float().cpu()
            total_loss += float(F.cross_entropy(scores, batch["labels"], reduction="sum"))
            expected += batch["labels"].tolist()
            predicted += scores.argmax(-1).tolist()
        return {"loss": total_loss / len(expected), "accuracy": accuracy(expected, predicted),
                "macro_f1": macro_f1(expected, predicted, len(self.labels))}

    def baseline(self, train_examples: list, eval_examples: list) -> tuple[str, float]:
        """Always the commonest training class."""
        common = Counter(label for *_, label in train_examples).most_common(1)[0][0]
        return (f"always the commonest class ({self.labels[common]})",
                accuracy([label for *_, label in eval_examples], [common] * len(eval_examples)))


@register_objective
class PromptClassificationObjective(ClassificationObjective):
    """PET-style prompt-based fine-tuning: each label's word is scored in the template by the
    language model (masked LM: at `<mask>` tokens; causal LM: as a continuation), and the
    scores are trained with cross-entropy over the labels. No head is added, so the model stays
    a language model and the same prompt classifies zero-shot before training."""

    name = "prompt_classification"
    metric = "accuracy"
    task_head = "none"

    def __init__(self, config, tokenizer, special, log=print):
        super().__init__(config, tokenizer, special, log)
        section = config.prompt
        if not section.template or not section.labels:
            raise FerryError("objective prompt_classification needs prompt.template and "
                             "prompt.labels in the config")
        self.prompt = Prompt.parse(section.template, section.labels)
        self.labels = list(self.prompt.labels)

    def model_overrides(self, model: TransformerConfig) -> dict:
        self.architecture = model.architecture
        return {}

    def task_metadata(self) -> dict:
        return {**super().task_metadata(), "prompt": self.prompt.to_dict(), "lm": True}

    def load(self, path: str) -> list[tuple[list[FilledPrompt], int]]:
        """Per example: its L filled-in, tokenized prompts (one per label), and its label."""
        records = self._records(path)
        labels = self._label_ids(path, records,
                                 [[row[self.config.data.label_field]] for _, row in records])
        texts, pairs = self._texts(records)
        filled = filled_prompts(self.tokenizer, self.prompt, texts, pairs,
                                max_length=self.config.data.max_source_len)
        per_example = len(self.labels)
        return [(filled[i * per_example : (i + 1) * per_example], label[0])
                for i, label in enumerate(labels)]

    def collate(self, examples: list, rng: np.random.Generator | None = None) -> Batch:
        rows = model_rows([row for filled, _ in examples for row in filled],
                          num_labels=len(self.labels), masked=self.architecture == "encoder-only",
                          mask_id=self.special_id("mask"))
        batch = self._inputs(rows.ids)  # (B·L, S)
        # Flat (row, position, target) triples of every scored token.
        row_of = [r for r, pos in enumerate(rows.positions) for _ in pos]
        batch["score_rows"] = torch.tensor(row_of)
        batch["score_positions"] = torch.tensor([p for pos in rows.positions for p in pos])
        batch["score_targets"] = torch.tensor([t for ts in rows.targets for t in ts])
        batch["labels"] = torch.tensor([label for _, label in examples])  # (B,)
        return batch

    def _scores(self, model: Transformer, batch: Batch) -> torch.Tensor:
        """(B, L) mean log-probability of each label's word."""
        batch = on_model_device(model, batch)
        logits = model(batch["input_ids"], batch["attention_mask"])  # (B·L, S, V)
        log_probs = torch.log_softmax(
            logits[batch["score_rows"], batch["score_positions"]].float(), dim=-1)  # (N, V)
        token_scores = log_probs.gather(1, batch["score_targets"][:, None])[:, 0]  # (N,)
        rows = batch["input_ids"].shape[0]
        sums = torch.zeros(rows, device=logits.device).index_add(0, batch["score_rows"],
                                                                 token_scores)
        counts = torch.zeros(rows, device=logits.device).index_add(
            0, batch["score_rows"], torch.ones_like(token_scores))
        return (sums / counts).view(-1, len(self.labels))  # (B, L)

    def loss_sum(self, model: Transformer, batch: Batch) -> torch.Tensor:
        scores = self._scores(model, batch)
        return F.cross_entropy(scores, batch["labels"].to(scores.device),
                               label_smoothing=self.config.optim.label_smoothing,
                               reduction="sum")


@register_objective
class TokenClassificationObjective(_TaskObjective):
    """Sequence labelling: one BIO tag per word, learned on the word's first sub-word token."""

    name = "token_classification"
    kind = "tagging"
    architectures = ("encoder-only",)
    metric = "entity_f1"
    higher_is_better = True
    task_head = "token_classification"

    def _fields(self) -> dict[str, type]:
        return {self.config.data.tokens_field: list, self.config.data.tags_field: list}

    def tokenizer_texts(self, path: str) -> Iterator[str]:
        for _, row in self._records(path):
            yield " ".join(row[self.config.data.tokens_field])

    def load(self, path: str) -> list[tuple[list[int], list[int], list[str]]]:
        data = self.config.data
        records = self._records(path)
        for line, row in records:
            words, tags = row[data.tokens_field], row[data.tags_field]
            if len(words) != len(tags) or not words:
                raise FerryError(f"{path}:{line}: {len(words)} words but {len(tags)} tags; give "
                                 "one tag per word")
        tag_ids = self._label_ids(path, records, [row[data.tags_field] for _, row in records])
        if "O" not in self.labels:
            raise FerryError(f"{path}: no word is tagged O; token classification expects BIO "
                             "tags (B-X, I-X, O)")
        examples = []
        for (_, row), tags in zip(records, tag_ids):
            text, spans = word_spans(row[data.tokens_field])
            encoding = self.tokenizer.encode(text)
            labels = [IGNORE_INDEX] * len(encoding.ids)
            firsts = first_tokens(encoding, spans)
            for word, token in enumerate(firsts):
                if token >= 0:
                    labels[token] = tags[word]
            length = data.max_source_len  # labels[-1] is the `</s>`'s: IGNORE_INDEX
            examples.append((_cut(encoding.ids, length), _cut(labels, length),
                             row[data.tags_field]))
        return examples

    def collate(self, examples: list, rng: np.random.Generator | None = None) -> Batch:
        batch = self._inputs([ids for ids, _, _ in examples])
        batch["labels"] = pad_tensor([labels for _, labels, _ in examples], IGNORE_INDEX)
        return batch

    def loss_sum(self, model: Transformer, batch: Batch) -> torch.Tensor:
        logits = self._head(model, batch)  # (B, S, L)
        return F.cross_entropy(logits.flatten(0, 1).float(),
                               batch["labels"].flatten().to(logits.device),
                               ignore_index=IGNORE_INDEX,
                               label_smoothing=self.config.optim.label_smoothing,
                               reduction="sum")

    @torch.no_grad()
    def evaluate(self, model: Transformer, examples: list) -> dict[str, float]:
        total_loss, count, expected, predicted = 0.0, 0, [], []
        for chunk, batch in self.eval_batches(examples):
            logits = self._head(model, batch).float().cpu()  # (B, S, L)
            labels = batch["labels"]
            total_loss += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
            best = logits.argmax(-1)
            for row, (_, _, gold) in enumerate(chunk):
                tagged = (labels[row] != IGNORE_INDEX).nonzero()[:, 0].tolist()
                tags = [self.labels[int(best[row, t])] for t in tagged]
                predicted.append(tags + ["O"] * (len(gold) - len(tags)))  # cut-off words: O
                expected.append(gold)
        words = [t for tags in expected for t in tags]
        hits = sum(e == p for es, ps in zip(expected, predicted) for e, p in zip(es, ps))
        return {"loss": total_loss / max(count, 1), "entity_f1": entity_f1(expected, predicted),
                "tag_accuracy": hits / max(len(words), 1)}

    def baseline(self, train_examples: list, eval_examples: list) -> tuple[str, float]:
        """Every word tagged with the commonest training tag."""
        common = Counter(t for *_, tags in train_examples for t in tags).most_common(1)[0][0]
        gold = [tags for *_, tags in eval_examples]
        return f"always {common}", entity_f1(gold, [[common] * len(t) for t in gold])


@register_objective
class QuestionAnsweringObjective(_TaskObjective):
    """Extractive QA: predict the first and last token of the answer in the context."""

    name = "question_answering"
    kind = "qa"
    architectures = ("encoder-only",)
    metric = "exact_match"
    higher_is_better = True
    task_head = "question_answering"

    @property
    def _pairs(self) -> bool:
        return True

    def _fields(self) -> dict[str, type]:
        data = self.config.data
        return {data.question_field: str, data.context_field: str, data.answer_field: str,
                data.answer_start_field: int}

    def tokenizer_texts(self, path: str) -> Iterator[str]:
        for _, row in self._records(path):
            yield row[self.config.data.question_field]
            yield row[self.config.data.context_field]

    def load(self, path: str) -> list[tuple]:
        data = self.config.data
        records = self._records(path)
        encodings = self.tokenizer.encode_batch(
            [(row[data.question_field], row[data.context_field]) for _, row in records])
        examples = []
        for (line, row), encoding in zip(records, encodings):
            context, answer = row[data.context_field], row[data.answer_field]
            start = row[data.answer_start_field]
            if context[start : start + len(answer)] != answer or not answer:
                raise FerryError(f"{path}:{line}: the answer {answer!r} is not in the context at "
                                 f"answer_start {start}; give its character offset")
            if len(encoding.ids) > data.max_source_len:
                raise FerryError(f"{path}:{line}: question and context are "
                                 f"{len(encoding.ids)} tokens, more than data.max_source_len "
                                 f"{data.max_source_len}; raise it or shorten the context")
            span = answer_token_span(encoding, start, start + len(answer))
            if span is None:
                raise FerryError(f"{path}:{line}: the answer {answer!r} covers no token of the "
                                 "context")
            examples.append((encoding.ids, encoding.type_ids, span, context,
                             list(encoding.offsets), context_tokens(encoding), answer))
        return examples

    def collate(self, examples: list, rng: np.random.Generator | None = None) -> Batch:
        batch = self._inputs([e[0] for e in examples], [e[1] for e in examples])
        batch["labels"] = torch.tensor([list(e[2]) for e in examples])  # (B, 2) first, last
        return batch

    def loss_sum(self, model: Transformer, batch: Batch) -> torch.Tensor:
        logits = self._head(model, batch).float()  # (B, S, 2)
        labels = batch["labels"].to(logits.device)  # (B, 2)
        smoothing = self.config.optim.label_smoothing
        return sum(F.cross_entropy(logits[..., i], labels[:, i], label_smoothing=smoothing,
                                   reduction="sum") for i in range(2))

    @torch.no_grad()
    def evaluate(self, model: Transformer, examples: list) -> dict[str, float]:
        total_loss, count, expected, predicted = 0.0, 0, [], []
        for chunk, batch in self.eval_batches(examples):
            logits = self._head(model, batch).float().cpu()  # (B, S, 2)
            labels = batch["labels"]
            total_loss += sum(float(F.cross_entropy(logits[..., i], labels[:, i],
                                                    reduction="sum")) for i in range(2))
            count += 2 * len(chunk)
            for row, (ids, _, _, context, offsets, allowed, answer) in enumerate(chunk):
                first, last, _ = best_span(logits[row, : len(ids), 0].numpy(),
                                           logits[row, : len(ids), 1].numpy(), allowed, 30)
                predicted.append(context[offsets[first][0] : offsets[last][1]].strip())
                expected.append(answer)
        return {"loss": total_loss / max(count, 1), **answer_scores(expected, predicted)}

    def baseline(self, train_examples: list, eval_examples: list) -> tuple[str, float]:
        """Always the commonest training answer."""
        common = Counter(e[-1] for e in train_examples).most_common(1)[0][0]
        gold = [e[-1] for e in eval_examples]
        return (f"always {common!r}",
                answer_scores(gold, [common] * len(gold))["exact_match"])
