"""Hugging Face checkpoints ↔ ferry models: the one reader (and writer) of every family's table.

Reading (`read_hf_model`): `config.json` → the family (by `model_type`) and its head (by
`architectures`) → a `TransformerConfig`; then every tensor of the ferry model is looked up in the
checkpoint through the table (`ferry.model.families`), transposed / split / reshaped as the table
says, and checked. A tensor the table expects but the checkpoint lacks, one the checkpoint has but
nothing reads, and one of the wrong shape are each refused by name. Weights are read from
`model.safetensors`, a sharded set with its `model.safetensors.index.json`, or `pytorch_model.bin`
(through `torch.load(weights_only=True)`: nothing is unpickled); they come out as fp32.

Writing (`hf_tensors`, `hf_config`): the same tables backwards, for `ferry export hf`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from ferry.errors import FerryError
from ferry.model.config import TransformerConfig
from ferry.model.families import Family, Head, family
from ferry.model.transformer import Transformer

HF_CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class HFModel:
    """A Hugging Face checkpoint read into ferry's terms.

    config: ferry's model config; state: ferry's fp32 state dict; hf_config: the `config.json`
    (with the family's defaults filled in); hf_class: the model class it was saved from.
    """

    family: Family
    hf_class: str
    head: Head
    hf_config: dict[str, Any]
    config: TransformerConfig
    state: dict[str, torch.Tensor]
    source_dtype: str


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a Hugging Face model directory."""
    path = Path(directory) / HF_CONFIG_FILE
    if not path.is_file():
        raise FerryError(f"{directory} has no {HF_CONFIG_FILE}; expected a Hugging Face model "
                         "directory (config.json, model.safetensors, tokenizer files)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FerryError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise FerryError(f"{path} is not a JSON object; expected a Hugging Face model config")
    return data


def is_hf_directory(directory: str | Path) -> bool:
    """Whether `directory` looks like a Hugging Face model (a config.json with a model_type)."""
    try:
        return "model_type" in read_hf_config(directory)
    except FerryError:
        return False


def model_class(hf: dict[str, Any], fam: Family) -> str:
    """The model class a `config.json` was saved from (`architectures`), else the base class."""
    classes = hf.get("architectures") or [fam.base_class]
    if not isinstance(classes, list) or len(classes) != 1 or not isinstance(classes[0], str):
        raise FerryError(f"config.json architectures={classes!r}: expected one model class")
    return classes[0]


def ferry_config(fam: Family, hf: dict[str, Any], head: Head) -> TransformerConfig:
    """The family's table applied to a `config.json`: ferry's config, or one error naming the
    field that ferry cannot express."""
    for name, allowed in fam.requires.items():
        if hf.get(name) not in allowed:
            raise FerryError(f"{fam.model_type} config {name}={hf.get(name)!r} cannot be "
                             f"expressed in ferry (supported: {list(allowed)})")
    missing = sorted(theirs for theirs in fam.config_fields.values() if theirs not in hf)
    if missing:
        raise FerryError(f"config.json lacks {missing}, which a {fam.model_type} config needs")
    fields = {ours: hf[theirs] for ours, theirs in fam.config_fields.items()}
    fields.update({**fam.fixed, **fam.derived(hf), **head.config})
    if fields.get("task_head") in ("sequence_classification", "token_classification"):
        fields.setdefault("num_labels", len(hf.get("id2label") or {}) or 2)
    return TransformerConfig.from_dict(fields)


class CheckpointWeights:
    """The tensors of a checkpoint directory by name, read on demand.

    Args:
        directory: holds `model.safetensors`, or shards listed in `model.safetensors.index.json`,
            or `pytorch_model.bin` (or its sharded index).
    """

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.directory = directory
        self.files: dict[str, Path] = {}  # tensor name → file
        self._torch_files: dict[Path, dict[str, torch.Tensor]] = {}  # loaded .bin files
        for single, index, kind in (("model.safetensors", "model.safetensors.index.json", "st"),
                                    ("pytorch_model.bin", "pytorch_model.bin.index.json", "pt")):
            if (directory / index).is_file():
                self._read_index(directory / index)
            elif (directory / single).is_file():
                self.files.update({name: directory / single
                                   for name in self._names(directory / single, kind)})
            else:
                continue
            break
        else:
            raise FerryError(f"{directory} has no weights: expected model.safetensors, "
                             "model.safetensors.index.json (shards) or pytorch_model.bin")

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise FerryError(f"{index} is not a shard index with a weight_map ({exc})") from exc
        if not isinstance(weight_map, dict):
            raise FerryError(f"{index}: weight_map must map tensor names to shard files")
        for shard in set(weight_map.values()):
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in (
                    "", ".", ".."):
                raise FerryError(f"{index} names the shard {shard!r}; shards must be plain file "
                                 "names in the model directory")
        shards = {name: self.directory / shard for name, shard in weight_map.items()}
        absent = sorted({p.name for p in shards.values() if not p.is_file()})
        if absent:
            raise FerryError(f"{index} lists shard(s) {absent} that are missing from "
                             f"{self.directory}; download every shard")
        self.files = shards

    def _names(self, path: Path, kind: str) -> list[str]:
        if kind == "pt":
            return list(self._torch(path))
        try:
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as exc:
            raise FerryError(f"{path} is not a readable safetensors file ({exc})") from exc

    def _torch(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._torch_files:
            try:
                self._torch_files[path] = torch.load(path, map_location="cpu", mmap=True,
                                                     weights_only=True)
            except Exception as exc:  # torch raises many types for a bad or unsafe file
                raise FerryError(f"{path} is not a readable weights-only PyTorch file "
                                 f"({exc})".splitlines()[0]) from exc
        return self._torch_files[path]

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path.suffix == ".bin":
            return self._torch(path)[name]
        try:
            with safe_open(str(path), "pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise FerryError(f"{path} is not a readable safetensors file ({exc})") from exc


def _pattern(name: str) -> re.Pattern:
    """A table name with `{i}` (a layer index) as a regex over full tensor names."""
    return re.compile(re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)"))


def _match(module: str, key: str) -> tuple[str, str] | None:
    """(layer index or "", suffix) when `key` is `module` itself or a tensor of it."""
    found = _pattern(module).fullmatch(key) or re.fullmatch(
        _pattern(module).pattern + r"\.(?P<suffix>weight|bias)", key)
    if found is None:
        return None
    groups = found.groupdict()
    return groups.get("i") or "", groups.get("suffix") or ""


def _name(module: str, layer: str, suffix: str) -> str:
    name = module.replace("{i}", layer)
    return f"{name}.{suffix}" if suffix else name


class _Source(NamedTuple):
    """Where a ferry tensor lives in a checkpoint."""

    names: list[str]  # HF names to try, the canonical first (then tied aliases)
    part: int | None  # the slice of a fused tensor (GPT-2's c_attn), or None
    parts: int  # slices of that fused tensor
    module: str  # the HF module pattern (`h.{i}.attn.c_attn`)
    suffix: str  # weight / bias, or "" for a bare tensor


class _Table:
    """A family's table for one model class, resolved for ferry's tensor names."""

    def __init__(self, fam: Family, head: Head, config: TransformerConfig) -> None:
        self.family = fam
        self.entries = [*fam.tensors, *fam.config_tensors(config.to_dict()), *head.tensors]

    def lookup(self, key: str) -> _Source | None:
        """Where ferry's tensor `key` lives, or None when the table does not say."""
        for ours, *theirs in self.entries:
            matched = _match(ours, key)
            if matched:
                layer, suffix = matched
                return _Source([_name(t, layer, suffix) for t in theirs], None, 1, theirs[0],
                               suffix)
        for fused, parts in self.family.fused.items():
            for index, part in enumerate(parts):
                matched = _match(part, key)
                if matched:
                    layer, suffix = matched
                    return _Source([_name(fused, layer, suffix)], index, len(parts), fused,
                                   suffix)
        return None

    def transposed(self, module: str, suffix: str) -> bool:
        return suffix in ("weight", "") and module in self.family.transposed

    def head_split(self, module: str) -> bool:
        return module in self.family.head_split


def _without_prefix(names: list[str], prefix: str) -> dict[str, str]:
    """Body-relative name → name in the file (task classes prefix the body with `prefix.`)."""
    return {n[len(prefix) + 1:] if n.startswith(prefix + ".") else n: n for n in names}


def read_hf_model(directory: str | Path) -> HFModel:
    """Read a Hugging Face model directory into ferry's config and fp32 weights."""
    raw = read_hf_config(directory)
    fam = family(raw.get("model_type"))
    hf = {**fam.hf_defaults, **raw}
    hf_class = model_class(hf, fam)
    head = fam.head(hf_class)
    config = ferry_config(fam, hf, head)
    weights = CheckpointWeights(directory)
    available = _without_prefix(weights.names(), fam.body_prefix)
    table = _Table(fam, head, config)
    with torch.device("meta"):  # names and shapes only: nothing is allocated
        expected = Transformer(config).state_dict()
    state, used, dtypes = {}, set(), set()
    for key, target in expected.items():
        source = table.lookup(key)
        if source is None:
            raise FerryError(f"the {fam.model_type} table has no entry for ferry's {key}")
        present = [n for n in source.names if n in available]
        if not present:
            if key in fam.zero_when_absent:
                state[key] = torch.zeros(target.shape)
                continue
            raise FerryError(f"{directory} lacks the tensor {source.names[0]} (ferry's {key}) "
                             f"that a {hf_class} has; the checkpoint is incomplete")
        used.update(present)
        tensor = weights.get(available[present[0]])
        dtypes.add(str(tensor.dtype).removeprefix("torch."))
        if table.head_split(source.module) and tensor.dim() == 3:
            tensor = tensor.reshape(tensor.shape[0], -1)  # (D, nh, hs) → (D, nh·hs)
        if table.transposed(source.module, source.suffix):
            tensor = tensor.t()
        if source.part is not None:
            tensor = tensor.chunk(source.parts, dim=0)[source.part]
        if present[0] in fam.unsqueezed and tensor.numel() == target.numel():
            tensor = tensor.reshape(target.shape)
        if tensor.shape != target.shape:
            raise FerryError(f"{directory}: {present[0]} has shape {list(tensor.shape)} but "
                             f"config.json implies {list(target.shape)} (ferry's {key})")
        state[key] = tensor.to(torch.float32).contiguous()
    optional = [_pattern(name) for name in fam.optional]
    extra = sorted(n for n in available if n not in used
                   and not any(p.fullmatch(n) for p in optional))
    if extra:
        raise FerryError(f"{directory} has tensors a {hf_class} does not: {extra[:5]}"
                         f"{' …' if len(extra) > 5 else ''}; is config.json's architectures "
                         "right?")
    return HFModel(family=fam, hf_class=hf_class, head=head, hf_config=hf, config=config,
                   state=state, source_dtype=",".join(sorted(dtypes)))


def hf_tensors(model: Transformer, fam: Family, hf_class: str) -> dict[str, torch.Tensor]:
    """ferry's weights under the names (and layouts) of `hf_class`'s checkpoints. Tensors of
    a head the class does not hold (the MLM head of a BERT fine-tuned to classify) stay out."""
    head = fam.head(hf_class)
    table = _Table(fam, head, model.config)
    other_heads = [_Table(fam, h, model.config) for h in fam.heads.values()]
    body = {n for entry in [*fam.tensors, *fam.config_tensors(model.config.to_dict())]
            for n in entry[1:]} | set(fam.fused)
    prefix = "" if hf_class == fam.base_class or not fam.body_prefix else fam.body_prefix + "."
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, tuple[str, str, list]] = {}  # HF name → (module, suffix, parts)
    for key, tensor in model.state_dict().items():
        source = table.lookup(key)
        if source is None and any(t.lookup(key) for t in other_heads):
            continue
        if source is None:
            raise FerryError(f"the {fam.model_type} table has no entry for ferry's {key}")
        name = (prefix if source.module in body else "") + source.names[0]
        tensor = tensor.detach().cpu().contiguous()
        if source.part is not None:
            pieces = fused.setdefault(name, (source.module, source.suffix, [None] * source.parts))
            pieces[2][source.part] = tensor
            continue
        if table.transposed(source.module, source.suffix):
            tensor = tensor.t().contiguous()
        if table.head_split(source.module):
            tensor = tensor.reshape(tensor.shape[0], model.config.num_heads, -1)  # (D, nh, hs)
        if source.names[0] in fam.unsqueezed:
            tensor = tensor[None]
        out[name] = tensor
    for name, (module, suffix, pieces) in fused.items():
        tensor = torch.cat(pieces, dim=0)
        out[name] = tensor.t().contiguous() if table.transposed(module, suffix) else tensor
    for name, shape in fam.zeros_for_hf(model.config.to_dict()).items():
        out[(prefix if name in body else "") + name] = torch.zeros(shape)
    return out


def hf_config(config: TransformerConfig, fam: Family, hf_class: str) -> dict[str, Any]:
    """The `config.json` fields that describe `config` as a `hf_class` of the family (special
    token ids, labels and generation settings are the caller's to add)."""
    ours = config.to_dict()
    data = {"model_type": fam.model_type, "architectures": [hf_class]}
    data.update({theirs: ours[name] for name, theirs in fam.config_fields.items()})
    data.update(fam.hf_config(ours))
    return data
