"""Training configuration: a YAML file plus `--set key=value` overrides, checked strictly.

Every section is a dataclass; an unknown key anywhere is an error that names the key and the
keys allowed there. The effective config is saved in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ferry.errors import FerryError
from ferry.files import atomic_write_bytes


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

    train: str = ""  # JSONL/CSV file (or plain text, one document a line, for pretraining)
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

    objective: str = "seq2seq"  # "seq2seq" (teacher forcing) | "causal_lm"
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


def _apply_override(data: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` (the value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise FerryError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FerryError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


def train_config_from_dict(data: dict, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a (YAML-shaped) dict and `key=value` overrides."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for assignment in overrides:
        _apply_override(data, assignment)
    return _build(TrainConfig, data, "")


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML training config (paths in it are relative to the working directory)."""
    path = Path(path)
    if not path.is_file():
        raise FerryError(f"config file {path} does not exist; pass a YAML file such as "
                         "examples/dates.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise FerryError(f"{path} is not valid YAML{where}: {exc}".splitlines()[0]) from exc
    return train_config_from_dict(data, overrides)
