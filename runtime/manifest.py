"""The bundle manifest: one typed, versioned record, validated once when it is read.

`export` builds a `Manifest` and writes `to_dict()` as `manifest.json`; `Bundle.open` reads it
back with `Manifest.from_dict`, which checks every field's presence, type and range — and that
every file name stays inside the bundle — before anything else runs, so a malformed or hostile
manifest is one error naming the field instead of a KeyError deep inside `load`. Declared sizes
are bounded, so no spec can make a backend or the golden check allocate absurd amounts.
Pure Python: the runtime reads it without torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from ferry.errors import FerryError
from ferry.graph_spec import DimRange, GraphSpec, TensorSpec

FORMAT_NAME = "ferry-bundle"
# 2: model options of imported families, `decoder_start` among the special ids, generation
# defaults; version 1 bundles read as before (decoder start = bos, no defaults)
# 3: a decoder-only `decoder_step` takes `step_len` tokens (prefill chunks) and a mask over the
# cached and new positions; earlier decoder-only generation bundles must be re-exported
FORMAT_VERSION = 3
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)
CHUNKED_STEP_VERSION = 3
ARCHITECTURES = ("encoder-decoder", "encoder-only", "decoder-only")
MAX_DIM = 1 << 20  # no declared dimension or range may exceed this (a million positions)
MAX_TENSORS = 4096  # inputs / outputs per graph
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
SHA256 = re.compile(r"[0-9a-f]{64}")
NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # graph, role and precision names (also file stems)


def bundle_relative(name: Any, where: str) -> str:
    """`name` if it is a plain relative path inside a bundle (no `..`, not absolute, no
    backslashes or NUL); else one error naming the manifest field."""
    if not isinstance(name, str) or not name:
        raise _bad(where, "a file name", name)
    path = PurePosixPath(name)
    if (path.is_absolute() or ".." in path.parts or "\\" in name or "\x00" in name
            or name.startswith("~")):
        raise FerryError(f"manifest.json {where} names {name!r}, a path outside the bundle; a "
                         "bundle may only refer to its own files (re-export the bundle)")
    return name


def _chat_template(value: Any) -> dict[str, Any]:
    if value == {}:
        return {}
    if (not isinstance(value, dict) or not isinstance(value.get("template"), str)
            or not isinstance(value.get("special_tokens", {}), dict)
            or not all(isinstance(k, str) and isinstance(v, str)
                       for k, v in value.get("special_tokens", {}).items())):
        raise _bad("chat_template", "{template: a string, special_tokens: {name: string}}",
                   value)
    return {"template": value["template"], "special_tokens": dict(value.get("special_tokens", {}))}


def _bad(where: str, expected: str, got: Any) -> FerryError:
    shown = repr(got) if len(repr(got)) < 80 else repr(got)[:77] + "…"
    return FerryError(f"manifest.json {where} must be {expected}, got {shown}; re-export the "
                      "bundle with `ferry export onnx`")


def _get(data: dict, key: str, kind: type | tuple, where: str, *, optional: bool = False,
         default: Any = None) -> Any:
    path = f"{where}.{key}" if where else key
    if key not in data:
        if optional:
            return default
        raise FerryError(f"manifest.json lacks {path}; re-export the bundle with "
                         "`ferry export onnx`")
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
            or (isinstance(value, float) and not math.isfinite(value))):
        names = " or ".join(k.__name__ for k in kinds)
        raise _bad(path, f"{names}", value)
    return value


def _mapping(data: dict, key: str, value_kind: type | tuple, where: str, *,
             optional: bool = False) -> dict:
    found = _get(data, key, dict, where, optional=optional, default={})
    path = f"{where}.{key}" if where else key
    for name, value in found.items():
        kinds = value_kind if isinstance(value_kind, tuple) else (value_kind,)
        if not isinstance(name, str) or not isinstance(value, kinds) or (
                isinstance(value, bool) and bool not in kinds):
            raise _bad(f"{path}.{name}", " or ".join(
                "null" if k is type(None) else k.__name__ for k in kinds), value)
    return found


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise _bad(where, "names of lowercase letters, digits and _", value)
    return value


def _count(value: Any, where: str, *, minimum: int = 0, maximum: int = MAX_DIM) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise _bad(where, f"an integer in [{minimum}, {maximum}]", value)
    return value


def graph_spec(data: Any, where: str) -> GraphSpec:
    """A graph spec from the manifest, every dim bounded, every named dim declared."""
    if not isinstance(data, dict):
        raise _bad(where, "a graph spec object", data)
    dims = {}
    for name, bounds in _get(data, "dims", dict, where).items():
        if not isinstance(bounds, dict):
            raise _bad(f"{where}.dims.{name}", "{min, opt, max}", bounds)
        low, opt, high = (_count(bounds.get(k), f"{where}.dims.{name}.{k}")
                          for k in ("min", "opt", "max"))
        if not low <= opt <= high:
            raise _bad(f"{where}.dims.{name}", "min ≤ opt ≤ max", bounds)
        dims[name] = DimRange(low, opt, high)

    def tensors(key: str) -> tuple[TensorSpec, ...]:
        items = _get(data, key, list, where)
        if len(items) > MAX_TENSORS:
            raise _bad(f"{where}.{key}", f"at most {MAX_TENSORS} tensors", len(items))
        out = []
        for i, item in enumerate(items):
            at = f"{where}.{key}[{i}]"
            if not isinstance(item, dict):
                raise _bad(at, "a tensor spec object", item)
            name = _get(item, "name", str, at)
            dtype = _get(item, "dtype", str, at)
            if dtype not in DTYPES:
                raise _bad(f"{at}.dtype", f"one of {DTYPES}", dtype)
            shape = _get(item, "shape", list, at)
            for d in shape:
                if isinstance(d, str):  # outputs may name derived dims (total_len = past + 1)
                    if key == "inputs" and d not in dims:
                        raise _bad(f"{at}.shape", f"fixed sizes or dims of {sorted(dims)}", d)
                    _name(d, f"{at}.shape")
                else:
                    _count(d, f"{at}.shape")
            out.append(TensorSpec(name, dtype, tuple(shape)))
        return tuple(out)

    return GraphSpec(name=_get(data, "name", str, where), inputs=tensors("inputs"),
                     outputs=tensors("outputs"), dims=dims)


@dataclass(frozen=True)
class Variant:
    """A precision variant's graphs and how it measured against the fp32 torch reference."""

    graphs: dict[str, str]  # graph name → file
    measured_on: str = ""
    settings: str = ""  # how it was made, where its precision has more than one way (int4's block)
    token_agreement: float = 1.0
    max_abs: dict[str, float] = field(default_factory=dict)
    q99_abs: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"graphs": self.graphs, "measured_on": self.measured_on,
                "settings": self.settings, "token_agreement": self.token_agreement,
                "max_abs": self.max_abs, "q99_abs": self.q99_abs}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Variant:
        if not isinstance(data, dict):
            raise _bad(where, "a variant object", data)
        graphs = _mapping(data, "graphs", str, where)
        for name, file in graphs.items():
            bundle_relative(file, f"{where}.graphs.{name}")
        return cls(graphs=graphs,
                   measured_on=_get(data, "measured_on", str, where, optional=True, default=""),
                   settings=_get(data, "settings", str, where, optional=True, default=""),
                   token_agreement=float(_get(data, "token_agreement", (int, float), where,
                                              optional=True, default=1.0)),
                   max_abs=_mapping(data, "max_abs", (int, float), where, optional=True),
                   q99_abs=_mapping(data, "q99_abs", (int, float), where, optional=True))


@dataclass(frozen=True)
class Manifest:
    """Everything `manifest.json` says about a bundle.

    model: the model config (`TransformerConfig.to_dict()`); special_ids: role → token id;
    task: kind, labels, pairs, lm, prompt; generation: default generation arguments;
    graphs: name → I/O spec; roles: role (a graph, tokenizer, weights, golden) → file;
    variants: precision → `Variant`; files: file → sha256.
    """

    format_version: int
    architecture: str
    model: dict[str, Any]
    special_ids: dict[str, int | None]
    graphs: dict[str, GraphSpec]
    roles: dict[str, str]
    files: dict[str, str]
    task: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, Variant] = field(default_factory=dict)
    precision: str = "fp32"
    opset: int = 18
    producer: dict[str, str] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    source_checkpoint: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    # the tokenizer's chat template: {"template": Jinja source, "special_tokens": {name: str}}
    chat_template: dict[str, Any] = field(default_factory=dict)

    @property
    def imported_from(self) -> dict | None:
        """The Hugging Face checkpoint the model was imported from, if any."""
        return self.source_checkpoint.get("imported_from")

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME, "format_version": self.format_version,
            "architecture": self.architecture, "model": self.model,
            "special_ids": self.special_ids, "task": self.task, "generation": self.generation,
            "graphs": {name: spec.to_dict() for name, spec in self.graphs.items()},
            "roles": self.roles, "precision": self.precision,
            "variants": {name: v.to_dict() for name, v in self.variants.items()},
            "opset": self.opset, "producer": self.producer, "validation": self.validation,
            "source_checkpoint": self.source_checkpoint, "created": self.created,
            **({"chat_template": self.chat_template} if self.chat_template else {}),
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Validate a parsed `manifest.json`; the first problem is one FerryError naming its
        field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise FerryError(f"manifest.json is not a {FORMAT_NAME} manifest")
        version = data.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS or isinstance(version, bool):
            raise FerryError(f"the bundle has format version {version!r}; this ferry reads "
                             f"versions {list(SUPPORTED_FORMAT_VERSIONS)}: re-export it or "
                             "upgrade ferry")
        architecture = _get(data, "architecture", str, "")
        if architecture not in ARCHITECTURES:
            raise _bad("architecture", f"one of {ARCHITECTURES}", architecture)
        if (architecture == "decoder-only" and version < CHUNKED_STEP_VERSION
                and "decoder_step" in (data.get("graphs") or {})):
            raise FerryError(f"this decoder-only bundle has format version {version}, whose "
                             "decoder_step takes one token at a time; this ferry prefills "
                             "prompts in chunks: re-export it (ferry export onnx CHECKPOINT "
                             "--out DIR)")
        model = _get(data, "model", dict, "")
        for key in ("vocab_size", "max_positions", "d_model", "num_heads"):
            _count(model.get(key), f"model.{key}", minimum=1)
        for key in ("num_encoder_layers", "num_decoder_layers", "type_vocab_size"):
            _count(model.get(key, 0), f"model.{key}")
        if model.get("architecture", architecture) != architecture:
            raise _bad("model.architecture", f"the bundle's {architecture!r}",
                       model.get("architecture"))
        special = _mapping(data, "special_ids", (int, type(None)), "")
        for role in ("pad", "eos"):
            if not isinstance(special.get(role), int):
                raise _bad(f"special_ids.{role}", "a token id", special.get(role))
        if special.get("decoder_start") is None and not isinstance(special.get("bos"), int):
            raise _bad("special_ids.bos", "a token id (or special_ids.decoder_start)",
                       special.get("bos"))
        for role, token in special.items():
            if token is not None and not 0 <= token < model["vocab_size"]:
                raise _bad(f"special_ids.{role}", f"an id below the vocabulary size "
                           f"{model['vocab_size']}", token)
        graphs = {_name(name, "graphs"): graph_spec(spec, f"graphs.{name}")
                  for name, spec in _get(data, "graphs", dict, "").items()}
        if not graphs:
            raise _bad("graphs", "at least one graph", {})
        roles = _mapping(data, "roles", str, "")
        for role, file in roles.items():
            bundle_relative(file, f"roles.{role}")
        missing = sorted(set(graphs) - set(roles))
        if missing:
            raise _bad("roles", f"a file for every graph (missing {missing})", roles)
        files = _mapping(data, "files", str, "")
        for name, digest in files.items():
            bundle_relative(name, f"files[{name!r}]")
            if not SHA256.fullmatch(digest):
                raise _bad(f"files[{name!r}]", "a sha256 hex digest", digest)
        variants = {_name(name, "variants"): Variant.from_dict(v, f"variants.{name}")
                    for name, v in _get(data, "variants", dict, "", optional=True,
                                        default={}).items()}
        task = _get(data, "task", dict, "", optional=True, default={})
        if not isinstance(task.get("labels", []), list) or not all(
                isinstance(label, str) for label in task.get("labels", [])):
            raise _bad("task.labels", "a list of strings", task.get("labels"))
        return cls(
            format_version=version, architecture=architecture, model=model,
            special_ids=special, graphs=graphs, roles=roles, files=files, task=task,
            generation=_get(data, "generation", dict, "", optional=True, default={}),
            variants=variants,
            precision=_get(data, "precision", str, "", optional=True, default="fp32"),
            opset=_count(data.get("opset", 18), "opset", minimum=1, maximum=1000),
            producer=_mapping(data, "producer", str, "", optional=True),
            validation=_get(data, "validation", dict, "", optional=True, default={}),
            source_checkpoint=_get(data, "source_checkpoint", dict, "", optional=True,
                                   default={}),
            created=_get(data, "created", str, "", optional=True, default=""),
            chat_template=_chat_template(data.get("chat_template", {})),
        )

    def describe(self) -> list[str]:
        """Human-readable lines for `ferry inspect`: model, options, task, origin, defaults,
        producers and the variants' measurements."""
        model = self.model
        layers = {"encoder-decoder": f"{model['num_encoder_layers']}+"
                                     f"{model['num_decoder_layers']}",
                  "encoder-only": str(model["num_encoder_layers"]),
                  "decoder-only": str(model["num_decoder_layers"])}[self.architecture]
        lines = [f"model: {self.architecture}, d_model {model['d_model']}, "
                 f"{model['num_heads']} heads, {layers} layers, FFN {model.get('d_ff')}, vocab "
                 f"{model['vocab_size']}, {model['max_positions']} positions"]
        options = {k: model[k] for k in ("positional", "norm_placement", "activation",
                                          "embedding_scale", "embedding_norm",
                                          "lm_head_transform") if k in model}
        lines.append("options: " + ", ".join(f"{k} {v}" for k, v in options.items()))
        if self.task:
            task = self.task
            labels = f", labels {task['labels']}" if task.get("labels") else ""
            prompt = (f", prompt {task['prompt'].get('template')!r}"
                      if isinstance(task.get("prompt"), dict) else "")
            pairs = " (sentence pairs)" if task.get("pairs") else ""
            lines.append(f"task: {task.get('kind')}{labels}{pairs}{prompt}")
        source = self.imported_from
        if isinstance(source, dict):
            lines.append(f"imported from: Hugging Face {source.get('family')} "
                         f"({source.get('model_class')}, {source.get('dtype')})")
        if self.generation:
            lines.append("generation defaults: " + ", ".join(
                f"{k}={v}" for k, v in self.generation.items()))
        lines.append("producer: " + ", ".join(f"{k} {v}" for k, v in self.producer.items()))
        for precision, variant in self.variants.items():
            worst = max(variant.q99_abs.values(), default=None)
            spread = f", worst 99th percentile |Δ| {worst:.1e}" if worst is not None else ""
            where = f" (measured on {variant.measured_on})" if variant.measured_on else ""
            lines.append(f"variant {precision}: greedy tokens agree with fp32 torch on "
                         f"{variant.token_agreement:.1%} of the golden inputs{spread}{where}")
        return lines
