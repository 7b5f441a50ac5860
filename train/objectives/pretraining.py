"""Self-supervised objectives on plain text: causal LM (decoder-only), masked LM (single tokens,
whole words or n-grams), next-sentence and sentence-order prediction, permutation LM (XLNet)
(encoder-only), span corruption and text-infilling denoising (encoder-decoder).

Data: a .jsonl file (`data.text_field`) or a plain-text file, one document a line; documents are
tokenized, joined with `</s>` and cut into `data.block_size`-token blocks. Corruption is drawn
afresh for every batch (dynamic masking); eval batches are corrupted the same way every time.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ferry.errors import FerryError
from ferry.model import Transformer, TransformerConfig
from ferry.train.corruption import (
    factorisation_order,
    mask_tokens,
    span_corruption,
    text_infilling,
)
from ferry.train.data import encode_all, pad_tensor
from ferry.train.datasets.corpus import iter_documents, packed_blocks
from ferry.train.objectives.base import (
    IGNORE_INDEX,
    Batch,
    Objective,
    corruption_rng,
    decoder_start,
    mean_eval_loss,
    on_model_device,
    register_objective,
    seq2seq_batch,
    token_cross_entropy,
)
from ferry.train.tokenizer import sentinel


@register_objective
class CausalLMObjective(Objective):
    """Next-token prediction on documents packed into fixed-length blocks, `</s>` between them.

    Data: a .jsonl file (`data.text_field`) or a plain-text file, one document a line.
    Eval: loss and perplexity.
    """

    name = "causal_lm"
    stage = "pretrain"
    architectures = ("decoder-only",)
    metric = "perplexity"
    higher_is_better = False

    def tokenizer_texts(self, path: str) -> Iterator[str]:
        yield from iter_documents(path, self.config.data.text_field)

    def load(self, path: str) -> Sequence[np.ndarray]:
        # block_size inputs plus their shifted labels; consecutive blocks share one token
        return packed_blocks(path, self.tokenizer, text_field=self.config.data.text_field,
                             length=self.config.data.block_size + 1, overlap=1,
                             cache_dir=self.cache_dir, separator=self.special["eos"],
                             log=self.log)

    def collate(self, examples: list, rng: np.random.Generator | None = None) -> Batch:
        ids = torch.from_numpy(np.stack(examples))  # (B, L+1) int64
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def _forward(self, model: Transformer, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        batch = on_model_device(model, batch)
        return model(batch["input_ids"]), batch["labels"]

    def loss_sum(self, model: Transformer, batch: Batch) -> torch.Tensor:
        logits, labels = self._forward(model, batch)
        return token_cross_entropy(logits, labels, self.config.optim.label_smoothing, "sum")

    def shape(self, batch: Batch) -> tuple[int, int, int, int]:
        tokens = batch["input_ids"]
        return 0, tokens.numel(), 0, tokens.shape[1]

    def baseline(self, train_examples: Sequence, eval_examples: Sequence) -> tuple[str, float]:
        """A unigram model: perplexity of the training token frequencies (add-one smoothed, from
        up to 5000 blocks) on the eval blocks."""
        vocab = self.tokenizer.get_vocab_size()
        sample = train_examples[: min(len(train_examples), 5000)]
        counts = np.bincount(np.concatenate([block[1:] for block in sample]), minlength=vocab)
        probabilities = (counts + 1) / (counts.sum() + vocab)
        targets = np.concatenate([block[1:] for block in eval_examples])
        return "unigram frequencies", math.exp(-float(np.log(probabilities[targets]).mean()))

    @torch.no_grad()
    def evaluate(self, model: Transformer, examples: list) -> dict[str, float]:
        loss = mean_eval_loss(self, model, examples, lambda b: self._forward(model, b))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class _TextObjective(Objective):
    """Shared by the objectives that read plain documents into packed blocks."""

    block_tokens_reserved = 0  # tokens of each block left for what the objective adds

    def tokenizer_texts(self, path: str) -> Iterator[str]:
        yield from iter_documents(path, self.config.data.text_field)

    def load(self, path: str) -> Sequence[np.ndarray]:
        return packed_blocks(path, self.tokenizer, text_field=self.config.data.text_field,
                             length=self.config.data.block_size - self.block_tokens_reserved,
                             cache_dir=self.cache_dir, separator=self.special["eos"],
                             log=self.log)

    def _forward(self, model: Transformer, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        batch = on_model_device(model, batch)
        logits = model(batch["input_ids"], batch["attention_mask"],
                       batch.get("decoder_input_ids"))
        return logits, batch["labels"]

    def loss_sum(self, model: Transformer, batch: Batch) -> torch.Tensor:
        logits, labels = self._forward(model, batch)
        return token_cross_entropy(logits, labels, self.config.optim.label_smoothing, "sum")

    def baseline(self, train_examples: list, eval_examples: list) -> tuple[str, float]:
        """Always predicting the commonest labelled token of the training data."""
        def labelled(examples: list) -> Iterator[int]:
            for index, (_, batch) in enumerate(self.eval_batches(examples)):
                labels = batch["labels"]
                yield from labels[labels != IGNORE_INDEX].tolist()
                if index >= 20:  # enough batches for a frequency estimate
                    return

        common = Counter(labelled(train_examples)).most_common(1)[0][0]
        targets = list(labelled(eval_examples))
        return "always the commonest token", targets.count(common) / max(len(targets), 1)

    @torch.no_grad()
    def evaluate(self, model: Transformer, examples: list) -> dict[str, float]:
        loss = mean_eval_loss(self, model, examples, lambda b: self._forward(model, b))
        correct = total = 0
        for _, batch in self.eval_batches(examples):
            logits, labels = self._forward(model, batch)
            scored = labels != IGNORE_INDEX
            correct += int((logits.argmax(-1)[scored] == labels[scored]).sum())
            total += int(scored.sum())
        return {"loss": loss, "accuracy": correct / max(total, 1)}


@register_objective
class MaskedLMObjective(_TextObjective):
    """BERT's masked LM on an encoder-only model: predict the 15% chosen tokens.

    Metric: accuracy on the chosen tokens.
    """

    name = "masked_lm"
    stage = "pretrain"
    architectures = ("encoder-only",)
    metric = "accuracy"
    higher_is_better = True
    whole_word_masking = False

    def collate(self, examples: list, rng: np.random.Generator | None = None) -> Batch:
        rng = corruption_rng(rng)
        rows = [np.asarray(block) for block in examples]
        masked = [mask_tokens(ids, rng, mask_id=self.special_id("mask"),
                              vocab_size=self.tokenizer.get_vocab_size(),
                              maskable=~np.isin(ids, self._special_ids),
                              word_starts=self._word_starts(ids) if self.whole_word_masking
                              else None, max_ngram=self.config.data.max_ngram)
                  for ids in rows]
        input_ids = pad_tensor([m[0].tolist() for m in masked], self.special["pad"])
        labels = pad_tensor([m[1].tolist() for m in masked], IGNORE_INDEX)
        return {"input_ids": input_ids,
                "attention_mask": (input_ids != self.special["pad"]).long(), "labels": labels}

    @functools.cached_property
    def _special_ids(self) -> np.ndarray:
        return np.array(sorted(set(self.special.values())))

    @functools.cached_property
    def _word_start_tokens(self) -> np.ndarray:
        """(V,) bool, computed once: byte-level BPE marks a leading space with 'Ġ', and
        punctuation starts a word of its own."""
        tokens = [self.tokenizer.id_to_token(i) or "" for i in
                  range(self.tokenizer.get_vocab_size())]
        return np.array([t.startswith("Ġ") or not t[:1].isalnum() for t in tokens])

    def _word_starts(self, ids: np.ndarray) -> np.ndarray:
        """Tokens of `ids` that begin a word (the first token always does)."""
        starts = self._word_start_tokens[ids]
        starts[0] = True
        return starts

    def shape(self, batch: Batch) -> tuple[int, int, int, int]:
        tokens = batch["input_ids"]
        return tokens.numel(), 0, tokens.shape[1], 0


@register_objective
class WholeWordMaskedLMObjective(MaskedLMObjective):
    """Masked LM choosing whole words: every token of a chosen word is masked."""

    name = "masked_lm_whole_word"
    whole_word_masking = True


@register_objective
class PermutationLMObjective(_TextObjective):
    """XLNet's permutation language modelling (Yang et al., 2019) on a relative_xl encoder: each
    block gets a random factorisation order, and the query stream predicts the last 1/K of it
    (`data.partial_prediction`) from the context and the targets before it; nothing in the
    input is replaced by a mask token.

    With `memory_length` on the model, the first part of each block (up to half of it, at most
    `memory_length` tokens) is read first as the memory of the rest, without gradient, and the
    rest is permuted and predicted: Transformer-XL's segment recurrence as XLNet pretrains.

    Metric: accuracy on the predicted tokens.
    """

    name = "permutation_lm"
    stage = "pretrain"
    architectures = ("encoder-only",)
    metric = "accuracy"
    higher_is_better = True
    memory_tokens = 0  # tokens of each block read as memory (set from the model)

    def model_overrides(self, model: TransformerConfig) -> dict:
        if model.positional != "relative_xl":
            raise FerryError("objective permutation_lm needs XLNet's two-stream attention: set "
                             "the model's positional: relative_xl (see examples/"
                             "permutation_lm.yaml)")
        self.memory_tokens = min(model.memory_length, self.config.data.block_size // 2)
        return {}

    def collate(self, examples: list, rng: np.random.Generator | None = None) -> Batch:
        rng = corruption_rng(rng)
        rows = [np.asarray(block) for block in examples]
        memory = [r[: self.memory_tokens] for r in rows]  # read first, as the rest's memory
        rows = [r[self.memory_tokens:] for r in rows]
        input_ids = pad_tensor([r.tolist() for r in rows], self.special["pad"])  # (B, T)
        B, T = input_ids.shape
        order = torch.zeros(B, T, T, dtype=torch.bool)  # [b, i, j]: i's query stream sees j
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, row in enumerate(rows):
            visible, targets = factorisation_order(
                len(row), rng, partial_prediction=self.config.data.partial_prediction)
            order[b, : len(row), : len(row)] = torch.from_numpy(visible)
            labels[b, : len(row)][torch.from_numpy(targets)] = torch.from_numpy(row[targets])
        batch = {"input_ids": input_ids, "order": order, "labels": labels,
                 "attention_mask": (input_ids != self.special["pad"]).long()}
        if self.memory_tokens:
            memory_ids = pad_tensor([m.tolist() for m in memory], self.special["pad"])
            batch.update(memory_ids=memory_ids,
                         memory_mask=(memory_ids != self.special["pad"]).long())
        return batch

    def _forward(self, model: Transformer, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        batch = on_model_device(model, batch)
        memory = None
        if "memory_ids" in batch:
            with torch.no_grad():
                memory = model.encode_segment(batch["memory_ids"], batch["memory_mask"]).memory
        segments = torch.zeros_like(batch["input_ids"])  # one segment: a block of one stream
        logits = model.permutation_logits(batch["input_ids"], batch["attention_mask"],
                                          batch["order"], segments, memory=memory)
        return logits, batch["labels"]

    def shape(self, batch: Batch) -> tuple[int, int, int, int]:
        tokens = batch["input_ids"]  # two streams over every position
        return 2 * tokens.numel(), 0, tokens.shape[1], 0


class _Seq2SeqTextObjective(_TextObjective):
    architectures = ("encoder-decoder",)
    metric = "accuracy"
    higher_is_better = True
    stage = "pretrain"

    def shape(self, batch: Batch) -> tuple[int, int, int, int]:
        source, target = batch["input_ids"], batch["decoder_input_ids"]
        return source.numel(), target.numel(), source.shape[1], target.shape[1]


@register_objective
class SpanCorruptionObjective(_Seq2SeqTextObjective):
    """T5 span corruption: noise density 0.15, mean span 3, `<extra_id_i>` sentinels."""

    name = "span_corruption"
    block_tokens_reserved = 1  # the EOS appended to inputs and targets

    def collate(self, examples: list, rng: np.random.Generator | None = None) -> Batch:
        rng = corruption_rng(rng)
        pairs = [span_corruption(np.asarray(block), rng, sentinel_ids=self._sentinel_ids,
                                 eos_id=self.special["eos"]) for block in examples]
        return seq2seq_batch([p[0].tolist() for p in pairs], [p[1].tolist() for p in pairs],
                             pad=self.special["pad"], start=decoder_start(self.special))

    @functools.cached_property
    def _sentinel_ids(self) -> list[int]:
        """The tokenizer's `<extra_id_i>` ids in order, looked up once."""
        ids = []
        while (token := self.tokenizer.token_to_id(sentinel(len(ids)))) is not None:
            ids.append(token)
        return ids


@register_objective
class DenoisingObjective(_Seq2SeqTextObjective):
    """BART text infilling: Poisson(3) spans over ~30% of tokens → one `<mask>` each; the
    decoder reconstructs the original block."""

    name = "denoising"
    block_tokens_reserved = 1

    def collate(self, examples: list, rng: np.random.Generator | None = None) -> Batch:
        rng = corruption_rng(rng)
        eos = self.special["eos"]
        sources = [text_infilling(np.asarray(block), rng, mask_id=self.special_id("mask")).tolist()
                   + [eos] for block in examples]
        return seq2seq_batch(sources, [list(block) + [eos] for block in examples],
                             pad=self.special["pad"], start=decoder_start(self.special))


NSP_LABELS = ["is_next", "random"]
SOP_LABELS = ["in_order", "swapped"]  # sentence order: the segments as written, or B before A


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph: split after . ! ? followed by white space."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


@register_objective
class NextSentenceObjective(MaskedLMObjective):
    """BERT's next-sentence prediction: segment A is the start of a document, segment B its
    continuation (`is_next`) or, half the time, sentences of another document (`random`); the
    pooled first token classifies the pair. Pairs are drawn afresh for every batch.

    Data: documents (one a line, or a JSONL text field) of at least two sentences.
    Metric: next-sentence accuracy.
    """

    name = "next_sentence"
    metric = "nsp_accuracy"
    labels = NSP_LABELS  # the pair classes, label 0 first
    with_masked_lm = False

    def model_overrides(self, model: TransformerConfig) -> dict:
        # segment embeddings, unless the model reads segment ids already (relative_xl: no table)
        segments = {} if model.segment_inputs else {"type_vocab_size": 2}
        return {"task_head": "sequence_classification", "num_labels": len(self.labels),
                **segments}

    def task_metadata(self) -> dict:
        return {"kind": self.name, "labels": list(self.labels), "pairs": True, "lm": True}

    def load(self, path: str) -> list[tuple[int, int, list[list[list[int]]]]]:
        """(document index, sentence boundary, all documents as sentence-token lists): one
        example per boundary between two sentences of a document; `</s>` is stripped from each
        sentence (the pair gets its own)."""
        eos = self.special["eos"]
        documents = []
        for text in iter_documents(path, self.config.data.text_field):
            sentences = split_sentences(text)
            if len(sentences) >= 2:  # a space before every sentence but the first, as in text
                spaced = sentences[:1] + [" " + s for s in sentences[1:]]
                documents.append([ids[:-1] if ids[-1:] == [eos] else ids
                                  for ids in encode_all(self.tokenizer, spaced)])
        if len(documents) < 2:
            raise FerryError(f"{path}: next-sentence prediction needs at least two documents of "
                             "two or more sentences")
        return [(i, cut, documents) for i, document in enumerate(documents)
                for cut in range(1, len(document))]

    def _segments(self, index: int, cut: int, documents: list, rng: np.random.Generator
                  ) -> tuple[list[int], list[int], int]:
        """(A, B, label): A ends at sentence `cut`; B continues it (`is_next`) or starts at a
        random sentence of another document (`random`)."""
        sentences = documents[index]
        first = [t for s in sentences[:cut] for t in s]
        label = int(rng.random() < 0.5)
        if label == 0:
            return first, [t for s in sentences[cut:] for t in s], label
        other = int(rng.integers(0, len(documents) - 1))
        other += other >= index  # any document but this one
        start = int(rng.integers(0, len(documents[other])))
        return first, [t for s in documents[other][start:] for t in s], label

    def _pair(self, index: int, cut: int, documents: list, rng: np.random.Generator
              ) -> tuple[list[int], list[int], int]:
        """(ids `A </s> B </s>`, segment ids, label) of `_segments`, cut to data.block_size
        around the boundary between them (the end of A, the start of B)."""
        first, second, label = self._segments(index, cut, documents, rng)
        room = self.config.data.block_size - 2
        keep_first = min(len(first), max(room // 2, room - len(second)))
        first, second = first[len(first) - keep_first :], second[: room - keep_first]
        if self.swapped(label):
            first, second = second, first
        eos = self.special["eos"]
        ids = first + [eos] + second + [eos]
        return ids, [0] * (len(first) + 1) + [1] * (len(second) + 1), label

    def swapped(self, label: int) -> bool:
        """Whether a pair of this label is written B, A (sentence order); NSP: never."""
        return False

    def collate(self, examples: list, rng: np.random.Generator | None = None) -> Batch:
        rng = corruption_rng(rng)
        pairs = [self._pair(index, cut, documents, rng) for index, cut, documents in examples]
        rows = [np.asarray(ids) for ids, _, _ in pairs]
        if self.with_masked_lm:
            masked = [mask_tokens(ids, rng, mask_id=self.special_id("mask"),
                                  vocab_size=self.tokenizer.get_vocab_size(),
                                  maskable=~np.isin(ids, self._special_ids),
                                  max_ngram=self.config.data.max_ngram) for ids in rows]
            inputs, labels = [m[0].tolist() for m in masked], [m[1].tolist() for m in masked]
        else:
            inputs, labels = [r.tolist() for r in rows], [[IGNORE_INDEX] * len(r) for r in rows]
        input_ids = pad_tensor(inputs, self.special["pad"])  # (B, S)
        return {"input_ids": input_ids,
                "attention_mask": (input_ids != self.special["pad"]).long(),
                "token_type_ids": pad_tensor([types for _, types, _ in pairs], 0),
                "labels": pad_tensor(labels, IGNORE_INDEX),
                "next_sentence_labels": torch.tensor([label for _, _, label in pairs])}

    def target_tokens(self, batch: Batch) -> int:
        """Masked tokens (with masked LM), else pairs: what `loss_sum` is a sum over."""
        if self.with_masked_lm:
            return int((batch["labels"] != IGNORE_INDEX).sum())
        return len(batch["next_sentence_labels"])

    def _both(self, model: Transformer, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        batch = on_model_device(model, batch)
        return model(batch["input_ids"], batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"], outputs="both")

    def loss_sum(self, model: Transformer, batch: Batch) -> torch.Tensor:
        token_logits, pair_logits = self._both(model, batch)  # (B, S, V), (B, 2)
        smoothing = self.config.optim.label_smoothing
        device = pair_logits.device
        labels = batch["next_sentence_labels"].to(device)
        nsp = F.cross_entropy(pair_logits.float(), labels, label_smoothing=smoothing,
                              reduction="sum")
        if not self.with_masked_lm:
            return nsp
        # BERT adds the mean NSP loss to the mean masked-LM loss: weigh each pair's loss as
        # much as all masked tokens together, since the loop divides by the masked count.
        masked = self.target_tokens(batch)
        return (token_cross_entropy(token_logits, batch["labels"].to(device), smoothing, "sum")
                + nsp * masked / len(labels))

    def baseline(self, train_examples: list, eval_examples: list) -> tuple[str, float]:
        """Always label 0 (`is_next`, `in_order`: pairs are drawn 50/50)."""
        labels = [int(label) for _, batch in self.eval_batches(eval_examples)
                  for label in batch["next_sentence_labels"]]
        return f"always {self.labels[0]}", labels.count(0) / len(labels)

    @torch.no_grad()
    def evaluate(self, model: Transformer, examples: list) -> dict[str, float]:
        losses, correct, pairs, token_hits, tokens = 0.0, 0, 0, 0, 0
        for _, batch in self.eval_batches(examples):
            token_logits, pair_logits = (t.float().cpu() for t in self._both(model, batch))
            nsp = batch["next_sentence_labels"]
            losses += float(F.cross_entropy(pair_logits, nsp, reduction="sum"))
            correct += int((pair_logits.argmax(-1) == nsp).sum())
            pairs += len(nsp)
            scored = batch["labels"] != IGNORE_INDEX
            if self.with_masked_lm:
                losses += float(token_cross_entropy(token_logits, batch["labels"],
                                                    reduction="sum"))
                token_hits += int((token_logits.argmax(-1)[scored] == batch["labels"][scored])
                                  .sum())
            tokens += int(scored.sum())
        metrics = {"loss": losses / (pairs + tokens), self.metric: correct / pairs}
        if self.with_masked_lm:
            metrics["accuracy"] = token_hits / max(tokens, 1)
        return metrics


@register_objective
class MaskedLMNextSentenceObjective(NextSentenceObjective):
    """BERT pretraining: masked LM and next-sentence prediction together, their losses summed
    over masked tokens and pairs."""

    name = "masked_lm_nsp"
    with_masked_lm = True


@register_objective
class SentenceOrderObjective(NextSentenceObjective):
    """ALBERT's sentence-order prediction (Lan et al., 2020): two consecutive segments of one
    document, A then B (`in_order`) or, half the time, B then A (`swapped`); unlike NSP's random
    second segment, topic gives nothing away, only coherence does.

    Data: documents of at least two sentences. Metric: sentence-order accuracy.
    """

    name = "sentence_order"
    metric = "sop_accuracy"
    labels = SOP_LABELS

    def _segments(self, index: int, cut: int, documents: list, rng: np.random.Generator
                  ) -> tuple[list[int], list[int], int]:
        """(A, B, label): consecutive runs of sentences meeting at sentence `cut`, each of a
        random length (so neither is told apart by starting the document or ending it)."""
        sentences = documents[index]
        start = int(rng.integers(0, cut))
        end = int(rng.integers(cut + 1, len(sentences) + 1))
        return ([t for s in sentences[start:cut] for t in s],
                [t for s in sentences[cut:end] for t in s], int(rng.random() < 0.5))

    def swapped(self, label: int) -> bool:
        return label == 1


@register_objective
class MaskedLMSentenceOrderObjective(SentenceOrderObjective):
    """ALBERT pretraining: masked LM (n-gram masking with `data.max_ngram` > 1) and sentence
    order together, their losses summed over masked tokens and pairs."""

    name = "masked_lm_sop"
    with_masked_lm = True
