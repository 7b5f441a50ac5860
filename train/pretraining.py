"""Self-supervised objectives on plain text, beyond causal LM: masked LM (encoder-only), span
corruption and text-infilling denoising (encoder-decoder).

Data: a .jsonl file (`data.text_field`) or a plain-text file, one document a line; documents are
tokenized, joined with `</s>` and cut into `data.block_size`-token blocks. Corruption is drawn
afresh for every batch (dynamic masking); eval batches are corrupted the same way every time.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch

from ferry.model import Transformer
from ferry.train.corruption import mask_tokens, span_corruption, text_infilling
from ferry.train.data import pad_tensor, read_texts
from ferry.train.objectives import (
    IGNORE_INDEX,
    Batch,
    Objective,
    corruption_rng,
    mean_eval_loss,
    packed_blocks,
    register_objective,
    seq2seq_batch,
    token_cross_entropy,
)
from ferry.train.tokenizer import sentinel


class _TextObjective(Objective):
    """Shared by the objectives that read plain documents into packed blocks."""

    block_tokens_reserved = 0  # tokens of each block left for what the objective adds

    def tokenizer_texts(self, path: str) -> Iterator[str]:
        yield from read_texts(path, self.config.data.text_field)

    def load(self, path: str) -> list[list[int]]:
        length = self.config.data.block_size - self.block_tokens_reserved
        return packed_blocks(self.tokenizer, list(self.tokenizer_texts(path)), length,
                             path=path)

    def _forward(self, model: Transformer, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
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
        masked = [mask_tokens(ids, rng, mask_id=self.special["mask"],
                              vocab_size=self.tokenizer.get_vocab_size(),
                              maskable=~np.isin(ids, self._special_ids),
                              word_starts=self._word_starts(ids) if self.whole_word_masking
                              else None)
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
                             pad=self.special["pad"], bos=self.special["bos"])

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
        sources = [text_infilling(np.asarray(block), rng, mask_id=self.special["mask"]).tolist()
                   + [eos] for block in examples]
        return seq2seq_batch(sources, [list(block) + [eos] for block in examples],
                             pad=self.special["pad"], bos=self.special["bos"])
