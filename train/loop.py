"""The training loop: one loop for one CPU process, one GPU, or many GPUs under torchrun.

AdamW with decay / no-decay groups, warmup + decay schedules (pure functions of the step),
gradient accumulation, clipping, mixed precision, periodic eval with early stopping, atomic
checkpoints and exact resume, metrics and plots.

    run_dir/
      config.yaml        the effective config
      tokenizer.json     trained here unless the config names one
      metrics.jsonl      one JSON object per logged step and per eval
      loss.png           training / eval loss and the learning rate (redrawn at every eval)
      checkpoints/       the last `checkpoint.keep_last` step checkpoints (see checkpointing.py)
      checkpoint         symlink to the latest checkpoint
      best/              the best checkpoint by the objective's metric
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from ferry.errors import FerryError
from ferry.model import Transformer, TransformerConfig, preset
from ferry.model.checkpoint import (
    WEIGHTS_FILE,
    load_weights,
    read_checkpoint_config,
    read_weights,
)
from ferry.train.checkpointing import (
    TOKENIZER_FILE,
    CheckpointManager,
    Resumed,
    capture_rng,
    load_train_state,
    restore_rng,
    verify_checkpoint,
)
from ferry.train.config import TrainConfig
from ferry.train.data import global_batch_indices, read_jsonl
from ferry.train.distributed import Distributed, setup_distributed
from ferry.train.flops import peak_flops, training_flops
from ferry.train.metrics_log import MetricsLog
from ferry.train.objectives import Objective, objective_class
from ferry.train.plots import plot_training
from ferry.train.schedule import learning_rate
from ferry.train.sharding import (
    check_strategy,
    distribute,
    full_states,
    gradient_sync,
    is_sharded,
    load_optimizer_state,
)
from ferry.train.tokenizer import save_tokenizer, special_token_ids, train_tokenizer

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path  # the latest checkpoint (a symlink into run_dir/checkpoints)
    best_checkpoint: Path
    final_metrics: dict[str, float]
    best_metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: Path | None = None
    stopped_early: bool = False
    rank: int = 0  # under torchrun, only rank 0's result carries the run's history
    baseline: dict | None = None  # the objective's trivial baseline on the eval split


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_config_for(config: TrainConfig, vocab_size: int | None = None) -> TransformerConfig:
    """The model to train: `model.init_from`'s config, else the preset; then the overrides."""
    if config.model.init_from:
        base = read_checkpoint_config(config.model.init_from)["model"]
        return TransformerConfig.from_dict({**base, **config.model.overrides})
    extra = {} if vocab_size is None else {"vocab_size": vocab_size}
    return preset(config.model.preset, **{**config.model.overrides, **extra})


def initialise_from(model: Transformer, checkpoint: str, log: Callable[[str], None]) -> None:
    """Copy a pretrained checkpoint's weights into `model`; parameters it lacks (new heads) keep
    their fresh initialisation, and a shape mismatch is an error."""
    weights = Path(checkpoint) / WEIGHTS_FILE
    loaded = load_weights(model, read_weights(weights, model.config),
                          f"model.init_from {weights}", complete=False,
                          replaceable=("head.",),  # a head for other labels stays fresh
                          hint="; drop the shape overrides")
    log(f"initialised from {checkpoint}: {loaded.loaded} tensors loaded"
        + (f", {len(loaded.missing)} new" if loaded.missing else "")
        + (f" (the task head is new: {len(loaded.replaced)} tensors had other shapes)"
           if loaded.replaced else "")
        + (f", {len(loaded.unused)} unused" if loaded.unused else ""))


def tokenizer_for_config(config: TrainConfig) -> Tokenizer:
    """The configured tokenizer.json, `model.init_from`'s, or one trained on the config's
    training split."""
    if config.model.init_from and not config.tokenizer.path:
        return Tokenizer.from_file(str(Path(config.model.init_from) / TOKENIZER_FILE))
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


def special_ids_for(config: TrainConfig, tokenizer: Tokenizer, resumed_dir: Path | None
                    ) -> dict[str, int | None]:
    """The special-token ids of the run: those of the checkpoint it resumes or starts from when
    it uses that checkpoint's tokenizer (an imported BERT's `[CLS]`, a Marian's pad as decoder
    start), else the reserved tokens of ferry's own tokenizers."""
    source = resumed_dir or (config.model.init_from if not config.tokenizer.path else None)
    if source is not None:
        ids = read_checkpoint_config(source).get("special_ids")
        if isinstance(ids, dict):
            return ids
    return special_token_ids(tokenizer)


def parameter_groups(model: Transformer, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices, not biases, LayerNorm gains or embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_matrix = param.ndim >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def find_resume_checkpoint(run_dir: Path, resume: str | None, keep_last: int,
                           warn: Callable[[str], None]) -> Path | None:
    """`--resume auto`: the latest intact checkpoint of the run (None: start fresh);
    `--resume PATH`: that checkpoint, which must be intact."""
    if not resume:
        return None
    if resume == "auto":
        return CheckpointManager(run_dir, keep_last=keep_last).latest_intact(warn)
    path = Path(resume)
    if not path.is_dir():
        raise FerryError(f"--resume {resume}: no such checkpoint directory; pass a "
                         "run_dir/checkpoints/step-… directory or 'auto'")
    verify_checkpoint(path)
    return path


def train(config: TrainConfig, *, progress: bool = True, log: Callable[[str], None] = print,
          resume: str | None = None) -> TrainResult:
    """Run a training job as configured; under torchrun, one data-parallel rank of it.

    Args:
        progress: show a progress bar (rank 0 only).
        log: where rank 0's messages go.
        resume: None (fresh run), "auto" (latest intact checkpoint of `out_dir`, if any) or a
            checkpoint directory.
    """
    ranks = setup_distributed(config.device)
    try:
        with _torch_settings(config, ranks.device):
            return _train(config, ranks, progress=progress and ranks.is_main,
                          log=log if ranks.is_main else (lambda message: None), resume=resume)
    finally:
        ranks.shutdown()


@contextlib.contextmanager
def _torch_settings(config: TrainConfig, device: torch.device):
    """The run's process-wide torch settings (threads, deterministic algorithms, TF32 on CUDA),
    put back as they were when it ends: a process that trains and then decodes with the torch
    backend must not decode in TF32 (its tokens would then differ from the other backends')."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(config.deterministic)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
    try:
        yield
    finally:
        threads, deterministic, matmul_tf32, cudnn_tf32 = before
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def _check(config: TrainConfig, objective_cls: type[Objective], ranks: Distributed) -> None:
    for key, what in (("train", "the training data"), ("eval", "held-out data (ferry does not "
                                                               "split the training data)")):
        path = getattr(config.data, key)
        if not path:
            raise FerryError(f"config key data.{key} is empty; give {what}: a file or directory")
        if not Path(path).exists():
            raise FerryError(f"config key data.{key}: {path} does not exist")
    if config.model.init_from:
        source = Path(config.model.init_from)
        needed = [WEIGHTS_FILE] + ([] if config.tokenizer.path else [TOKENIZER_FILE])
        missing = [name for name in needed if not (source / name).is_file()]
        if missing:
            raise FerryError(f"model.init_from {source} lacks {missing}; point it at a "
                             "checkpoint directory written by `ferry train`")
    model_config = model_config_for(config)
    if model_config.architecture not in objective_cls.architectures:
        raise FerryError(f"objective {config.objective} trains {objective_cls.architectures} "
                         f"models, but the model is {model_config.architecture}; set "
                         "model.overrides.architecture")
    if config.precision not in PRECISIONS:
        raise FerryError(f"precision must be one of {list(PRECISIONS)}, got {config.precision!r}")
    if config.precision == "fp16" and ranks.device.type != "cuda":
        raise FerryError("precision fp16 needs a CUDA GPU (it trains with a gradient scaler); "
                         "use bf16 on the CPU")
    check_strategy(config.parallel, config.precision)
    optim = config.optim
    split = ranks.world_size * optim.grad_accum_steps
    if optim.grad_accum_steps < 1 or optim.batch_size % split:
        raise FerryError(f"optim.batch_size {optim.batch_size} must be a multiple of ranks × "
                         f"grad_accum_steps = {ranks.world_size} × {optim.grad_accum_steps}")
    if config.eval.every < 1 or optim.max_steps < 1:
        raise FerryError("eval.every and optim.max_steps must be ≥ 1")


def _micro_batches(indices: list[int], ranks: Distributed, accum: int) -> list[list[int]]:
    """This rank's share of a global batch, cut into `accum` equal micro-batches."""
    mine = indices[ranks.rank :: ranks.world_size]
    size = len(mine) // accum
    return [mine[i * size : (i + 1) * size] for i in range(accum)]


@dataclass
class _Setup:
    """What a run checks and builds before it writes anything."""

    objective: Objective
    train_examples: list
    eval_examples: list
    model_config: TransformerConfig
    model: Transformer
    resumed: Resumed | None


def _set_up(config: TrainConfig, objective_cls: type[Objective], tokenizer: Tokenizer,
            resumed_dir: Path | None, log: Callable[[str], None]) -> _Setup:
    """The objective and its data, the model config, and the model with its initial (or
    resumed) weights: every check of the data and the model happens here, before the run
    directory is written."""
    objective = objective_cls(config, tokenizer, special_ids_for(config, tokenizer, resumed_dir),
                              log=log)
    train_examples = objective.load(config.data.train)
    eval_examples = objective.load(config.data.eval)
    if config.eval.max_examples:
        eval_examples = eval_examples[: config.eval.max_examples]
    model_config = model_config_for(config, tokenizer.get_vocab_size())
    model_config = dataclasses.replace(model_config, **objective.model_overrides(model_config))
    if model_config.vocab_size < tokenizer.get_vocab_size():  # imported models may pad theirs
        raise FerryError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
                         f"{model_config.vocab_size}; fine-tune with model.init_from's tokenizer")
    model = Transformer(model_config)
    if config.model.init_from and resumed_dir is None:
        initialise_from(model, config.model.init_from, log)
    resumed = None
    if resumed_dir is not None:
        weights = resumed_dir / WEIGHTS_FILE
        load_weights(model, read_weights(weights, model_config), weights)
        state = load_train_state(resumed_dir)
        resumed = Resumed(directory=resumed_dir, step=int(state["step"]), state=state)
    return _Setup(objective, train_examples, eval_examples, model_config, model, resumed)


def _prepare(config: TrainConfig, objective_cls: type[Objective], ranks: Distributed,
             run_dir: Path, resumed_dir: Path | None, log: Callable[[str], None]) -> _Setup:
    """Rank 0 sets the run up (training a tokenizer if needed, tokenizing the corpus into the
    shared token cache) and only then writes the run directory's config and tokenizer; a
    failure leaves an existing run directory as it was and a new one absent. The other ranks
    then read the same tokenizer and token files."""
    if ranks.is_main:
        fresh = not run_dir.exists()
        try:
            tokenizer = (Tokenizer.from_file(str(resumed_dir / TOKENIZER_FILE)) if resumed_dir
                         else tokenizer_for_config(config))
            setup = _set_up(config, objective_cls, tokenizer, resumed_dir, log)
        except BaseException:
            if fresh:  # nothing but a token cache can have been written there
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
        save_tokenizer(tokenizer, run_dir / TOKENIZER_FILE)
    ranks.barrier()
    if not ranks.is_main:
        tokenizer = Tokenizer.from_file(str(run_dir / TOKENIZER_FILE))
        setup = _set_up(config, objective_cls, tokenizer, resumed_dir, log)
    return setup


@dataclass
class _Trainable:
    """The model as the run trains, evaluates and saves it, with its optimizer."""

    raw_model: Transformer  # the unwrapped model, on the run's device
    model: torch.nn.Module  # what forward and backward run through (DDP / FSDP, compiled)
    eval_model: Transformer  # full weights for eval and checkpoints: under FSDP, rank 0's copy
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling for fp16; a no-op otherwise
    autocast: Callable[[], contextlib.AbstractContextManager]  # the mixed-precision context
    sharded: bool  # FSDP: optimizer state and weights are gathered to save them


def _build_trainable(config: TrainConfig, setup: _Setup, ranks: Distributed) -> _Trainable:
    """Move the set-up model to the device, wrap it for the parallel strategy (and
    `torch.compile`), and build its AdamW optimizer and mixed-precision pieces."""
    raw_model = setup.model
    raw_model.to(ranks.device)
    model = distribute(raw_model, config.parallel, ranks)
    sharded = is_sharded(model)
    # evaluation and checkpoints read full weights: under FSDP rank 0 gathers them into a copy
    eval_model = raw_model
    if sharded and ranks.is_main:
        with torch.random.fork_rng(devices=[]):  # the training RNG stream stays untouched
            eval_model = Transformer(setup.model_config).to(ranks.device)
    if config.compile:
        model = torch.compile(model)
    optim = config.optim
    optimizer = torch.optim.AdamW(parameter_groups(raw_model, optim.weight_decay), lr=optim.lr,
                                  betas=tuple(optim.betas))
    scaler = torch.amp.GradScaler(ranks.device.type, enabled=config.precision == "fp16")
    autocast_dtype = PRECISIONS[config.precision]
    autocast = (contextlib.nullcontext if autocast_dtype is None else
                lambda: torch.autocast(ranks.device.type, dtype=autocast_dtype))
    return _Trainable(raw_model=raw_model, model=model, eval_model=eval_model,
                      optimizer=optimizer, scaler=scaler, autocast=autocast, sharded=sharded)


@dataclass
class _RunState:
    """Where the run stands: what checkpoints carry so that a resumed run continues exactly."""

    start_step: int = 0  # the last step done before this process started
    best: dict = field(default_factory=dict)  # eval metrics of the best checkpoint so far
    final: dict = field(default_factory=dict)  # eval metrics of the latest eval
    evals_without_improvement: int = 0  # for early stopping (eval.patience)


def _restore_run_state(resumed: Resumed | None, trainable: _Trainable,
                      log: Callable[[str], None]) -> _RunState:
    """A fresh run's state, or the resumed checkpoint's: its optimizer and gradient-scaler
    state, best and latest metrics, early-stopping count and RNG states. A checkpoint resumes
    only under the optimizer layout it was written with (sharded by FSDP, or not)."""
    if resumed is None:
        return _RunState()
    sharded = trainable.sharded
    saved_sharded = resumed.state.get("optimizer_layout") == "fsdp"
    if saved_sharded != sharded:
        raise FerryError(f"{resumed.directory} was written by a "
                         f"{'parallel=fsdp' if saved_sharded else 'single-process or DDP'} "
                         f"run; resume it the same way (this run is "
                         f"{'parallel=fsdp' if sharded else 'not sharded'})")
    if sharded:
        load_optimizer_state(trainable.model, trainable.optimizer, resumed.state["optimizer"])
    else:
        trainable.optimizer.load_state_dict(resumed.state["optimizer"])
    trainable.scaler.load_state_dict(resumed.state["scaler"])
    run_state = _RunState(start_step=resumed.step, best=dict(resumed.state["best"]),
                          final=dict(resumed.state["final"]),
                          evals_without_improvement=int(
                              resumed.state["evals_without_improvement"]))
    restore_rng(resumed.state["rng"])
    log(f"resuming from {resumed.directory} at step {run_state.start_step}")
    return run_state


def _backward(model: torch.nn.Module, raw_model: Transformer, objective: Objective,
              micros: list, ranks: Distributed, scaler: torch.amp.GradScaler,
              autocast: Callable, window: dict) -> float:
    """Accumulate the gradients of one global batch (this rank's micro-batches through
    `model`, the wrapped `raw_model`); returns the global per-target-token loss and adds the
    tokens and FLOPs done to `window`."""
    (global_targets,) = ranks.sum([sum(objective.target_tokens(m) for m in micros)])
    local_loss = 0.0
    for i, micro in enumerate(micros):
        syncing = not ranks.enabled or i == len(micros) - 1
        with gradient_sync(model, syncing), autocast():
            loss_sum = objective.loss_sum(model, micro)
        # Scaled so that micro-steps and ranks add up to the global per-token mean (DDP and
        # FSDP average gradients over ranks, hence × world_size).
        scaler.scale(loss_sum * ranks.world_size / max(global_targets, 1)).backward()
        local_loss += loss_sum.item()
        src, tgt, src_len, tgt_len = objective.shape(micro)
        window["tokens"] += src + tgt
        window["flops"] += training_flops(raw_model, source_tokens=src, target_tokens=tgt,
                                          source_len=src_len, target_len=tgt_len)
    (total_loss,) = ranks.sum([local_loss])
    return total_loss / max(global_targets, 1)


def _optimizer_step(step: int, *, config: TrainConfig, objective: Objective,
                    train_examples: Sequence, trainable: _Trainable, ranks: Distributed,
                    window: dict) -> tuple[float, float]:
    """Optimizer step `step` (1-based): the scheduled learning rate, the gradients of this
    rank's micro-batches of the step's global batch, clipping, the update. Returns (learning
    rate, global per-target-token loss); a non-finite loss is an error."""
    optim = config.optim
    model, raw_model, optimizer = trainable.model, trainable.raw_model, trainable.optimizer
    lr = learning_rate(step, base_lr=optim.lr, warmup_steps=optim.warmup_steps,
                       max_steps=optim.max_steps, schedule=optim.schedule,
                       min_lr_ratio=optim.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    indices = global_batch_indices(step, num_examples=len(train_examples),
                                   batch_size=optim.batch_size, seed=config.seed)
    micros = [objective.collate([train_examples[i] for i in chunk])
              for chunk in _micro_batches(indices, ranks, optim.grad_accum_steps)]
    loss = _backward(model, raw_model, objective, micros, ranks, trainable.scaler,
                     trainable.autocast, window)
    if not math.isfinite(loss):
        raise FerryError(f"loss became {loss} at step {step}; lower optim.lr or raise "
                         "optim.warmup_steps (the last good checkpoint is intact)")
    if optim.grad_clip > 0:
        trainable.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), optim.grad_clip)
    trainable.scaler.step(optimizer)
    trainable.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return lr, loss


def _evaluate_and_checkpoint(step: int, *, config: TrainConfig, objective: Objective,
                             eval_examples: list, trainable: _Trainable, run_state: _RunState,
                             checkpoints: CheckpointManager, metrics: MetricsLog | None,
                             metadata: dict, ranks: Distributed, say: Callable[[str], None]
                             ) -> bool:
    """After optimizer step `step`: evaluate (every `eval.every` steps and at the last one),
    save a checkpoint (at every eval, and every `checkpoint.every` steps) and the best one, and
    redraw the plot. Every rank calls it (under FSDP all take part in gathering the full
    state); rank 0 evaluates and writes. Returns whether the run stops early: `eval.patience`
    evals without improvement."""
    optim = config.optim
    evaluating = step % config.eval.every == 0 or step == optim.max_steps
    checkpointing = evaluating or (config.checkpoint.every > 0 and
                                   step % config.checkpoint.every == 0)
    stop = 0.0
    optimizer_state: dict = {}
    if trainable.sharded and (evaluating or checkpointing):
        # every rank takes part
        weights, optimizer_state = full_states(trainable.model, trainable.optimizer)
        if ranks.is_main:
            trainable.eval_model.load_state_dict(weights)
    elif ranks.is_main and checkpointing:
        optimizer_state = trainable.optimizer.state_dict()
    if ranks.is_main and evaluating:
        run_state.final = final = objective.evaluate(trainable.eval_model, eval_examples)
        metrics.write({"step": step, **{f"eval_{k}": v for k, v in final.items()}})
        say(f"step {step}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in final.items()))
        improved = not run_state.best or _better(final[objective.metric],
                                                run_state.best[objective.metric],
                                                objective.higher_is_better)
        run_state.best = dict(final) if improved else run_state.best
        run_state.evals_without_improvement = (0 if improved else
                                              run_state.evals_without_improvement + 1)
        patience = config.eval.patience
        stop = float(patience > 0 and run_state.evals_without_improvement >= patience)
    if ranks.is_main and checkpointing:
        saved = checkpoints.save(step, trainable.eval_model, metadata={
            **metadata, "step": step, "metrics": run_state.final}, train_state={
            "step": step, "optimizer": optimizer_state,
            "optimizer_layout": "fsdp" if trainable.sharded else "torch",
            "scaler": trainable.scaler.state_dict(), "rng": capture_rng(),
            "best": run_state.best, "final": run_state.final,
            "evals_without_improvement": run_state.evals_without_improvement})
        if evaluating and run_state.evals_without_improvement == 0:
            checkpoints.save_best(saved)
    if ranks.is_main and evaluating:
        plot_training(metrics.history, checkpoints.run_dir / "loss.png",
                      label_smoothing=optim.label_smoothing)
    (stop,) = ranks.sum([stop])
    ranks.barrier()
    return bool(stop)


def _report_baseline(objective: Objective, train_examples: list, eval_examples: list,
                     final: dict[str, float], log: Callable[[str], None]) -> dict:
    """The objective's trivial baseline on the eval split, logged beside the model's last eval
    metric: `{"name": its description, <metric>: its value}`."""
    description, value = objective.baseline(train_examples, eval_examples)
    better = _better(final[objective.metric], value, objective.higher_is_better)
    log(f"{objective.metric}: model {final[objective.metric]:.4f} vs trivial baseline "
        f"({description}) {value:.4f}: {'better' if better else 'NOT better'}")
    return {"name": description, objective.metric: value}


def _train(config: TrainConfig, ranks: Distributed, *, progress: bool,
           log: Callable[[str], None], resume: str | None) -> TrainResult:
    """`train` on one rank: check the config, set the run up (or resume it), then run the
    optimizer steps with periodic eval and checkpoints."""
    started = time.perf_counter()
    objective_cls = objective_class(config.objective)
    _check(config, objective_cls, ranks)
    seed_everything(config.seed)
    run_dir = Path(config.out_dir)
    checkpoints = CheckpointManager(run_dir, keep_last=config.checkpoint.keep_last)
    if ranks.is_main:  # an interrupted earlier run's half-made swaps are finished first
        checkpoints.recover()
    ranks.barrier()
    resumed_dir = find_resume_checkpoint(run_dir, resume, config.checkpoint.keep_last, log)
    setup = _prepare(config, objective_cls, ranks, run_dir, resumed_dir, log)
    objective, train_examples = setup.objective, setup.train_examples
    optim = config.optim
    trainable = _build_trainable(config, setup, ranks)
    peak = peak_flops(ranks.device, config.precision, config.log.peak_tflops)
    run_state = _restore_run_state(setup.resumed, trainable, log)
    start_step = run_state.start_step
    metrics = (MetricsLog(run_dir, resume_step=start_step if setup.resumed else None,
                          tensorboard=config.log.tensorboard) if ranks.is_main else None)
    parameters = sum(p.numel() for p in trainable.raw_model.parameters())
    log(f"training {setup.model_config.architecture} ({parameters:,}"
        f" parameters) on {len(train_examples):,} examples, objective {objective.name}, "
        f"steps {start_step + 1}–{optim.max_steps} on {ranks.world_size} × {ranks.device}, "
        f"{config.precision}, global batch {optim.batch_size}"
        f"{f' in {optim.grad_accum_steps} micro-steps' if optim.grad_accum_steps > 1 else ''}")

    metadata = {"special_ids": objective.special, "objective": objective.name,
                "task": objective.task_metadata(), "samples": _sample_sources(config, objective)}
    window = {"loss": 0.0, "steps": 0, "tokens": 0.0, "flops": 0.0, "start": time.perf_counter()}
    stopped_early = False
    bar = tqdm(range(start_step + 1, optim.max_steps + 1), disable=not progress, desc="train",
               unit="step", initial=start_step, total=optim.max_steps,
               mininterval=0.5 if sys.stderr.isatty() else 15.0)

    def say(message: str) -> None:
        bar.clear()
        log(message)
        bar.refresh()

    last_step = start_step
    for step in bar:
        last_step = step
        lr, loss = _optimizer_step(step, config=config, objective=objective,
                                   train_examples=train_examples, trainable=trainable,
                                   ranks=ranks, window=window)
        window["loss"] += loss
        window["steps"] += 1

        if step % config.log.every == 0 or step == optim.max_steps:
            record = _log_record(step, lr, window, ranks, peak)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            if metrics is not None:
                metrics.write(record)
            window = {"loss": 0.0, "steps": 0, "tokens": 0.0, "flops": 0.0,
                      "start": time.perf_counter()}

        if _evaluate_and_checkpoint(step, config=config, objective=objective,
                                    eval_examples=setup.eval_examples, trainable=trainable,
                                    run_state=run_state, checkpoints=checkpoints, metrics=metrics,
                                    metadata=metadata, ranks=ranks, say=say):
            say(f"early stopping at step {step}: {objective.metric} has not improved for "
                f"{config.eval.patience} evals")
            stopped_early = True
            break
    bar.close()
    baseline = None
    if ranks.is_main and run_state.final:
        baseline = _report_baseline(objective, train_examples, setup.eval_examples,
                                    run_state.final, log)
        metrics.write({"step": last_step, "baseline": baseline})
    if metrics is not None:
        metrics.close()
    return TrainResult(run_dir=run_dir, checkpoint=checkpoints.latest_link,
                       best_checkpoint=checkpoints.best_dir, final_metrics=run_state.final,
                       best_metrics=run_state.best, history=metrics.history if metrics else [],
                       seconds=time.perf_counter() - started, resumed_from=resumed_dir,
                       stopped_early=stopped_early, rank=ranks.rank, baseline=baseline)


def _log_record(step: int, lr: float, window: dict, ranks: Distributed, peak: float | None
                ) -> dict:
    """One metrics.jsonl line: mean loss over the window, throughput summed over ranks."""
    elapsed = max(time.perf_counter() - window["start"], 1e-9)
    tokens, flops = ranks.sum([window["tokens"], window["flops"]])
    record = {"step": step, "train_loss": window["loss"] / max(window["steps"], 1), "lr": lr,
              "tokens_per_s": tokens / elapsed}
    if peak:
        record["mfu"] = flops / elapsed / (peak * ranks.world_size)
    return record


def _better(value: float, best: float, higher_is_better: bool) -> bool:
    if math.isnan(value):
        return False
    return value > best if higher_is_better else value < best


def _sample_sources(config: TrainConfig, objective: Objective) -> list[str]:
    """A few held-out inputs kept in the checkpoint: export uses them for golden generations."""
    if objective.name != "seq2seq":
        return []
    rows = read_jsonl(config.data.eval, [config.data.source_field])
    return [row[config.data.source_field] for row in rows[:16]]
