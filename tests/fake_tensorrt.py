"""A stand-in for TensorRT and cuda-python, for machines without a GPU.

It implements the slice of TensorRT's and cuda-python's documented Python APIs that ferry uses
(`ferry.export.tensorrt_build`, `ferry.runtime.backends.tensorrt`), strictly:
the builder records the network flags, workspace, profiles and timing cache and serialises them
with the ONNX path as the "plan"; an engine runs its ONNX graph with onnxruntime, refusing input
shapes outside the profile it was built with, and only after every input shape and every tensor
address was set. "Device" memory is host memory (ctypes buffers), so copies are real copies and a
wrong size or address corrupts results. Tests install it into `sys.modules` with `install`.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types

import numpy as np
import onnxruntime as ort

__version__ = "10.99.0"
BUILDS: list[dict] = []  # what each build_serialized_network call saw


class Logger:
    WARNING = 2

    def __init__(self, level: int) -> None:
        self.level = level


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 5


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class TensorIOMode(enum.IntEnum):
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    INT64 = 13


def nptype(dtype: DataType):
    return {DataType.FLOAT: np.float32, DataType.INT64: np.int64}[dtype]


class Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx_path = None


class OnnxParser:
    def __init__(self, network: Network, logger: Logger) -> None:
        self.network = network
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        self.network.onnx_path = path
        return True

    def get_error(self, index: int) -> str:
        raise IndexError(index)


class OptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, list] = {}

    def set_shape(self, name: str, min, opt, max) -> None:  # noqa: A002 (TensorRT's names)
        assert all(len(s) == len(min) for s in (opt, max)), name
        assert all(a <= b <= c for a, b, c in zip(min, opt, max)), (name, min, opt, max)
        self.shapes[name] = [list(min), list(opt), list(max)]


class TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+"


class BuilderConfig:
    def __init__(self) -> None:
        self.pools: dict = {}
        self.profiles: list[OptimizationProfile] = []
        self.cache = None
        self.progress_monitor = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: OptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> TimingCache:
        return TimingCache(bytes(data))

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> TimingCache:
        return self.cache


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int) -> Network:
        return Network(flags)

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes:
        build = {"onnx": network.onnx_path, "flags": network.flags,
                 "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
                 "profiles": [p.shapes for p in config.profiles],
                 "timing_cache_in": config.cache.data.decode() if config.cache else None}
        BUILDS.append(build)
        monitor = config.progress_monitor
        if monitor is not None:
            monitor.phase_start("Building engine", None, 1)
            assert monitor.step_complete("Building engine", 0)
            monitor.phase_finish("Building engine")
        return json.dumps(build).encode()


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, plan: bytes):
        try:
            build = json.loads(plan)
        except ValueError:
            return None
        return Engine(build)


class Engine:
    def __init__(self, build: dict) -> None:
        self.session = ort.InferenceSession(build["onnx"], providers=["CPUExecutionProvider"])
        self.profile = build["profiles"][0]
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.types = {v.name: DataType.INT64 if "int64" in v.type else DataType.FLOAT
                      for v in (*self.session.get_inputs(), *self.session.get_outputs())}

    @property
    def num_io_tensors(self) -> int:
        return len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, index: int) -> str:
        return (self.inputs + self.outputs)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.types[name]

    def create_execution_context(self) -> ExecutionContext:
        return ExecutionContext(self)


class ExecutionContext:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.results: dict[str, np.ndarray] = {}

    def set_input_shape(self, name: str, shape) -> bool:
        low, _, high = self.engine.profile.get(name, [list(shape)] * 3)
        if not all(a <= s <= b for a, s, b in zip(low, shape, high)):
            raise ValueError(f"{name} shape {tuple(shape)} is outside the profile {low}..{high}")
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def _read(self, name: str) -> np.ndarray:
        dtype = np.dtype(nptype(self.engine.types[name]))
        shape = self.shapes[name]
        size = int(np.prod(shape)) * dtype.itemsize
        raw = ctypes.string_at(self.addresses[name], size)
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

    def infer_shapes(self) -> list[str]:
        missing = [n for n in self.engine.inputs if n not in self.shapes]
        if missing:
            return missing
        feed = {name: self._read(name) for name in self.engine.inputs}
        self.results = dict(zip(self.engine.outputs, self.engine.session.run(None, feed)))
        return []

    def get_tensor_shape(self, name: str) -> tuple:
        return self.results[name].shape

    def execute_async_v3(self, stream_handle) -> bool:
        self.infer_shapes()  # the inputs as they are in "device" memory now
        for name, array in self.results.items():
            if name not in self.addresses:
                return False
            data = np.ascontiguousarray(array)
            ctypes.memmove(self.addresses[name], data.ctypes.data, data.nbytes)
        return True


class IProgressMonitor:
    def __init__(self) -> None:
        pass


# ---------------------------------------------------------------- cuda-python's runtime


class cudaError_t(enum.IntEnum):  # noqa: N801 (cuda-python's names)
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


ALLOCATIONS: dict[int, ctypes.Array] = {}


def cudaMalloc(size: int):  # noqa: N802
    buffer = ctypes.create_string_buffer(size)
    ALLOCATIONS[ctypes.addressof(buffer)] = buffer
    return cudaError_t.cudaSuccess, ctypes.addressof(buffer)


def cudaFree(pointer: int):  # noqa: N802
    ALLOCATIONS.pop(pointer)
    return (cudaError_t.cudaSuccess,)


def cudaMemcpyAsync(dst: int, src: int, count: int, kind, stream):  # noqa: N802
    ctypes.memmove(dst, src, count)
    return (cudaError_t.cudaSuccess,)


def cudaStreamCreate():  # noqa: N802
    return cudaError_t.cudaSuccess, 7


def cudaStreamDestroy(stream):  # noqa: N802
    return (cudaError_t.cudaSuccess,)


def cudaStreamSynchronize(stream):  # noqa: N802
    return (cudaError_t.cudaSuccess,)


def cudaSetDevice(device: int):  # noqa: N802
    return (cudaError_t.cudaSuccess,)


def cudaGetDeviceProperties(device: int):  # noqa: N802
    return cudaError_t.cudaSuccess, types.SimpleNamespace(name=b"Fake H200", major=9, minor=0)


def cudaGetErrorName(error):  # noqa: N802
    return cudaError_t.cudaSuccess, cudaError_t(error).name.encode()


def install(monkeypatch) -> types.ModuleType:
    """Make `import tensorrt` and `from cuda.bindings import runtime` find these fakes."""
    this = sys.modules[__name__]
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = this
    cuda.bindings = bindings
    for name, module in (("tensorrt", this), ("cuda", cuda), ("cuda.bindings", bindings),
                         ("cuda.bindings.runtime", this)):
        monkeypatch.setitem(sys.modules, name, module)
    BUILDS.clear()
    return this
