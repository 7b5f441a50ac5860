"""Reduced-precision variants of a bundle's graphs, made at the ONNX level.

`int8`: dynamic quantisation for CPUs (onnxruntime.quantization): MatMul/Gemm weights stored as
int8 with per-tensor scales, activations quantised on the fly; everything else stays fp32. The
exporter measures each variant against the fp32 torch reference and records it in the manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ferry.errors import FerryError

VariantMaker = Callable[[Path, Path], None]  # (fp32 graph, variant graph to write)
VARIANTS: dict[str, VariantMaker] = {}


def register_variant(name: str) -> Callable[[VariantMaker], VariantMaker]:
    def decorate(maker: VariantMaker) -> VariantMaker:
        VARIANTS[name] = maker
        return maker

    return decorate


@register_variant("int8")
def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of the weight matmuls."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice about image models on the root
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                         per_channel=False, op_types_to_quantize=["MatMul", "Gemm"],
                         # a > 2 GB graph keeps its (quantised) weights in a side file too
                         use_external_data_format=source.with_name(source.name + ".data")
                         .exists())
    finally:
        root.setLevel(level)


def variant_maker(precision: str) -> VariantMaker:
    if precision not in VARIANTS:
        raise FerryError(f"unknown precision {precision!r}; available variants: fp32 (always), "
                         f"{', '.join(sorted(VARIANTS))}")
    return VARIANTS[precision]
