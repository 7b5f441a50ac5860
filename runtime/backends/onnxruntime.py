"""ONNX Runtime backend: one `InferenceSession` per graph.

With IO binding (the default on CUDA and TensorRT providers, an option on CPUs) the KV caches and
cross-attention K/V stay in ONNX Runtime's memory on the provider's device between graph calls
(`OrtArray`), so a decode step moves only the new tokens in and the logits out; without it every
output comes back as a numpy array and is handed in again at the next step.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ferry.errors import FerryError
from ferry.graph_spec import GraphSpec
from ferry.runtime.backends.base import DEVICE_RESIDENT, Feed, GraphBackend, register_backend
from ferry.runtime.backends.device_arrays import DeviceArray, StaticCacheStep, StaticCacheView
from ferry.runtime.bundle import Bundle
from ferry.runtime.cpu_threads import thread_plan

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(
    *, intra_op_threads: int = 0, inter_op_threads: int = 0, optimization: str = "all",
    spinning: bool = True,
) -> ort.SessionOptions:
    """Session options; 0 threads lets ONNX Runtime use one per physical core; `spinning`
    False stops idle pool threads from spin-waiting for the next operator. Spinning pools stop
    spinning when a run returns (`session.force_spinning_stop`): between graph calls the cores
    belong to the host work on their outputs — generation's token choice, beam search's
    log-softmax and cache moves (`host_parallel`) — which a pool spinning on until its spin
    budget ran out slowed by 10–25 % (greedy int8 and beam search alike, 2-core VM)."""
    if optimization not in OPTIMIZATION_LEVELS:
        raise FerryError(f"unknown ONNX Runtime optimization level {optimization!r}; "
                         f"choose one of {list(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


ORT_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
              "tensor(int64)": np.dtype(np.int64), "tensor(int32)": np.dtype(np.int32)}


class OrtArray(DeviceArray):
    """A graph output kept in ONNX Runtime's memory on its device (an `OrtValue`). Fed back to
    an IO-bound session it is bound as is. Row selection (beam reordering, finished rows
    leaving) goes through the host: ONNX Runtime's Python API has no device-side gather."""

    def __init__(self, value: ort.OrtValue, device: str, device_id: int) -> None:
        self.value = value
        self.device = device
        self.device_id = device_id

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())

    @property
    def dtype(self) -> np.dtype:
        return ORT_DTYPES[self.value.data_type()]

    def _placed(self, host: np.ndarray) -> OrtArray:
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(host), self.device,
                                                 self.device_id)
        return OrtArray(value, self.device, self.device_id)

    def host(self) -> np.ndarray:
        return self.value.numpy()

    def take_rows(self, rows: np.ndarray) -> OrtArray:
        return self._placed(self.host()[rows])

    def repeat_rows(self, repeats: int) -> OrtArray:
        return self._placed(np.repeat(self.host(), repeats, axis=0))


class OnnxRuntimeGraph(GraphBackend):
    """Runs one ONNX graph in an ONNX Runtime session.

    Args:
        io_binding: keep the KV caches and cross-attention K/V on `device` between calls
            (`OrtArray` outputs) instead of returning every output as a numpy array.
        device: where IO-bound cache outputs live: "cpu" or "cuda" (`device_id`).
    """

    def __init__(self, spec: GraphSpec, session: ort.InferenceSession, *,
                 io_binding: bool = False, device: str = "cpu", device_id: int = 0) -> None:
        super().__init__(spec)
        self.session = session
        self.io_binding = io_binding
        self.device = device
        self.device_id = device_id

    def _infer(self, feed: Feed) -> Feed:
        if self.io_binding:
            return self._infer_bound(feed)
        # np.asarray: no copy for numpy arrays; another backend's device arrays come to the host
        outputs = self.session.run(self.spec.output_names,
                                   {name: np.asarray(value) for name, value in feed.items()})
        return dict(zip(self.spec.output_names, outputs))

    def _infer_bound(self, feed: Feed) -> Feed:
        binding = self.session.io_binding()  # per call: concurrent calls share the session
        for name, value in feed.items():
            _bind_input(binding, name, value)
        for name in self.spec.output_names:
            resident = name.startswith(DEVICE_RESIDENT)
            binding.bind_output(name, self.device if resident else "cpu",
                                self.device_id if resident else 0)
        self.session.run_with_iobinding(binding)
        return {name: OrtArray(value, self.device, self.device_id)
                if name.startswith(DEVICE_RESIDENT) else value.numpy()
                for name, value in zip(self.spec.output_names, binding.get_outputs())}


def _bind_input(binding: ort.IOBinding, name: str, value) -> None:
    """Bind a feed value: an `OrtArray` as it lies, anything else from the host (copied to the
    device when the session runs there)."""
    if isinstance(value, OrtArray):
        binding.bind_ortvalue_input(name, value.value)
    else:
        binding.bind_cpu_input(name, np.ascontiguousarray(value))


class OrtCacheView(StaticCacheView, OrtArray):
    """An `OrtStaticCacheStep`'s `present_*`: a view of a buffer in ONNX Runtime's memory
    (`StaticCacheView`). Row selection goes through the host."""

    def __init__(self, buffer: ort.OrtValue, length: int, device: str, device_id: int,
                 host: np.ndarray | None, *, buffer_shape: tuple[int, ...] | None = None,
                 binding: ort.IOBinding | None = None) -> None:
        super().__init__(buffer, device, device_id)
        self.length = length
        self.full = host  # the numpy array a CPU buffer lives in (read without a copy)
        self._buffer_shape = tuple(buffer_shape or buffer.shape())
        # the step's binding with this view's buffer set bound as past and present (None: not
        # bound yet): the next step rebinds only the small inputs
        self.binding = binding

    @classmethod
    def placed(cls, full: np.ndarray, length: int, device: str, device_id: int) -> OrtCacheView:
        """A view of `length` positions of a buffer made from the host array `full`."""
        full = np.ascontiguousarray(full)
        value = ort.OrtValue.ortvalue_from_numpy(full, device, device_id)
        return cls(value, length, device, device_id, full if device == "cpu" else None)

    @property
    def buffer_shape(self) -> tuple[int, int, int, int]:
        return self._buffer_shape

    def _whole(self) -> np.ndarray:
        """The whole buffer, capacity included, as a host array."""
        return self.full if self.full is not None else self.value.numpy()

    def host(self) -> np.ndarray:
        return self._whole()[:, :, : self.length]

    def take_rows(self, rows: np.ndarray) -> OrtCacheView:
        whole = self._whole()
        selected = np.zeros((len(rows), *whole.shape[1:]), whole.dtype)
        for i, row in enumerate(rows):  # row by row: a third of a fancy-indexed copy's time
            selected[i, :, : self.length] = whole[row, :, : self.length]
        return OrtCacheView.placed(selected, self.length, self.device, self.device_id)

    def host_view(self) -> np.ndarray | None:
        """The first `length` positions of a CPU buffer, in the numpy array it lives in (so
        beam search rearranges its rows in place); None for a device buffer (row selection
        goes through `take_rows`)."""
        return None if self.full is None else self.full[:, :, : self.length]


class OrtStaticCacheStep(StaticCacheStep):
    """A `decoder_step` exported over a static cache (`ferry.graph_spec.static_cache_step_spec`,
    the fused variant; see `StaticCacheStep`): its `past_*` input and `present_*` output are one
    buffer per layer, both bound to the same OrtValue, so the kernel writes each new key/value
    in place and no step copies the cache."""

    view_type = OrtCacheView

    def __init__(self, spec: GraphSpec, session: ort.InferenceSession, *, device: str = "cpu",
                 device_id: int = 0) -> None:
        super().__init__(spec)
        self.session = session
        self.device = device
        self.device_id = device_id

    def _fresh_view(self, value, shape: tuple[int, int, int, int], cached: int
                    ) -> OrtCacheView:
        full = np.zeros(shape, dtype=np.float32)
        full[:, :, :cached] = np.asarray(value)
        return OrtCacheView.placed(full, cached, self.device, self.device_id)

    def _infer(self, feed: Feed) -> Feed:
        cached, caches = self.caches(feed)
        rows, new = feed["input_ids"].shape
        if new > 1 and rows > 1 and all(cache.full is not None for cache in caches):
            # ONNX Runtime's CPU GroupQueryAttention takes several new tokens over a cache (a
            # prefill chunk) for one row at a time: each row runs on views of its buffer rows
            per_row = [self._run(
                {name: value[row:row + 1] for name, value in feed.items()
                 if not name.startswith("past_")}, cached,
                [OrtCacheView.placed(cache.full[row:row + 1], cached, self.device,
                                     self.device_id) for cache in caches])[0]
                for row in range(rows)]
            binding = None  # the rows ran bound to views of their buffer rows
            outputs = {name: np.concatenate([row[name] for row in per_row])
                       for name in per_row[0]}
        else:
            outputs, binding = self._run(feed, cached, caches)
        return {**outputs, **{
            name: OrtCacheView(cache.value, cached + new, self.device, self.device_id,
                               cache.full, buffer_shape=cache.buffer_shape, binding=binding)
            for name, cache in zip(self.present_names, caches)}}

    def _run(self, feed: Feed, cached: int, caches: list[OrtCacheView]
             ) -> tuple[Feed, ort.IOBinding]:
        """One run of the step on `caches` (written in place at `cached`) → its logits (and any
        other output but the caches: the probes `ferry compare --bisect` marks), and the binding
        it ran with. The caches' own binding is reused when they all carry it (the previous
        step's views of the same buffers), so a step binds its few small inputs rather than
        every layer's buffers; a binding belongs to one buffer set, so calls from other threads,
        on other caches, never share it."""
        host = [name for name in self.spec.output_names if not name.startswith("present_")]
        binding = caches[0].binding
        if binding is None or any(cache.binding is not binding for cache in caches):
            binding = self.session.io_binding()
            for name in host:  # bound first: `get_outputs` lists them first
                binding.bind_output(name, "cpu")
            for past, present, cache in zip(self.past_names, self.present_names, caches):
                binding.bind_ortvalue_input(past, cache.value)
                binding.bind_ortvalue_output(present, cache.value)  # the same buffer: in place
        for name, value in feed.items():
            if name == "attention_mask":  # (B, P+T) → (B, capacity)
                value = self.capacity_mask(value, caches[0].capacity)
            if not name.startswith("past_"):
                _bind_input(binding, name, value)
        binding.bind_cpu_input("cache_position", np.array([cached], dtype=np.int64))
        for name in host:  # fresh host outputs each run (rebinding keeps their places)
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # the host outputs, then the caches
        return {name: value.numpy() for name, value in zip(host, outputs)}, binding


def onnxruntime_graph(spec: GraphSpec, session: ort.InferenceSession, *,
                      io_binding: bool = False, device: str = "cpu", device_id: int = 0
                      ) -> GraphBackend:
    """The backend for one session of a bundle graph with this (portable) spec: a static-cache
    step when the session's graph is one (it takes `cache_position`), else `OnnxRuntimeGraph`."""
    if "cache_position" in {value.name for value in session.get_inputs()}:
        return OrtStaticCacheStep(spec, session, device=device, device_id=device_id)
    return OnnxRuntimeGraph(spec, session, io_binding=io_binding, device=device,
                            device_id=device_id)


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


def provider_options(provider: str, spec: GraphSpec, cache_dir: str | None,
                     device_id: int = 0) -> dict:
    """Per-graph options: the GPU providers get `device_id`; TensorRT also the optimisation
    profile from the graph spec (every dynamic input's min/opt/max) and, given `cache_dir`,
    engine and timing caches there."""
    if provider == PROVIDERS["cuda"]:
        return {"device_id": str(device_id)}
    if provider != PROVIDERS["tensorrt"]:
        return {}

    def shapes(index: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, bounds[index]))}"
                        for name, bounds in spec.profile_shapes(dynamic_only=True).items())

    options = {"device_id": str(device_id), "trt_profile_min_shapes": shapes(0),
               "trt_profile_opt_shapes": shapes(1), "trt_profile_max_shapes": shapes(2)}
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
    precision: str | None = None,
    trt_cache_dir: str | None = None,
    io_binding: bool | None = None,
    device_id: int = 0,
    spinning: bool | None = None,
) -> dict[str, GraphBackend]:
    """Open every graph of `bundle` in ONNX Runtime, in `precision`: fp32 (the portable graphs)
    or a variant the bundle carries (int8, fp16, bf16, fused). Default here: on the CPU provider
    the fused fp32 graphs when the bundle carries them (same tolerance as the portable ones, no
    per-step cache copy), else the portable fp32 graphs; `ferry.runtime.load` instead picks
    whichever of the two this machine runs faster (`ferry.runtime.variant_choice`).

    Args:
        providers: execution providers in priority order, by short name (`cpu`, `cuda`,
            `tensorrt`) or full name; default CPU. CPU is always appended as the fallback.
        trt_cache_dir: with the TensorRT provider, where it keeps built engines and timing
            caches between runs.
        io_binding: keep KV caches and cross-attention K/V on the device between calls (see
            `OnnxRuntimeGraph`); default: on with the CUDA / TensorRT providers, off on CPUs.
        device_id: the GPU the CUDA / TensorRT providers run on.
        intra_op_threads: on the CPU provider, 0 (default) uses one thread per core that no
            other work keeps busy when the model loads (`ferry.runtime.cpu_threads`), at least
            one; elsewhere ONNX Runtime's default.
        spinning: let idle intra-op threads spin-wait for the next operator (the least latency
            on an otherwise idle CPU). Off, they sleep: better when the CPU is shared with
            other processes. Default: on the CPU provider, spinning only when every thread has
            a free core. Each graph's `thread_plan` says what was chosen (None off the CPU).
    """
    providers = resolve_providers(providers)
    if precision is None:
        precision = ("fused" if "fused" in bundle.precisions
                     and providers == [PROVIDERS["cpu"]] else "fp32")
    if (precision in CPU_ONLY_MISSING_KERNELS and precision in bundle.precisions
            and providers == [PROVIDERS["cpu"]]):
        raise FerryError(f"ONNX Runtime's CPU provider has no {precision} kernels: run the "
                         f"{precision} variant with providers cuda or tensorrt "
                         f"(--backend onnxruntime-cuda:{precision}) or the tensorrt backend; its "
                         "deviation from fp32 was measured at export by emulation (see "
                         "`ferry inspect`)")
    on_gpu = providers[0] != PROVIDERS["cpu"]
    plan = None
    if not on_gpu:  # threads and spinning for the CPU as it is now
        plan = thread_plan(intra_op_threads, spinning)
        intra_op_threads, spinning = plan.threads, plan.spinning
    options = session_options(intra_op_threads=intra_op_threads,
                              inter_op_threads=inter_op_threads, optimization=optimization,
                              spinning=True if spinning is None else spinning)
    io_binding = on_gpu if io_binding is None else io_binding
    graphs: dict[str, GraphBackend] = {}
    for name, spec in bundle.graphs.items():
        path = bundle.graph_file(name, precision)
        chosen = [(p, provider_options(p, spec, trt_cache_dir, device_id)) for p in providers]
        try:
            session = ort.InferenceSession(str(path), options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own untyped errors on bad models
            raise FerryError(f"ONNX Runtime cannot load {path}: "
                             f"{str(exc).splitlines()[0]}") from exc
        graphs[name] = onnxruntime_graph(spec, session, io_binding=io_binding,
                                         device="cuda" if on_gpu else "cpu", device_id=device_id)
        graphs[name].precision = precision
        graphs[name].thread_plan = plan
    return graphs
