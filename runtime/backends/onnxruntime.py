"""ONNX Runtime backend: one `InferenceSession` per graph."""

from __future__ import annotations

import numpy as np
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
        # np.asarray: no copy for numpy arrays; another backend's device arrays come to the host
        outputs = self.session.run(self.spec.output_names,
                                   {name: np.asarray(value) for name, value in feed.items()})
        return dict(zip(self.spec.output_names, outputs))


# Short names for the execution providers ferry selects; the full names are accepted too.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
PROVIDER_PACKAGES = {
    "CUDAExecutionProvider": "onnxruntime-gpu (with CUDA and cuDNN)",
    "TensorrtExecutionProvider": "onnxruntime-gpu with the TensorRT libraries on the library path",
}
CPU_ONLY_MISSING_KERNELS = {"bf16"}  # precisions ONNX Runtime's CPU provider cannot run


def resolve_providers(providers: list[str] | None) -> list[str]:
    """Full provider names in priority order, CPU last as the fallback for unsupported nodes;
    a provider this onnxruntime build lacks is an error listing what it has."""
    wanted = [PROVIDERS.get(p, p) for p in (providers or ["cpu"])]
    if PROVIDERS["cpu"] not in wanted:
        wanted.append(PROVIDERS["cpu"])
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        needs = "; ".join(f"{p} needs {PROVIDER_PACKAGES[p]}" for p in missing
                          if p in PROVIDER_PACKAGES)
        raise FerryError(f"ONNX Runtime provider(s) {missing} are not available in this "
                         f"onnxruntime {ort.__version__}; available: {available}"
                         + (f" ({needs})" if needs else ""))
    return wanted


def provider_options(provider: str, spec: GraphSpec, cache_dir: str | None) -> dict:
    """Per-graph options: TensorRT gets the optimisation profile from the graph spec (every
    dynamic input's min/opt/max) and, given `cache_dir`, engine and timing caches there."""
    if provider != PROVIDERS["tensorrt"]:
        return {}

    def shapes(index: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, bounds[index]))}"
                        for name, bounds in spec.profile_shapes(dynamic_only=True).items())

    options = {"trt_profile_min_shapes": shapes(0), "trt_profile_opt_shapes": shapes(1),
               "trt_profile_max_shapes": shapes(2)}
    if cache_dir:
        options.update(trt_engine_cache_enable="True", trt_engine_cache_path=cache_dir,
                       trt_timing_cache_enable="True", trt_timing_cache_path=cache_dir)
    return options


@register_backend("onnxruntime")
def load_onnxruntime(
    bundle: Bundle,
    *,
    providers: list[str] | None = None,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    optimization: str = "all",
    precision: str = "fp32",
    trt_cache_dir: str | None = None,
) -> dict[str, GraphBackend]:
    """Open every graph of `bundle` in ONNX Runtime, in `precision` (fp32, or a variant the
    bundle carries: int8, fp16, bf16).

    Args:
        providers: execution providers in priority order, by short name (`cpu`, `cuda`,
            `tensorrt`) or full name; default CPU. CPU is always appended as the fallback.
        trt_cache_dir: with the TensorRT provider, where it keeps built engines and timing
            caches between runs.
    """
    providers = resolve_providers(providers)
    if (precision in CPU_ONLY_MISSING_KERNELS and precision in bundle.precisions
            and providers == [PROVIDERS["cpu"]]):
        raise FerryError(f"ONNX Runtime's CPU provider has no {precision} kernels: run the "
                         f"{precision} variant with providers cuda or tensorrt "
                         f"(--backend onnxruntime-cuda:{precision}) or the tensorrt backend; its "
                         "deviation from fp32 was measured at export by emulation (see "
                         "`ferry inspect`)")
    options = session_options(intra_op_threads=intra_op_threads,
                              inter_op_threads=inter_op_threads, optimization=optimization)
    graphs: dict[str, GraphBackend] = {}
    for name, spec in bundle.graphs.items():
        path = bundle.graph_file(name, precision)
        chosen = [(p, provider_options(p, spec, trt_cache_dir)) for p in providers]
        try:
            session = ort.InferenceSession(str(path), options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own untyped errors on bad models
            raise FerryError(f"ONNX Runtime cannot load {path}: "
                             f"{str(exc).splitlines()[0]}") from exc
        graphs[name] = OnnxRuntimeGraph(spec, session)
    return graphs
