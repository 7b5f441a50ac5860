"""Text-to-text fine-tuning of an encoder-decoder model (`seq2seq`): source and target fields of
a task file, teacher forcing, and eval by greedy generation (exact match, BLEU, chrF)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch

from ferry.model import Transformer
from ferry.runtime.special_ids import SpecialIds
from ferry.train.data import encode_all, read_jsonl
from ferry.train.objectives.base import (
    Batch,
    Objective,
    decoder_start,
    mean_eval_loss,
    on_model_device,
    register_objective,
    seq2seq_batch,
    token_cross_entropy,
)
from ferry.train.task_metrics import translation_scores


@register_objective
class Seq2SeqObjective(Objective):
    """Text-to-text with teacher forcing: the decoder reads `<s> target` and predicts `target </s>`.

    Data: JSONL/CSV with `data.source_field` / `data.target_field`. Eval: loss, and exact match,
    BLEU and chrF of greedy generations (through the runtime's generation loop on the torch
    model).
    """

    name = "seq2seq"
    stage = "finetune"
    architectures = ("encoder-decoder",)
    metric = "exact_match"
    higher_is_better = True

    def _rows(self, path: str) -> list[dict[str, str]]:
        data = self.config.data
        return read_jsonl(path, [data.source_field, data.target_field])

    def tokenizer_texts(self, path: str) -> Iterator[str]:
        data = self.config.data
        for row in self._rows(path):
            yield row[data.source_field]
            yield row[data.target_field]

    def load(self, path: str) -> list[tuple[list[int], list[int], str]]:
        data = self.config.data
        rows = self._rows(path)
        sources = encode_all(self.tokenizer, [r[data.source_field] for r in rows])
        targets = encode_all(self.tokenizer, [r[data.target_field] for r in rows])
        eos = self.special["eos"]
        return [
            (src[: data.max_source_len - 1] + [eos] if len(src) > data.max_source_len else src,
             tgt[: data.max_target_len - 1] + [eos] if len(tgt) > data.max_target_len else tgt,
             row[data.target_field])
            for src, tgt, row in zip(sources, targets, rows)
        ]

    def collate(self, examples: list, rng: np.random.Generator | None = None) -> Batch:
        return seq2seq_batch([src for src, _, _ in examples], [tgt for _, tgt, _ in examples],
                             pad=self.special["pad"], start=decoder_start(self.special))

    def _forward(self, model: Transformer, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        batch = on_model_device(model, batch)
        logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
        return logits, batch["labels"]

    def loss_sum(self, model: Transformer, batch: Batch) -> torch.Tensor:
        logits, labels = self._forward(model, batch)
        return token_cross_entropy(logits, labels, self.config.optim.label_smoothing, "sum")

    def shape(self, batch: Batch) -> tuple[int, int, int, int]:
        source, target = batch["input_ids"], batch["decoder_input_ids"]
        return source.numel(), target.numel(), source.shape[1], target.shape[1]

    def predict(self, model: Transformer, examples: list) -> list[str]:
        """Greedy generations for `examples`, decoded to text."""
        from ferry.model.graphs import graph_specs
        from ferry.runtime.backends.torch import torch_graphs
        from ferry.runtime.generation import greedy_generate

        graphs = torch_graphs(model, graph_specs(model.config))
        special = SpecialIds.from_ids(self.special)
        predictions = []
        for _, batch in self.eval_batches(examples):
            ids = greedy_generate(
                graphs, batch["input_ids"].numpy(), batch["attention_mask"].numpy(),
                special=special, max_new_tokens=self.config.eval.max_new_tokens,
            )
            predictions += self.tokenizer.decode_batch(ids.tolist(), skip_special_tokens=True)
        return predictions

    def baseline(self, train_examples: list, eval_examples: list) -> tuple[str, float]:
        """The better of copying the input and always answering the commonest training target."""
        sources = self.tokenizer.decode_batch([src for src, _, _ in eval_examples],
                                              skip_special_tokens=True)
        copy = sum(s.strip() == ref.strip() for s, (_, _, ref) in zip(sources, eval_examples))
        common = Counter(ref for _, _, ref in train_examples).most_common(1)[0][0]
        majority = sum(ref == common for _, _, ref in eval_examples)
        if copy >= majority:
            return "copy the input", copy / len(eval_examples)
        return "always the commonest target", majority / len(eval_examples)

    @torch.no_grad()
    def evaluate(self, model: Transformer, examples: list) -> dict[str, float]:
        loss = mean_eval_loss(self, model, examples, lambda b: self._forward(model, b))
        predictions = self.predict(model, examples)
        references = [ref for _, _, ref in examples]
        correct = sum(p.strip() == ref.strip() for p, ref in zip(predictions, references))
        return {"loss": loss, "exact_match": correct / len(examples),
                **translation_scores(references, predictions)}
