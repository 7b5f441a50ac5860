"""What a TensorRT build needs, checked without TensorRT: `ferry export tensorrt BUNDLE --check`.

For every graph of a bundle (in one precision): each op type is in TensorRT's supported ONNX
operator list for the target version (`tensorrt_onnx_ops.json`, from the onnx-tensorrt support
matrix), no control flow (If / Loop / Scan break or slow builds), the opset is within what the
parser reads and ≥ 17 (native LayerNormalization), no custom-domain ops, and every dynamic input
dimension has a min/opt/max range in the graph spec, from which the optimisation profiles are
derived. Offending nodes are reported by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources

import onnx

from ferry.export.onnx_export import FORBIDDEN_OPS, MIN_OPSET
from ferry.graph_spec import GraphSpec
from ferry.runtime.bundle import Bundle

Shape = tuple[int, ...]


def supported_operators() -> dict:
    """The TensorRT ONNX operator support data shipped with ferry."""
    text = resources.files("ferry.export").joinpath("tensorrt_onnx_ops.json").read_text()
    return json.loads(text)


@dataclass
class GraphCheck:
    graph: str
    file: str
    opset: int
    op_types: list[str]
    problems: list[str] = field(default_factory=list)
    profile: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems


def check_graph_for_tensorrt(model: onnx.ModelProto, spec: GraphSpec, file: str,
                             support: dict) -> GraphCheck:
    """Static TensorRT compatibility of one ONNX graph against its spec."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    nodes = list(model.graph.node)
    result = GraphCheck(graph=spec.name, file=file, opset=opset,
                        op_types=sorted({n.op_type for n in nodes}))
    if not MIN_OPSET <= opset <= support["opset_max"]:
        result.problems.append(f"opset {opset} is outside [{MIN_OPSET}, {support['opset_max']}] "
                               f"(ferry needs ≥ {MIN_OPSET}; TensorRT {support['tensorrt']} "
                               f"parses ≤ {support['opset_max']})")
    supported = set(support["supported_ops"])
    for node in nodes:
        where = f"node {node.name or '(unnamed)'} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            result.problems.append(f"{where} is in custom domain {node.domain!r}")
        elif node.op_type in FORBIDDEN_OPS:
            result.problems.append(f"{where} is control flow")
        elif node.op_type not in supported:
            result.problems.append(f"{where} is not supported by TensorRT {support['tensorrt']}")
    declared = {t.name: t for t in spec.inputs}
    for value in model.graph.input:
        tensor = declared.get(value.name)
        if tensor is None:
            result.problems.append(f"input {value.name} is not in the graph spec")
            continue
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param and dim.dim_param not in spec.dims:
                result.problems.append(f"input {value.name}: dynamic dim {dim.dim_param!r} has "
                                       "no min/opt/max range in the spec")
    if not any("dynamic dim" in p for p in result.problems):
        result.profile = spec.profile_shapes()
    return result


def check_bundle_for_tensorrt(bundle: Bundle, precision: str = "fp32") -> list[GraphCheck]:
    """Check every graph of `bundle` in `precision`."""
    support = supported_operators()
    checks = []
    for name, spec in bundle.graphs.items():
        path = bundle.graph_file(name, precision)
        model = onnx.load(str(path), load_external_data=False)
        checks.append(check_graph_for_tensorrt(model, spec, path.name, support))
    return checks


def format_checks(checks: list[GraphCheck], support: dict) -> str:
    lines = [f"static TensorRT {support['tensorrt']} check (no TensorRT needed)"]
    for check in checks:
        status = "ok" if check.passed else f"{len(check.problems)} problem(s)"
        lines.append(f"  {check.file:<28} opset {check.opset:<3} {len(check.op_types):>3} op "
                     f"types  {status}")
        lines += [f"    - {p}" for p in check.problems]
        for name, (low, opt, high) in check.profile.items():
            per_layer_repeat = name[-1].isdigit() and not name.endswith("_0")
            if low != high and not per_layer_repeat:
                lines.append(f"    profile {name}: min {list(low)} opt {list(opt)} "
                             f"max {list(high)}")
    verdict = "PASS" if all(c.passed for c in checks) else "FAIL"
    lines.append(f"TensorRT check {verdict}")
    return "\n".join(lines)
