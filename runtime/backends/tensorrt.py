"""TensorRT backend: runs the engines `ferry export tensorrt` built, one per graph.

No torch: TensorRT's Python API for the engines, cuda-python for device memory, streams and
copies. Each call sets the input shapes on the execution context, lets TensorRT resolve the output
shapes, copies inputs in and outputs out through device buffers that only grow (nothing is
allocated on the hot path once the largest shapes have been seen). TensorRT and cuda-python are
imported when the backend is loaded; without them it fails with what to install.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ferry.errors import FerryError
from ferry.graph_spec import GraphSpec
from ferry.runtime.backends.base import Feed, GraphBackend, register_backend
from ferry.runtime.bundle import Bundle
from ferry.runtime.engine_sidecar import EngineSidecar, Platform, engine_paths, mismatch

INSTALL_HINT = ("install TensorRT and cuda-python on a machine with an NVIDIA GPU "
                "(`pip install tensorrt cuda-python`), or use --backend onnxruntime")


def import_tensorrt(needed_for: str = "the tensorrt backend", hint: str = INSTALL_HINT):
    """(tensorrt, cudart) modules, or a FerryError saying what is missing."""
    try:
        import tensorrt
    except ImportError as exc:
        raise FerryError(f"{needed_for} needs TensorRT ({exc}); {hint}") from exc
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python before 12.6
        except ImportError as exc:
            raise FerryError(f"{needed_for} needs cuda-python ({exc}); {hint}") from exc
    return tensorrt, cudart


def cuda_call(cudart, result):
    """Unwrap a cuda-python `(err, *values)` result; a CUDA error becomes a FerryError."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        raise FerryError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else tuple(values)


def current_platform(tensorrt, cudart, device: int = 0) -> Platform:
    """The installed TensorRT version and the GPU `device`."""
    props = cuda_call(cudart, cudart.cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return Platform(tensorrt_version=tensorrt.__version__, gpu_name=name.rstrip("\x00"),
                    compute_capability=f"{props.major}.{props.minor}")


class DeviceBuffer:
    """A device allocation that grows to the largest size asked for and is then reused."""

    def __init__(self, cudart) -> None:
        self.cudart = cudart
        self.pointer = 0
        self.capacity = 0

    def reserve(self, nbytes: int) -> int:
        if nbytes > self.capacity:
            self.release()
            self.pointer = cuda_call(self.cudart, self.cudart.cudaMalloc(max(nbytes, 1)))
            self.capacity = nbytes
        return self.pointer

    def release(self) -> None:
        if self.pointer:
            cuda_call(self.cudart, self.cudart.cudaFree(self.pointer))
        self.pointer, self.capacity = 0, 0


class TensorRTGraph(GraphBackend):
    """One engine: an execution context, a stream and a device buffer per I/O tensor. Calls are
    serialised by a lock (an execution context runs one inference at a time)."""

    def __init__(self, spec: GraphSpec, engine, tensorrt, cudart) -> None:
        super().__init__(spec)
        self.engine = engine
        self.trt = tensorrt
        self.cudart = cudart
        self.context = None
        self.stream = None
        self.buffers: dict[str, DeviceBuffer] = {}
        self.lock = threading.Lock()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        missing = set(spec.input_names + spec.output_names) - set(names)
        if missing:
            raise FerryError(f"engine for {spec.name} lacks tensors {sorted(missing)}; rebuild "
                             "it with `ferry export tensorrt BUNDLE`")
        self.dtypes = {name: np.dtype(tensorrt.nptype(engine.get_tensor_dtype(name)))
                       for name in names}

    def activate(self) -> None:
        if self.context is None:
            self.context = self.engine.create_execution_context()
            self.stream = cuda_call(self.cudart, self.cudart.cudaStreamCreate())

    def deactivate(self) -> None:
        for buffer in self.buffers.values():
            buffer.release()
        self.buffers.clear()
        if self.stream is not None:
            cuda_call(self.cudart, self.cudart.cudaStreamDestroy(self.stream))
        self.context, self.stream = None, None

    def _buffer(self, name: str, nbytes: int) -> int:
        return self.buffers.setdefault(name, DeviceBuffer(self.cudart)).reserve(nbytes)

    def _infer(self, feed: Feed) -> Feed:
        with self.lock:
            self.activate()
            return self._run(feed)

    def _run(self, feed: Feed) -> Feed:
        cudart, context = self.cudart, self.context
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        staged = []  # host arrays must outlive the asynchronous copies
        for name in self.spec.input_names:
            array = np.ascontiguousarray(feed[name], dtype=self.dtypes[name])
            staged.append(array)
            context.set_input_shape(name, array.shape)
            pointer = self._buffer(name, array.nbytes)
            context.set_tensor_address(name, pointer)
            cuda_call(cudart, cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes,
                                                     to_device, self.stream))
        unresolved = context.infer_shapes()
        if unresolved:
            raise FerryError(f"engine {self.spec.name}: TensorRT cannot resolve the shapes of "
                             f"{list(unresolved)} from the inputs given")
        outputs = {}
        for name in self.spec.output_names:
            shape = tuple(context.get_tensor_shape(name))
            outputs[name] = np.empty(shape, dtype=self.dtypes[name])
            context.set_tensor_address(name, self._buffer(name, outputs[name].nbytes))
        if not context.execute_async_v3(self.stream):
            raise FerryError(f"engine {self.spec.name}: TensorRT execution failed")
        for name, array in outputs.items():
            cuda_call(cudart, cudart.cudaMemcpyAsync(array.ctypes.data, self.buffers[name].pointer,
                                                     array.nbytes, to_host, self.stream))
        cuda_call(cudart, cudart.cudaStreamSynchronize(self.stream))
        return {name: array.astype(np.float32, copy=False) if array.dtype.kind == "f" else array
                for name, array in outputs.items()}


def default_engine_dir(bundle: Bundle) -> Path:
    return bundle.path / "tensorrt"


@register_backend("tensorrt")
def load_tensorrt(bundle: Bundle, *, precision: str = "fp32", engine_dir: str | None = None,
                  device: int = 0) -> dict[str, GraphBackend]:
    """Deserialise every graph's engine (built by `ferry export tensorrt BUNDLE --precision
    PRECISION`) after checking its sidecar against the installed TensorRT, the GPU and the
    bundle's graph checksum; a mismatch is refused with the reason and the rebuild command."""
    tensorrt, cudart = import_tensorrt()
    cuda_call(cudart, cudart.cudaSetDevice(device))
    platform = current_platform(tensorrt, cudart, device)
    directory = Path(engine_dir) if engine_dir else default_engine_dir(bundle)
    runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
    rebuild = f"`ferry export tensorrt {bundle.path} --precision {precision}`"
    graphs: dict[str, GraphBackend] = {}
    for name, spec in bundle.graphs.items():
        plan, sidecar_path = engine_paths(directory, name, precision)
        if not plan.is_file():
            raise FerryError(f"no {precision} TensorRT engine for graph {name} in {directory}; "
                             f"build them with {rebuild}")
        sidecar = EngineSidecar.read(sidecar_path)
        reason = mismatch(sidecar, platform,
                          bundle.graph_checksum(bundle.graph_file(name, precision)))
        if reason:
            raise FerryError(f"engine {plan} cannot run here: {reason}; rebuild with {rebuild}")
        data = plan.read_bytes()
        if not sidecar.matches_plan(data):
            raise FerryError(f"engine {plan} does not match the checksum in its sidecar "
                             f"(modified or truncated); rebuild with {rebuild}")
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise FerryError(f"TensorRT {platform.tensorrt_version} could not deserialise "
                             f"{plan}; rebuild with {rebuild}")
        graphs[name] = TensorRTGraph(spec, engine, tensorrt, cudart)
    return graphs
