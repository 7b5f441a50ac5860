"""Variants of a bundle's graphs: reduced precision, or ONNX Runtime's fused kernels.

- `int8`: dynamic quantisation for CPUs (onnxruntime.quantization): MatMul/Gemm weights stored as
  int8 with per-tensor scales, activations quantised on the fly; everything else stays fp32.
- `int4`: weight-only block-wise 4-bit quantisation for CPU decoding (`MatMulNBits`).
  Both quantise the `fused` graphs (ONNX Runtime-only, like them), so they keep its attention
  kernels and in-place decoder cache.
- `fp16`, `bf16`: 16-bit graphs for GPUs and TensorRT (`half_precision`): I/O fp32, norms,
  softmax and reductions fp32, the rest 16-bit.
- `fused`: fp32 graphs for ONNX Runtime only (`fused_graphs`): each attention one contrib node
  (the decoder step writing a static cache in place), residual + LayerNorm as
  `SkipLayerNormalization`.

`fp16` and `bf16` rewrite the fp32 ONNX graph; `fused` is exported again from the model.

The exporter measures each variant against the fp32 torch reference on the golden inputs and
records the figures in the manifest; a variant that ONNX Runtime's CPU provider cannot run
(bf16) is measured through its CPU emulation.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from ferry.errors import FerryError
from ferry.export import half_precision
from ferry.export.fused_graphs import export_fused
from ferry.export.onnx_export import external_data_file, quiet_loggers
from ferry.graph_spec import GraphSpec


@dataclass(frozen=True)
class GraphSource:
    """What a variant graph is made from: the fp32 ONNX graph and the model it came from."""

    onnx: Path
    module: torch.nn.Module  # the `ferry.model.graphs` wrapper exported to `onnx`
    spec: GraphSpec
    opset: int


def _rewriting(rewrite: Callable[[Path, Path], None]) -> Callable[[GraphSource, Path], None]:
    """A variant maker from an ONNX-to-ONNX rewrite (fp32 graph path, variant path)."""
    return lambda source, target: rewrite(source.onnx, target)


def _exported_fused(source: GraphSource, target: Path) -> None:
    export_fused(source.module, source.spec, target, opset=source.opset)


def _quantized_fused(quantize: Callable[[Path, Path], None]
                     ) -> Callable[[GraphSource, Path], None]:
    """A variant maker quantising the fused graph (attention kernels, the decoder step's cache
    written in place) rather than the portable one: the `fused` variant's graph when the same
    export already wrote it beside `target`, else one exported to a scratch file there."""
    def make(source: GraphSource, target: Path) -> None:
        written = target.with_name(f"{source.spec.name}.fused.onnx")
        if written.exists():
            quantize(written, target)
            return
        scratch = target.with_name(f".{target.stem}.fused.onnx")
        try:
            _exported_fused(source, scratch)
            quantize(scratch, target)
        finally:
            scratch.unlink(missing_ok=True)
            external_data_file(scratch).unlink(missing_ok=True)
    return make


@dataclass(frozen=True)
class Variant:
    """How to make one variant of an fp32 graph, and how to measure it on a CPU."""

    name: str
    make: Callable[[GraphSource, Path], None]  # (what to make it from, variant graph to write)
    # a CPU-runnable equivalent of the variant graph, when ONNX Runtime's CPU provider lacks
    # its kernels; None: the variant itself runs on CPUs
    cpu_emulation: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None
    settings: str = ""  # how `make` makes it, where a variant has more than one way
    # the way to make it instead when this one's graphs miss the variant's check (a slower but
    # closer setting); None: the check's failure is final
    fallback: Variant | None = None

    def cpu_session(self, path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
        """An ONNX Runtime CPU session computing what the variant graph at `path` computes."""
        cpu = ["CPUExecutionProvider"]
        if self.cpu_emulation is None:
            return ort.InferenceSession(str(path), options, providers=cpu)
        # Rewritten without loading the weights (any size): the stand-in is written beside the
        # variant so that its external-data references still resolve, and removed once loaded.
        emulated = self.cpu_emulation(onnx.load(str(path), load_external_data=False))
        fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".onnx")
        os.close(fd)
        try:
            onnx.save(emulated, scratch)
            return ort.InferenceSession(scratch, options, providers=cpu)
        finally:
            os.unlink(scratch)


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Replace every Transpose of an initializer that only feeds MatMuls' weights by the
    transposed initializer; returns how many. The output projection tied to the token embedding
    is exported as MatMul(x, Transpose(embedding)): folded, it is a weight the int8 quantizer
    sees (it is the largest matmul of a decoder step); the embedding stays for the Gather."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded = []
    for node in graph.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        users = consumers.get(node.output[0], [])
        if (node.op_type != "Transpose" or node.input[0] not in initializers
                or perm not in (None, [1, 0]) or not users
                or any(u.op_type != "MatMul" or list(u.input).index(node.output[0]) != 1
                       for u in users)):
            continue
        weights = numpy_helper.to_array(initializers[node.input[0]])
        if weights.ndim != 2:
            continue
        graph.initializer.append(numpy_helper.from_array(
            weights.T.copy(), name=f"{node.input[0]}.transposed"))
        for user in users:
            user.input[1] = f"{node.input[0]}.transposed"
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    return len(folded)


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of the weight matmuls (the output projection included)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = external_data_file(source).exists()
    model = onnx.load(str(source))
    if fold_weight_transposes(model):
        # the folded graph beside the target, so that a > 2 GB one can keep its weights aside
        source = target.with_name(f".{target.stem}.folded.onnx")
        onnx.save(model, str(source), save_as_external_data=large,
                  location=f"{source.name}.data" if large else None)
    try:
        with quiet_loggers(""):  # the quantizer logs advice about image models on the root
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                             per_channel=False, op_types_to_quantize=["MatMul", "Gemm"],
                             # a > 2 GB graph keeps its (quantised) weights in a side file too
                             use_external_data_format=large)
    finally:
        if source.name.endswith(".folded.onnx"):
            source.unlink(missing_ok=True)
            source.with_name(f"{source.name}.data").unlink(missing_ok=True)


INT4_BLOCKS = (128, 32)  # weights per scale along the input dimension, tried in this order.
# 128 (GPTQ / AWQ's group size) made Qwen2.5-0.5B's decode step 17 % faster than 32 (llama.cpp's
# Q4_0 block) on a 2-core Xeon with VNNI (ONNX Runtime's int4 kernel is compute-bound there: a
# scale per 32 weights costs it more than the bytes it saves), but a small model's int4 tokens
# can then miss the agreement gate (67 %): the variant falls back to 32 when they do.


def quantize_int4(source: Path, target: Path, *, block: int) -> None:
    """Weight-only int4 for decoding on CPUs: every weight matmul (the output projection
    included; the embedding Gather stays fp32) as ONNX Runtime's `MatMulNBits`, symmetric 4-bit
    blocks of `block` input weights with an fp32 scale each; activations stay fp32, and
    `accuracy_level=4` lets the kernel multiply in int8 (VNNI where the CPU has it)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    large = external_data_file(source).exists()
    model = onnx.load(str(source))
    fold_weight_transposes(model)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=True,
                                     accuracy_level=4)
    with quiet_loggers(""):  # the quantizer logs every node it quantises
        quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=large)


def _int4(blocks: tuple[int, ...]) -> Variant:
    """The int4 variant with blocks of `blocks[0]`, falling back to the next sizes in turn."""
    return Variant("int4", _quantized_fused(partial(quantize_int4, block=blocks[0])),
                   settings=f"blocks of {blocks[0]}",
                   fallback=_int4(blocks[1:]) if len(blocks) > 1 else None)


VARIANTS = {variant.name: variant for variant in (
    Variant("int8", _quantized_fused(quantize_int8)),
    _int4(INT4_BLOCKS),
    Variant("fp16", _rewriting(half_precision.write_fp16)),
    Variant("bf16", _rewriting(half_precision.write_bf16),
            cpu_emulation=half_precision.emulated_in_fp32),
    Variant("fused", _exported_fused),
)}


def variant(precision: str) -> Variant:
    if precision not in VARIANTS:
        raise FerryError(f"unknown precision {precision!r}; available variants: fp32 (always), "
                         f"{', '.join(sorted(VARIANTS))}")
    return VARIANTS[precision]
