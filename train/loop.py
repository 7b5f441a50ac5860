"""The training loop: AdamW, warmup + decay, gradient clipping, periodic eval, checkpoints.

    run_dir/
      config.yaml        the effective config
      tokenizer.json     trained here unless the config names one
      metrics.jsonl      one JSON object per logged step and per eval
      loss.png           training / eval loss and the learning rate
      checkpoint/        the latest: config.json + model.safetensors + tokenizer.json
      best/              the best by the objective's metric
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from ferry.errors import FerryError
from ferry.model import Transformer, preset, save_checkpoint
from ferry.train.config import TrainConfig
from ferry.train.data import read_jsonl, shuffled_batches
from ferry.train.objectives import Objective, objective_class
from ferry.train.plots import plot_training
from ferry.train.schedule import learning_rate
from ferry.train.tokenizer import save_tokenizer, special_token_ids, train_tokenizer

LOG_EVERY = 25  # steps between metrics.jsonl lines


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path  # the latest checkpoint
    best_checkpoint: Path
    final_metrics: dict[str, float]
    best_metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tokenizer_for_config(config: TrainConfig) -> Tokenizer:
    """The configured tokenizer.json, or one trained on the config's training split."""
    if config.tokenizer.path:
        path = Path(config.tokenizer.path)
        if not path.is_file():
            raise FerryError(f"tokenizer {path} does not exist; set tokenizer.path to a "
                             "tokenizer.json or leave it empty to train one")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise FerryError(f"{path} is not a readable tokenizer.json ({exc})") from exc
    reader = objective_class(config.objective)(config, tokenizer=None, special={})
    return train_tokenizer(reader.tokenizer_texts(config.data.train),
                           vocab_size=config.tokenizer.vocab_size,
                           num_sentinels=config.tokenizer.num_sentinels)


def parameter_groups(model: Transformer, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices, not biases, LayerNorm gains or embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_matrix = param.ndim >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def save_run_checkpoint(model: Transformer, directory: Path, run_dir: Path, metadata: dict):
    save_checkpoint(model, directory, metadata)
    shutil.copyfile(run_dir / "tokenizer.json", directory / "tokenizer.json")


def train(config: TrainConfig, *, progress: bool = True,
          log: Callable[[str], None] = print) -> TrainResult:
    """Run a whole training job as configured; returns where the checkpoints are and metrics."""
    started = time.perf_counter()
    objective_cls = objective_class(config.objective)
    model_config = preset(config.model.preset, **config.model.overrides)
    if model_config.architecture not in objective_cls.architectures:
        raise FerryError(f"objective {config.objective} trains {objective_cls.architectures} "
                         f"models, but the model is {model_config.architecture}; set "
                         "model.overrides.architecture")
    seed_everything(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    run_dir = Path(config.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.yaml")

    tokenizer = tokenizer_for_config(config)
    save_tokenizer(tokenizer, run_dir / "tokenizer.json")
    special = special_token_ids(tokenizer)
    objective = objective_cls(config, tokenizer, special)
    train_examples = objective.load(config.data.train)
    eval_examples = objective.load(config.data.eval)
    if config.eval.max_examples:
        eval_examples = eval_examples[: config.eval.max_examples]

    model_config = preset(config.model.preset, **{**config.model.overrides,
                                                  "vocab_size": tokenizer.get_vocab_size()})
    model = Transformer(model_config).to(device)
    optim = config.optim
    optimizer = torch.optim.AdamW(parameter_groups(model, optim.weight_decay), lr=optim.lr,
                                  betas=tuple(optim.betas))
    batches = shuffled_batches(len(train_examples), optim.batch_size, config.seed)
    log(f"training {model_config.architecture} ({sum(p.numel() for p in model.parameters()):,} "
        f"parameters) on {len(train_examples):,} examples, objective {objective.name}, "
        f"{optim.max_steps} steps on {device}")

    metadata = {"special_ids": special, "objective": objective.name,
                "samples": _sample_sources(config, objective)}
    history: list[dict] = []
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")
    best: dict[str, float] = {}
    final: dict[str, float] = {}
    running, tokens_seen, window_start = 0.0, 0, time.perf_counter()
    bar = tqdm(range(1, optim.max_steps + 1), disable=not progress, desc="train", unit="step",
               mininterval=0.5 if sys.stderr.isatty() else 15.0)

    def say(message: str) -> None:
        bar.clear()
        log(message)
        bar.refresh()

    for step in bar:
        lr = learning_rate(step, base_lr=optim.lr, warmup_steps=optim.warmup_steps,
                           max_steps=optim.max_steps, schedule=optim.schedule,
                           min_lr_ratio=optim.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        batch = objective.collate([train_examples[i] for i in next(batches)])
        loss = objective.loss(model, batch)
        if not torch.isfinite(loss):
            raise FerryError(f"loss became {loss.item()} at step {step}; lower optim.lr or "
                             "raise optim.warmup_steps (the last good checkpoint is intact)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        running += loss.item()
        tokens_seen += int(batch["input_ids"].numel())
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)

        if step % LOG_EVERY == 0 or step == optim.max_steps:
            elapsed = time.perf_counter() - window_start
            count = LOG_EVERY if step % LOG_EVERY == 0 else step % LOG_EVERY
            record = {"step": step, "train_loss": running / count, "lr": lr,
                      "tokens_per_s": tokens_seen / max(elapsed, 1e-9)}
            running, tokens_seen, window_start = 0.0, 0, time.perf_counter()
            _append(metrics_path, record, history)
        if step % config.eval.every == 0 or step == optim.max_steps:
            final = objective.evaluate(model, eval_examples)
            _append(metrics_path, {"step": step, **{f"eval_{k}": v for k, v in final.items()}},
                    history)
            say(f"step {step}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in final.items()))
            save_run_checkpoint(model, run_dir / "checkpoint", run_dir,
                                {**metadata, "step": step, "metrics": final})
            if not best or _better(final[objective.metric], best[objective.metric],
                                   objective.higher_is_better):
                best = final
                save_run_checkpoint(model, run_dir / "best", run_dir,
                                    {**metadata, "step": step, "metrics": final})
    bar.close()
    smoothing = optim.label_smoothing
    plot_training(history, run_dir / "loss.png", train_label=(
        f"train loss (label smoothing {smoothing})" if smoothing else "train loss"))
    return TrainResult(run_dir=run_dir, checkpoint=run_dir / "checkpoint",
                       best_checkpoint=run_dir / "best", final_metrics=final, best_metrics=best,
                       history=history, seconds=time.perf_counter() - started)


def _better(value: float, best: float, higher_is_better: bool) -> bool:
    if math.isnan(value):
        return False
    return value > best if higher_is_better else value < best


def _append(path: Path, record: dict, history: list[dict]) -> None:
    history.append(record)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _sample_sources(config: TrainConfig, objective: Objective) -> list[str]:
    """A few held-out inputs kept in the checkpoint: export uses them for golden generations."""
    if objective.name != "seq2seq":
        return []
    rows = read_jsonl(config.data.eval, [config.data.source_field])
    return [row[config.data.source_field] for row in rows[:16]]
