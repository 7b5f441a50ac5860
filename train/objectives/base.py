"""The objective contract, the registry of objectives by name, and the helpers they share.

An objective says how a task file becomes batches, a loss and eval metrics. Objectives register
by name with `register_objective`; the loop calls nothing but the methods of `Objective`
(`load`, `collate`, `loss_sum`, `evaluate`, …), so a new objective slots in without touching it.
The package's `__init__` imports every module that defines one, so importing
`ferry.train.objectives` (or anything in it) registers them all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from ferry.errors import FerryError
from ferry.model import Transformer, TransformerConfig
from ferry.runtime.special_ids import SpecialIds
from ferry.train.config import TrainConfig
from ferry.train.data import pad_tensor

IGNORE_INDEX = -100  # label value the loss skips (padding)
EVAL_SEED = 1234  # eval batches are corrupted the same way at every eval
Batch = dict[str, torch.Tensor]

OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make `cls` available as `objective: <cls.name>` in configs."""
    OBJECTIVES[cls.name] = cls
    return cls


def all_objectives() -> dict[str, type[Objective]]:
    """Every registered objective, by name (all are registered once this package is imported:
    its `__init__` imports every module that defines one)."""
    return OBJECTIVES


def objective_class(name: str) -> type[Objective]:
    """The objective registered as `name`; an unknown name lists the known ones."""
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
        """Where streamed corpora are tokenized to (see `ferry.train.datasets.corpus`)."""
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
