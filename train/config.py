"""Training configuration: a YAML file plus `--set key=value` overrides, checked strictly.

Every section is a dataclass; an unknown key anywhere is an error that names the key and the
keys allowed there. The effective config is saved in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ferry.errors import FerryError
from ferry.files import atomic_write_bytes
from ferry.train.schedule import SCHEDULES


@dataclass
class ModelSection:
    preset: str = "small"  # a name from ferry.model.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # TransformerConfig fields to replace
    init_from: str | None = None  # a checkpoint to fine-tune: its model, weights and tokenizer


@dataclass
class TokenizerSection:
    path: str | None = None  # an existing tokenizer.json; None: train one on the training data
    vocab_size: int = 2000
    num_sentinels: int = 64


@dataclass
class DataSection:
    """Task files are JSON Lines or CSV/TSV with a header; fields are named here."""

    train: str = ""  # JSONL/CSV file; pretraining: also plain text (a document a line) or a dir
    eval: str = ""
    source_field: str = "source"  # seq2seq
    target_field: str = "target"
    text_field: str = "text"  # pretraining text, classification input
    pair_field: str = ""  # classification of sentence pairs: the second text; "": single texts
    label_field: str = "label"  # classification: the class name
    labels: list[str] = field(default_factory=list)  # class names in order; []: from train
    tokens_field: str = "tokens"  # token classification: words (a list, or space-separated)
    tags_field: str = "tags"  # token classification: one BIO tag per word
    question_field: str = "question"  # question answering
    context_field: str = "context"
    answer_field: str = "answer"  # the answer text, found in the context at answer_start
    answer_start_field: str = "answer_start"  # its character offset in the context
    max_source_len: int = 128  # encoder / classifier inputs are cut to this many tokens
    max_target_len: int = 128
    block_size: int = 128  # pretraining: tokens per packed training sequence
    # masked LM: mask spans of up to this many tokens, a span of n drawn with weight 1/n
    # (ALBERT's n-gram masking: 3); 1: single tokens (BERT)
    max_ngram: int = 1
    # permutation LM: predict the last 1/K of each factorisation order (XLNet's K: 6 or 7)
    partial_prediction: int = 6


@dataclass
class PromptSection:
    """Prompt-based fine-tuning (objective prompt_classification): template and verbalizer."""

    template: str = ""  # with {text} (and {text_pair}) and {label}: "{text} It was {label}."
    labels: list[str] = field(default_factory=list)  # "name" or "name=word" (the scored word)


@dataclass
class OptimSection:
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 200
    max_steps: int = 2000
    schedule: str = "cosine"  # "cosine" | "linear" | "inverse_sqrt" | "constant" (after warmup)
    min_lr_ratio: float = 0.05  # cosine/linear decay floor, as a fraction of lr
    batch_size: int = 64  # global: examples per optimizer step, over all ranks and micro-steps
    grad_accum_steps: int = 1  # micro-steps per optimizer step (gradients synced on the last)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    label_smoothing: float = 0.0


@dataclass
class EvalSection:
    every: int = 250  # steps between evaluations (and checkpoints)
    batch_size: int = 128
    max_examples: int = 0  # 0: the whole eval split
    max_new_tokens: int = 32  # seq2seq: generation length for exact match
    patience: int = 0  # early stopping: evals without improvement before stopping; 0: never


@dataclass
class CheckpointSection:
    every: int = 0  # steps between checkpoints; 0: at every eval
    keep_last: int = 3  # step checkpoints kept in run_dir/checkpoints (best/ is kept apart)


@dataclass
class LogSection:
    every: int = 25  # steps between metrics.jsonl lines
    peak_tflops: float = 0.0  # device peak for MFU; 0: known GPUs are detected, else no MFU
    tensorboard: bool = False  # also write TensorBoard scalars to run_dir/tensorboard


@dataclass
class TrainConfig:
    """A whole training run."""

    objective: str = "seq2seq"  # a registered name: `ferry.train.objectives.all_objectives()`
    out_dir: str = "runs/run"
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    precision: str = "fp32"  # "fp32" | "bf16" (autocast) | "fp16" (autocast + grad scaler, CUDA)
    compile: bool = False  # torch.compile the model for training
    tf32: bool = True  # allow TF32 matmuls on NVIDIA GPUs
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact reruns and resumes
    parallel: str = "ddp"  # under torchrun: "ddp" (replicas) | "fsdp" (sharded training state)
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    prompt: PromptSection = field(default_factory=PromptSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(path, yaml.safe_dump(self.to_dict(), sort_keys=False).encode())


def _build(cls: type, data: Any, where: str):
    """Construct dataclass `cls` from a dict, recursing into nested sections; strict about keys."""
    if not isinstance(data, dict):
        raise FerryError(f"config section {where or 'top level'} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise FerryError(
            f"unknown config key {prefix}{unknown[0]}; allowed here: {', '.join(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a scalar against its annotation (ints are accepted where floats are expected)."""
    expected = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}.get(hint)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if expected is not None and (not isinstance(value, expected) or
                                 (hint in (int, float) and isinstance(value, bool))):
        raise FerryError(f"config key {key} must be {hint.__name__}, got {value!r}")
    if str(hint).startswith("tuple") and isinstance(value, list):
        return tuple(value)
    if str(hint) == "list[str]" and (not isinstance(value, list)
                                     or not all(isinstance(v, str) for v in value)):
        raise FerryError(f"config key {key} must be a list of strings, got {value!r}")
    return value


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a config never needs them, and an alias bomb (a few
    lines expanding to billions of nodes) is refused at once instead of exhausting memory."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a ferry config", event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str) -> Any:
    """Safe YAML without aliases (see `_NoAliasLoader`)."""
    return yaml.load(text, Loader=_NoAliasLoader)


def _apply_override(data: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` (the value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise FerryError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = parse_yaml(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise FerryError(f"--set {key}: {raw!r} is not a YAML value "
                         f"({str(exc).splitlines()[0]})") from exc
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FerryError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


PRECISIONS = ("fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")
DEVICE = re.compile(r"cpu|cuda(:\d+)?")
BYTE_ALPHABET, RESERVED = 256, 5  # byte-level BPE's alphabet; pad, bos, eos, unk, mask


def _positive(value: Any) -> bool:
    return value > 0 and math.isfinite(value)


def _fraction(value: Any) -> bool:  # in [0, 1)
    return 0 <= value < 1


# Every value that the key and type checks let through but that would not train: key, test,
# what is expected. Checked at load, so a bad value fails before anything is written.
CHECKS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("seed", lambda v: v >= 0, "≥ 0"),
    ("device", lambda v: DEVICE.fullmatch(v) is not None, "cpu, cuda or cuda:N"),
    ("threads", lambda v: v >= 0, "≥ 0 (0: torch's default)"),
    ("precision", lambda v: v in PRECISIONS, f"one of {PRECISIONS}"),
    ("parallel", lambda v: v in PARALLEL, f"one of {PARALLEL}"),
    ("tokenizer.num_sentinels", lambda v: 0 <= v <= 1000, "in [0, 1000]"),
    ("data.max_source_len", lambda v: v >= 2, "≥ 2"),
    ("data.max_target_len", lambda v: v >= 2, "≥ 2"),
    ("data.block_size", lambda v: v >= 4, "≥ 4"),
    ("data.max_ngram", lambda v: 1 <= v <= 10, "in [1, 10]"),
    ("data.partial_prediction", lambda v: 1 <= v <= 100, "in [1, 100]"),
    ("optim.lr", _positive, "a finite number > 0"),
    ("optim.weight_decay", lambda v: v >= 0 and math.isfinite(v), "a finite number ≥ 0"),
    ("optim.betas", lambda v: len(v) == 2 and all(isinstance(b, (int, float))
                                                  and _fraction(b) for b in v),
     "two numbers in [0, 1), e.g. [0.9, 0.98]"),
    ("optim.warmup_steps", lambda v: v >= 0, "≥ 0"),
    ("optim.max_steps", lambda v: v >= 1, "≥ 1"),
    ("optim.schedule", lambda v: v in SCHEDULES, f"one of {SCHEDULES}"),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.batch_size", lambda v: v >= 1, "≥ 1"),
    ("optim.grad_accum_steps", lambda v: v >= 1, "≥ 1"),
    ("optim.grad_clip", lambda v: v >= 0 and math.isfinite(v), "a finite number ≥ 0"),
    ("optim.label_smoothing", _fraction, "in [0, 1)"),
    ("eval.every", lambda v: v >= 1, "≥ 1"),
    ("eval.batch_size", lambda v: v >= 1, "≥ 1"),
    ("eval.max_examples", lambda v: v >= 0, "≥ 0 (0: the whole split)"),
    ("eval.max_new_tokens", lambda v: v >= 1, "≥ 1"),
    ("eval.patience", lambda v: v >= 0, "≥ 0"),
    ("checkpoint.every", lambda v: v >= 0, "≥ 0"),
    ("checkpoint.keep_last", lambda v: v >= 1, "≥ 1"),
    ("log.every", lambda v: v >= 1, "≥ 1"),
    ("log.peak_tflops", lambda v: v >= 0 and math.isfinite(v), "a finite number ≥ 0"),
)


def _value(config: TrainConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_values(config: TrainConfig) -> TrainConfig:
    """Every field's range and choice (`CHECKS`), and the model section's shape; returns
    `config`. The first bad value is one error naming its key."""
    for key, test, expected in CHECKS:
        value = _value(config, key)
        if not test(value):
            raise FerryError(f"config key {key} must be {expected}, got {value!r}")
    minimum = BYTE_ALPHABET + RESERVED + config.tokenizer.num_sentinels
    if not config.model.init_from and not config.tokenizer.path and \
            config.tokenizer.vocab_size < minimum:
        raise FerryError(f"config key tokenizer.vocab_size must be ≥ {minimum} (256 bytes, the "
                         f"reserved tokens and the sentinels), got {config.tokenizer.vocab_size}")
    if not isinstance(config.model.overrides, dict):
        raise FerryError(f"config key model.overrides must be a mapping of model config fields, "
                         f"got {config.model.overrides!r}")
    return config


def train_config_from_dict(data: dict, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a (YAML-shaped) dict and `key=value` overrides, every value checked
    (`check_values`)."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for assignment in overrides:
        _apply_override(data, assignment)
    return check_values(_build(TrainConfig, data, ""))


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML training config (paths in it are relative to the working directory)."""
    path = Path(path)
    if not path.is_file():
        raise FerryError(f"config file {path} does not exist; pass a YAML file such as "
                         "examples/dates.yaml")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise FerryError(f"{path} is not valid YAML{where}: {exc}".splitlines()[0]) from exc
    return train_config_from_dict(data, overrides)
