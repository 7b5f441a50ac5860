"""Checkpoints: `config.json` (model config + extra metadata) beside `model.safetensors`.

Writes are atomic (temporary file, fsync, rename), so an interrupted save never leaves a torn
checkpoint where a good one was. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ferry.errors import FerryError
from ferry.files import atomic_write_bytes
from ferry.model.config import TransformerConfig
from ferry.model.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_checkpoint(
    model: Transformer, directory: str | Path, metadata: dict | None = None
) -> Path:
    """Save `model` into `directory`; `metadata` (e.g. special token ids) goes into config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, save(state))
    payload = {"model": model.config.to_dict(), **(metadata or {})}
    atomic_write_bytes(directory / CONFIG_FILE, json.dumps(payload, indent=2).encode())
    return directory


def read_checkpoint_config(directory: str | Path) -> dict:
    """The parsed config.json of a checkpoint directory, with a clear error when it isn't one."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FerryError(
            f"{directory} is not a ferry checkpoint: {CONFIG_FILE} is missing "
            "(expected a directory written by `ferry train`)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FerryError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise FerryError(f"{path} has no 'model' section; expected a ferry checkpoint config")
    return data


def read_weights(path: str | Path, config: TransformerConfig,
                 map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors weights file → a state dict under this version's names.

    Checkpoints of ferry 0.1 kept one learned position table for both stacks
    (`embedding.learned_positions.weight`) and an untied projection as `lm_head.weight`; they
    are renamed here (the shared table goes to each stack), so they load unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise FerryError(f"{path.parent} has no {path.name}; the checkpoint is incomplete")
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise FerryError(f"{path} is not a readable safetensors file ({exc})") from exc
    shared_positions = state.pop("embedding.learned_positions.weight", None)
    if shared_positions is not None:
        for stack in ("encoder", "decoder"):
            if getattr(config, f"has_{stack}"):
                state[f"{stack}.embed.learned_positions.weight"] = shared_positions.clone()
    if "lm_head.weight" in state:
        state["lm_head.projection.weight"] = state.pop("lm_head.weight")
    return state


@dataclass(frozen=True)
class LoadedWeights:
    """What `load_weights` did: tensors loaded, the model's tensors the state lacked (they keep
    their initialisation), the state's tensors the model has no place for, and the tensors left
    fresh because they may change shape (a task head for other labels)."""

    loaded: int
    missing: list[str]
    unused: list[str]
    replaced: list[str]


def load_weights(model: Transformer, state: dict[str, torch.Tensor], source: str | Path, *,
                 complete: bool = True, replaceable: tuple[str, ...] = (),
                 hint: str = "") -> LoadedWeights:
    """Load a state dict into `model`, checking every tensor's shape; the one loader every
    weight source goes through (checkpoints, bundles, resume, `init_from`, Hugging Face
    imports).

    Args:
        source: where the state came from (the file), for messages.
        complete: the state must fill the model exactly (a tensor missing or extra is an error
            naming it); else the model's other tensors keep their initialisation.
        replaceable: name prefixes whose tensors may differ in shape and are then left fresh
            (e.g. `head.`: a classifier for another label set).
        hint: how to fix a shape mismatch, appended to its error.
    """
    expected = model.state_dict()
    replaced = []
    for name, tensor in list(state.items()):
        if name in expected and tensor.shape != expected[name].shape:
            if name.startswith(replaceable):
                replaced.append(name)
                del state[name]
                continue
            raise FerryError(f"{source} does not match its config: {name} has shape "
                             f"{list(tensor.shape)}, the config implies "
                             f"{list(expected[name].shape)}{hint}")
    missing, unused = model.load_state_dict(state, strict=False)
    if complete and (missing or unused):
        raise FerryError(
            f"{source} does not match its config: missing {missing[:4]}, "
            f"unexpected {unused[:4]}"
        )
    return LoadedWeights(loaded=len(state) - len(unused), missing=list(missing),
                         unused=list(unused), replaced=replaced)


def load_checkpoint(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Transformer, dict]:
    """Load a checkpoint → (model in eval mode, the whole config.json dict)."""
    data = read_checkpoint_config(directory)
    config = TransformerConfig.from_dict(data["model"])
    weights = Path(directory) / WEIGHTS_FILE
    model = Transformer(config)
    load_weights(model, read_weights(weights, config, map_location), weights)
    return model.to(map_location).eval(), data
