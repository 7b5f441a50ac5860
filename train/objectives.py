"""Training objectives: how a task file becomes batches, a loss, and eval metrics.

Objectives register by name; the loop only calls `load`, `collate`, `loss` and `evaluate`, so a
new objective (masked LM, span corruption, classification, …) slots in without touching it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from ferry.errors import FerryError
from ferry.model import Transformer, TransformerConfig
from ferry.runtime.generation import SpecialIds
from ferry.train.config import TrainConfig
from ferry.train.corpus import iter_documents, packed_blocks
from ferry.train.data import encode_all, pad_tensor, read_jsonl
from ferry.train.task_metrics import translation_scores

IGNORE_INDEX = -100  # label value the loss skips (padding)
EVAL_SEED = 1234  # eval batches are corrupted the same way at every eval
Batch = dict[str, torch.Tensor]

OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make `cls` available as `objective: <cls.name>` in configs."""
    OBJECTIVES[cls.name] = cls
    return cls


def all_objectives() -> dict[str, type[Objective]]:
    """Every registered objective (importing the modules that register them)."""
    from ferry.train import pretraining, tasks  # noqa: F401  (register their objectives)

    return OBJECTIVES


def objective_class(name: str) -> type[Objective]:
    """The objective registered as `name`; an unknown name lists the known ones."""
    all_objectives()
    if name not in OBJECTIVES:
        raise FerryError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


class Objective(ABC):
    """What the loop needs from an objective."""

    name: ClassVar[str]
    stage: ClassVar[str]  # "pretrain" or "finetune": which `ferry train` subcommand runs it
    architectures: ClassVar[tuple[str, ...]]  # model architectures it trains
    metric: ClassVar[str]  # the eval metric that picks the best checkpoint
    higher_is_better: ClassVar[bool]

    def __init__(self, config: TrainConfig, tokenizer: Tokenizer, special: dict[str, int],
                 log: Callable[[str], None] = print):
        self.config = config
        self.tokenizer = tokenizer
        self.special = special
        self.log = log

    def special_id(self, role: str) -> int:
        """The id of a special token the objective needs (mask, …); a tokenizer without it is
        an error naming the role."""
        token_id = self.special.get(role)
        if token_id is None:
            raise FerryError(f"objective {self.name} needs a {role} token, but this model's "
                             "tokenizer has none; choose an objective that fits the model")
        return token_id

    @property
    def cache_dir(self) -> Path:
        """Where streamed corpora are tokenized to (see `ferry.train.corpus`)."""
        return Path(self.config.out_dir) / "token_cache"

    @abstractmethod
    def tokenizer_texts(self, path: str) -> Iterator[str]:
        """Texts of a data file to train a tokenizer on."""

    @abstractmethod
    def load(self, path: str) -> Sequence:
        """Examples of a data file, tokenized (a list, or blocks read from a token file)."""

    @abstractmethod
    def collate(self, examples: list, rng: np.random.Generator | None = None) -> Batch:
        """A list of examples → a batch of padded tensors.

        Objectives that corrupt their inputs draw from `rng`; without one (training) they draw
        a generator from numpy's global state, which checkpoints capture, so resumed runs see
        the same corruption.
        """

    @abstractmethod
    def loss_sum(self, model: Transformer, batch: Batch) -> torch.Tensor:
        """Training loss summed over the batch's target tokens (with label smoothing).

        The loop divides by the global count of target tokens, so micro-batches, gradient
        accumulation and data-parallel ranks add up to exactly the full-batch mean.
        """

    @staticmethod
    def target_tokens(batch: Batch) -> int:
        """Target tokens the loss is summed over."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    @abstractmethod
    def shape(self, batch: Batch) -> tuple[int, int, int, int]:
        """(source tokens, target tokens, source length, target length) of the padded batch, as
        the model computes over it (for throughput and FLOPs)."""

    @abstractmethod
    def evaluate(self, model: Transformer, examples: list) -> dict[str, float]:
        """Eval metrics on held-out examples (always including `loss` and `self.metric`)."""

    @abstractmethod
    def baseline(self, train_examples: list, eval_examples: list) -> tuple[str, float]:
        """(description, value of `self.metric`) of the trivial baseline the model must beat."""

    def model_overrides(self, model: TransformerConfig) -> dict:
        """TransformerConfig fields this objective sets on the model (a task head and its label
        count, segment embeddings), given the configured model; also binds the objective to
        that architecture."""
        return {}

    def task_metadata(self) -> dict:
        """What the checkpoint and bundle record about the task (`manifest["task"]`): its kind,
        labels, prompt, and whether the vocabulary logits (`lm` graph) are served."""
        return {"kind": self.name, "lm": self.stage == "pretrain"}

    def eval_batches(self, examples: list) -> Iterator[tuple[list, Batch]]:
        """Eval batches with a fixed corruption per batch, so evals are comparable."""
        size = self.config.eval.batch_size
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            yield chunk, self.collate(chunk, rng=np.random.default_rng(EVAL_SEED + start))


def on_model_device(model: torch.nn.Module, batch: Batch) -> Batch:
    """`batch`'s tensors moved to the device `model`'s parameters are on."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def corruption_rng(rng: np.random.Generator | None) -> np.random.Generator:
    """`rng`, or (in training) a generator seeded from numpy's checkpointed global state."""
    return rng if rng is not None else np.random.default_rng(np.random.randint(2**31 - 1))


def decoder_start(special: dict[str, int]) -> int:
    """The token the decoder starts from (`SpecialIds.decoder_start`)."""
    return SpecialIds.from_ids(special).decoder_start


def seq2seq_batch(sources: list[list[int]], targets: list[list[int]], *, pad: int, start: int
                  ) -> Batch:
    """Padded encoder inputs, decoder inputs `<start> target` (shifted right) and labels
    `target` (ending `</s>`)."""
    input_ids = pad_tensor(sources, pad)  # (B, S)
    labels = pad_tensor(targets, pad)  # (B, T)
    decoder_input_ids = torch.cat(
        [torch.full((len(targets), 1), start, dtype=torch.long), labels[:, :-1]], dim=1
    )  # (B, T)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad).long(),
            "decoder_input_ids": decoder_input_ids,
            "labels": labels.masked_fill(labels == pad, IGNORE_INDEX)}


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0,
                        reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the non-ignored positions of (B, T, V) logits / (B, T) labels."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, label_smoothing=smoothing, reduction=reduction,
    )


def mean_eval_loss(objective: Objective, model: Transformer, examples: list,
                   forward: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Token-weighted mean cross-entropy (no smoothing) over `examples`."""
    total, count = 0.0, 0
    for _, batch in objective.eval_batches(examples):
        logits, labels = forward(batch)
        tokens = int((labels != IGNORE_INDEX).sum())
        total += float(token_cross_entropy(logits, labels)) * tokens
        count += tokens
    return total / max(count, 1)


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
