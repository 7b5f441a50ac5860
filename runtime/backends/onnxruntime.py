"""ONNX Runtime backend: one `InferenceSession` per graph."""

from __future__ import annotations

import onnxruntime as ort

from ferry.errors import FerryError
from ferry.graph_spec import GraphSpec
from ferry.runtime.backends.base import Feed, GraphBackend, register_backend
from ferry.runtime.bundle import Bundle

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(
    *, intra_op_threads: int = 0, inter_op_threads: int = 0, optimization: str = "all"
) -> ort.SessionOptions:
    """Session options; 0 threads lets ONNX Runtime use one per physical core."""
    if optimization not in OPTIMIZATION_LEVELS:
        raise FerryError(f"unknown ONNX Runtime optimization level {optimization!r}; "
                         f"choose one of {list(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


class OnnxRuntimeGraph(GraphBackend):
    """Runs one ONNX graph in an ONNX Runtime session."""

    def __init__(self, spec: GraphSpec, session: ort.InferenceSession) -> None:
        super().__init__(spec)
        self.session = session

    def _infer(self, feed: Feed) -> Feed:
        outputs = self.session.run(self.spec.output_names, feed)
        return dict(zip(self.spec.output_names, outputs))


@register_backend("onnxruntime")
def load_onnxruntime(
    bundle: Bundle,
    *,
    providers: list[str] | None = None,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    optimization: str = "all",
    precision: str = "fp32",
) -> dict[str, GraphBackend]:
    """Open every graph of `bundle` in ONNX Runtime (default provider: CPU), in `precision`
    (fp32, or a variant the bundle carries such as int8)."""
    providers = providers or ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise FerryError(f"ONNX Runtime provider(s) {missing} are not installed; available: "
                         f"{available}")
    options = session_options(intra_op_threads=intra_op_threads,
                              inter_op_threads=inter_op_threads, optimization=optimization)
    graphs: dict[str, GraphBackend] = {}
    for name, spec in bundle.graphs.items():
        path = bundle.graph_file(name, precision)
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors on bad models
            raise FerryError(f"ONNX Runtime cannot load {path}: "
                             f"{str(exc).splitlines()[0]}") from exc
        graphs[name] = OnnxRuntimeGraph(spec, session)
    return graphs

