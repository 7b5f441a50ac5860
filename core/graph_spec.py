"""The one declaration of every exported graph's inputs and outputs.

A graph spec names each tensor, its dtype and its shape, where a dimension is either a fixed size
or a symbolic name (`batch`, `src_len`, …) with a min/opt/max range. The exporter reads the spec to
name ONNX inputs/outputs and mark dynamic dims, the manifest stores it, the runtime backends check
every feed against it, and TensorRT profiles are derived from its ranges. Pure Python: imported by
the runtime without torch.

Encoder-decoder graphs (generation stays in host code; no control flow inside graphs):

- `encoder`: source ids + mask → encoder states and, per decoder layer, cross-attention K/V.
- `decoder_init`: the first decoder call (no past): target prefix → logits + self-attention K/V.
- `decoder_step`: one new token + self-attention past → logits + the grown self-attention K/V
  (`total_len` = `past_len` + 1).

Two decoder graphs instead of one with an empty past: a zero-length past dimension is not always
expressible in TensorRT optimisation profiles.

Decoder-only language models generate with the same two-graph scheme, without cross-attention:

- `decoder_init`: the (left-padded) prompt + its mask → logits + self-attention K/V;
- `decoder_step`: `step_len` new tokens (one while decoding; a chunk of a long prompt while
  prefilling, so no (prompt × prompt) score matrix is ever formed), the mask over the cached and
  the new positions (`total_len` = `past_len` + `step_len`) and the past → the last position's
  logits + the grown K/V.

Encoder-only graphs, and decoder-only task heads, are single passes over the whole input:

- `lm`: ids + mask (+ segment ids) → vocabulary logits at every position (masked-LM or next-token
  scores: prompt scoring, fill-in).
- `head`: ids + mask (+ segment ids) → the task head's logits (classes, per-token classes, or
  answer start/end).

A model with segment recurrence (XLNet's `memory_length`) reads one segment per call: both graphs
also take the `memory` of earlier segments (every layer's states, and their mask; one masked
slot for a first segment) and return the next (`next_memory`, at most `memory_length` long), so
the runtime reads an input longer than one segment segment by segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial

from ferry.errors import FerryError

Dim = int | str  # a fixed size, or the name of a symbolic dimension


@dataclass(frozen=True)
class DimRange:
    """Sizes a symbolic dimension may take: `opt` is what engines are tuned for."""

    min: int
    opt: int
    max: int

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape of fixed sizes / symbolic names."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> TensorSpec:
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    """A graph's I/O: inputs and outputs in call order, and the ranges of its symbolic dims."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, DimRange] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        raise KeyError(name)

    def profile_shapes(self, dynamic_only: bool = False
                       ) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Per input, its (min, opt, max) shapes from the dim ranges (fixed dims the same in all
        three): a TensorRT optimisation profile. `dynamic_only`: only the inputs with a symbolic
        dim (static inputs need no profile)."""
        profile = {}
        for tensor in self.inputs:
            if dynamic_only and all(isinstance(d, int) for d in tensor.shape):
                continue
            profile[tensor.name] = tuple(
                tuple(d if isinstance(d, int) else getattr(self.dims[d], bound)
                      for d in tensor.shape)
                for bound in ("min", "opt", "max"))
        return profile

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "dims": {name: r.to_dict() for name, r in self.dims.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> GraphSpec:
        try:
            return cls(
                name=data["name"],
                inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
                dims={k: DimRange(**v) for k, v in data.get("dims", {}).items()},
            )
        except (KeyError, TypeError) as exc:
            raise FerryError(
                f"graph spec {data.get('name', '?')!r} in the manifest is malformed ({exc}); "
                "re-export the bundle with `ferry export onnx`"
            ) from exc


PROBE_PREFIX = "probe."  # the named hidden states of `ferry.model.probes`
_PROBE = re.compile(r"probe\.(encoder|decoder)\.(embeddings|final_norm"
                    r"|layer_\d+\.(attention|self_attention|cross_attention|ffn))")
ATTENTION_PREFIX = "attention."  # the attention probabilities of `ferry.model.probes`
_ATTENTION = re.compile(r"attention\.(encoder|decoder)\.layer_\d+\."
                        r"(attention|self_attention|cross_attention)")


def is_probe(name: str) -> bool:
    """Whether an ONNX value name is a probe (not, e.g., a quantizer's `probe…_scale`)."""
    return _PROBE.fullmatch(name) is not None


def is_attention_map(name: str) -> bool:
    """Whether an ONNX value name is a layer's attention probabilities."""
    return _ATTENTION.fullmatch(name) is not None


def with_probes(spec: GraphSpec, names: list[str], *, width: int, heads: int) -> GraphSpec:
    """`spec` with the probes `names` (`ferry.model.probes`) as extra float32 outputs after its
    own, where (batch, T) are `input_ids`'s dims: hidden states (batch, T, width), attention
    probabilities (batch, heads, T, key_len)."""
    batch, length = spec.input("input_ids").shape
    probes = tuple(
        TensorSpec(name, "float32", (batch, heads, length, "key_len")
                   if is_attention_map(name) else (batch, length, width))
        for name in names)
    return GraphSpec(spec.name, spec.inputs, spec.outputs + probes, spec.dims)


def segment_count(model_config: dict) -> int:
    """Distinct segment ids a model's `token_type_ids` carry (0: it reads none): its segment
    embeddings, or two for relative_xl's relative segments (same / different)."""
    if model_config.get("positional") == "relative_xl":
        return 2
    return model_config.get("type_vocab_size", 0)


def layer_names(prefix: str, num_layers: int) -> list[str]:
    """`prefix_key_0, prefix_value_0, prefix_key_1, …`: the per-layer K/V tensor names."""
    return [f"{prefix}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


# Input dims that are sums of others: the exporter traces them at that size and lets
# torch.export derive them (a step's mask covers the cached and the new positions; a part a graph
# lacks is one position: an encoder-decoder step's one new token).
DERIVED_DIMS: dict[str, tuple[str, ...]] = {"total_len": ("past_len", "step_len")}


def dim_ranges(max_positions: int, max_batch: int = 256) -> dict[str, DimRange]:
    """The ranges of every symbolic dim a graph may use (`opt`: what engines are tuned for)."""
    def length(opt: int, longest: int = max_positions) -> DimRange:
        return DimRange(1, min(opt, longest), longest)

    return {"batch": DimRange(1, min(8, max_batch), max_batch), "src_len": length(64),
            "tgt_len": length(16), "past_len": length(32, max_positions - 1),
            "prompt_len": length(32), "seq_len": length(64)}


def kv_tensors(prefix: str, length: str, *, num_layers: int, num_heads: int, head_dim: int
               ) -> list[TensorSpec]:
    """One (batch, heads, length, head_dim) key and value per layer: `prefix_key_i`, …"""
    return [TensorSpec(name, "float32", ("batch", num_heads, length, head_dim))
            for name in layer_names(prefix, num_layers)]


def encoder_decoder_specs(
    *,
    num_decoder_layers: int,
    num_heads: int,
    head_dim: int,
    d_model: int,
    vocab_size: int,
    max_positions: int,
    max_batch: int = 256,
) -> dict[str, GraphSpec]:
    """The three graphs of an encoder-decoder model, keyed by graph name."""
    dims = dim_ranges(max_positions, max_batch)
    kv = partial(kv_tensors, num_layers=num_decoder_layers, num_heads=num_heads,
                 head_dim=head_dim)  # kv(prefix, length)

    ids = TensorSpec("input_ids", "int64", ("batch", "src_len"))
    source_mask = TensorSpec("attention_mask", "int64", ("batch", "src_len"))
    encoder_mask = TensorSpec("encoder_attention_mask", "int64", ("batch", "src_len"))
    encoder = GraphSpec(
        name="encoder",
        inputs=(ids, source_mask),
        outputs=(
            TensorSpec("encoder_hidden_states", "float32", ("batch", "src_len", d_model)),
            *kv("cross", "src_len"),
        ),
        dims={k: dims[k] for k in ("batch", "src_len")},
    )
    decoder_init = GraphSpec(
        name="decoder_init",
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "tgt_len")),
            encoder_mask,
            *kv("cross", "src_len"),
        ),
        outputs=(
            TensorSpec("logits", "float32", ("batch", "tgt_len", vocab_size)),
            *kv("present", "tgt_len"),
        ),
        dims={k: dims[k] for k in ("batch", "src_len", "tgt_len")},
    )
    decoder_step = GraphSpec(
        name="decoder_step",
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", 1)),
            # over the cached and the new position: rows that joined a running batch later
            # are left-padded, their positions numbered by this mask
            TensorSpec("attention_mask", "int64", ("batch", "total_len")),
            encoder_mask,
            *kv("cross", "src_len"),
            *kv("past", "past_len"),
        ),
        outputs=(
            TensorSpec("logits", "float32", ("batch", 1, vocab_size)),
            *kv("present", "total_len"),
        ),
        dims={**{k: dims[k] for k in ("batch", "src_len", "past_len")},
              "total_len": DimRange(2, dims["past_len"].opt + 1, max_positions)},
    )
    return {g.name: g for g in (encoder, decoder_init, decoder_step)}


def static_cache_step_spec(step: GraphSpec) -> GraphSpec:
    """`decoder_step` over a static KV cache (the fused variant): each
    `past_*` input and its `present_*` output are one (batch, heads, cache_len, head_dim) buffer
    that the graph writes in place, and `cache_position` ((1,) int64, the positions already
    cached) takes the place of the cache's own length."""
    def in_buffer(tensor: TensorSpec) -> TensorSpec:
        shape = tuple("cache_len" if d in ("past_len", "total_len") else d for d in tensor.shape)
        return TensorSpec(tensor.name, tensor.dtype, shape)

    past = step.dims["past_len"]
    dims = {name: r for name, r in step.dims.items() if name not in ("past_len", "total_len")}
    dims["cache_len"] = DimRange(2, min(64, past.max + 1), past.max + 1)
    return GraphSpec(
        name=step.name,
        inputs=(*map(in_buffer, step.inputs), TensorSpec("cache_position", "int64", (1,))),
        outputs=tuple(map(in_buffer, step.outputs)),
        dims=dims,
    )


# What each task head outputs: (name, shape) with "labels" standing for num_labels.
HEAD_OUTPUTS: dict[str, tuple[tuple[str, tuple[Dim, ...]], ...]] = {
    "sequence_classification": (("logits", ("batch", "labels")),),
    "token_classification": (("logits", ("batch", "seq_len", "labels")),),
    "question_answering": (("start_logits", ("batch", "seq_len")),
                           ("end_logits", ("batch", "seq_len"))),
}


def single_pass_specs(
    *,
    vocab_size: int,
    max_positions: int,
    segments: bool,
    task_head: str,
    num_labels: int,
    lm: bool,
    memory: MemoryShape | None = None,
    max_batch: int = 256,
) -> dict[str, GraphSpec]:
    """The graphs of an encoder-only / decoder-only model: `lm` (when asked) and `head` (when
    the model has a task head), keyed by graph name; with `memory`, each reads and returns the
    memory of a segment-recurrent model."""
    dims = {k: v for k, v in dim_ranges(max_positions, max_batch).items()
            if k in ("batch", "seq_len")}
    inputs = (TensorSpec("input_ids", "int64", ("batch", "seq_len")),
              TensorSpec("attention_mask", "int64", ("batch", "seq_len")))
    if segments:
        inputs += (TensorSpec("token_type_ids", "int64", ("batch", "seq_len")),)
    recurrence: tuple[TensorSpec, ...] = ()
    if memory is not None:
        inputs += memory.tensors("memory", "mem_len")
        recurrence = memory.tensors("next_memory", "next_mem_len")
        dims["mem_len"] = DimRange(1, min(64, memory.length), memory.length)
    specs = []
    if lm:
        logits = TensorSpec("logits", "float32", ("batch", "seq_len", vocab_size))
        specs.append(GraphSpec(name="lm", inputs=inputs, outputs=(logits, *recurrence),
                               dims=dims))
    if task_head != "none":
        outputs = tuple(
            TensorSpec(name, "float32", tuple(num_labels if d == "labels" else d for d in shape))
            for name, shape in HEAD_OUTPUTS[task_head])
        specs.append(GraphSpec(name="head", inputs=inputs, outputs=outputs + recurrence,
                               dims=dims))
    return {g.name: g for g in specs}


@dataclass(frozen=True)
class MemoryShape:
    """A segment-recurrent model's memory: `layers` × (batch, length ≤ `length`, `width`)."""

    layers: int
    width: int
    length: int

    def tensors(self, prefix: str, length: str) -> tuple[TensorSpec, TensorSpec]:
        """`prefix` (layers, batch, length, width) float32 states and `prefix_mask`
        (batch, length) int64."""
        return (TensorSpec(prefix, "float32", (self.layers, "batch", length, self.width)),
                TensorSpec(f"{prefix}_mask", "int64", ("batch", length)))


MEMORY_INPUTS = ("memory", "memory_mask")  # fed by the runtime, not by callers


def decoder_only_specs(
    *,
    num_layers: int,
    num_heads: int,
    head_dim: int,
    vocab_size: int,
    max_positions: int,
    max_batch: int = 256,
) -> dict[str, GraphSpec]:
    """The generation graphs of a decoder-only model (`decoder_init`, `decoder_step`)."""
    dims = dim_ranges(max_positions, max_batch)
    kv = partial(kv_tensors, num_layers=num_layers, num_heads=num_heads,
                 head_dim=head_dim)  # kv(prefix, length)

    decoder_init = GraphSpec(
        name="decoder_init",
        inputs=(TensorSpec("input_ids", "int64", ("batch", "prompt_len")),
                TensorSpec("attention_mask", "int64", ("batch", "prompt_len"))),
        outputs=(TensorSpec("logits", "float32", ("batch", "prompt_len", vocab_size)),
                 *kv("present", "prompt_len")),
        dims={k: dims[k] for k in ("batch", "prompt_len")},
    )
    decoder_step = GraphSpec(
        name="decoder_step",
        inputs=(TensorSpec("input_ids", "int64", ("batch", "step_len")),
                TensorSpec("attention_mask", "int64", ("batch", "total_len")),
                *kv("past", "past_len")),
        outputs=(TensorSpec("logits", "float32", ("batch", 1, vocab_size)),
                 *kv("present", "total_len")),
        dims={**{k: dims[k] for k in ("batch", "past_len")},
              "step_len": DimRange(1, 1, max_positions - 1),
              "total_len": DimRange(2, dims["past_len"].opt + 1, max_positions)},
    )
    return {g.name: g for g in (decoder_init, decoder_step)}
