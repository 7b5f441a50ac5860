"""The backend contract: one backend object wraps one graph.

In the spirit of Polygraphy's runners: `infer(feed)` takes and returns name-keyed numpy arrays,
checks the feed against the graph spec, then calls the subclass's `_infer`. Backends are context
managers (`activate` / `deactivate`). Each backend kind registers a loader that opens every graph
of a bundle, so adding a backend never touches the generation code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from ferry.errors import FerryError
from ferry.graph_spec import GraphSpec
from ferry.runtime.cpu_threads import ThreadPlan

Feed = dict[str, np.ndarray]

# Outputs the generation loop only feeds back into the next graph call (KV caches, cross-attention
# K/V): backends that can keep them on their device return numpy-like device arrays for them.
DEVICE_RESIDENT = ("present_", "cross_")

MIN_CAPACITY = 64  # positions a fresh static KV cache holds; it doubles when full


def cache_capacity(needed: int, max_positions: int) -> int:
    """Positions to allocate for a static KV cache about to hold `needed` positions: twice that
    (so it is reallocated only log-many times), at least MIN_CAPACITY, at most the model's
    positions."""
    return min(max_positions, max(MIN_CAPACITY, 2 * needed))


GraphLoader = Callable[..., dict[str, "GraphBackend"]]  # (bundle, **options) → graphs by name

BACKENDS: dict[str, GraphLoader] = {}


def register_backend(name: str) -> Callable[[GraphLoader], GraphLoader]:
    """Decorator: register `loader(bundle, **options) -> {graph name: GraphBackend}` as `name`."""

    def decorate(loader: GraphLoader) -> GraphLoader:
        BACKENDS[name] = loader
        return loader

    return decorate


def check_feed(spec: GraphSpec, feed: Feed) -> None:
    """Names, dtypes, ranks and fixed sizes must match the spec; a symbolic dim must have one
    size across all inputs and lie within its declared range."""
    expected, given = set(spec.input_names), set(feed)
    if expected != given:
        raise FerryError(
            f"graph {spec.name}: expected inputs {sorted(expected)}, got {sorted(given)} "
            f"(missing {sorted(expected - given)}, unexpected {sorted(given - expected)})"
        )
    sizes: dict[str, int] = {}
    for tensor in spec.inputs:
        array = feed[tensor.name]
        # numpy arrays, or a backend's numpy-like device arrays (shape, dtype)
        if not hasattr(array, "shape") or np.dtype(getattr(array, "dtype", object)) != \
                np.dtype(tensor.dtype):
            found = getattr(array, "dtype", type(array).__name__)
            raise FerryError(f"graph {spec.name}: input {tensor.name} must be a {tensor.dtype} "
                             f"numpy array, got {found}")
        if array.ndim != len(tensor.shape):
            raise FerryError(f"graph {spec.name}: input {tensor.name} must have shape "
                             f"{list(tensor.shape)}, got {list(array.shape)}")
        for dim, size in zip(tensor.shape, array.shape):
            if isinstance(dim, int):
                if size != dim:
                    raise FerryError(f"graph {spec.name}: input {tensor.name} must have shape "
                                     f"{list(tensor.shape)}, got {list(array.shape)}")
            elif sizes.setdefault(dim, size) != size:
                raise FerryError(f"graph {spec.name}: dimension {dim} is {sizes[dim]} in one "
                                 f"input but {size} in {tensor.name}")
    for dim, size in sizes.items():
        bounds = spec.dims.get(dim)
        if bounds is not None and not bounds.min <= size <= bounds.max:
            raise FerryError(f"graph {spec.name}: dimension {dim}={size} is outside the "
                             f"supported range [{bounds.min}, {bounds.max}]")


class GraphBackend(ABC):
    """Runs one graph. Subclasses implement `_infer`, and `activate` / `deactivate` if needed."""

    precision = "fp32"  # which of the bundle's graphs (fp32 or a variant) a loader opened
    thread_plan: ThreadPlan | None = None  # a CPU session's threads and spinning

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec

    def infer(self, feed: Feed) -> Feed:
        """Check `feed` against the spec, run the graph, return outputs by name. The returned
        host arrays are the caller's: a backend hands out fresh arrays (or read-only ones), so
        the generation loop processes a step's logits in place."""
        check_feed(self.spec, feed)
        return self._infer(feed)

    @abstractmethod
    def _infer(self, feed: Feed) -> Feed:
        """Run the graph on a checked feed."""

    def activate(self) -> None:
        """Acquire resources (sessions, device memory); a no-op by default."""

    def deactivate(self) -> None:
        """Release what `activate` acquired; a no-op by default."""

    def __enter__(self) -> GraphBackend:
        self.activate()
        return self

    def __exit__(self, *exc_info) -> None:
        self.deactivate()


# Backend names that stand for a registered backend with options.
BACKEND_SHORTHANDS: dict[str, tuple[str, dict]] = {
    "onnxruntime-cuda": ("onnxruntime", {"providers": ["cuda"]}),
    "onnxruntime-tensorrt": ("onnxruntime", {"providers": ["tensorrt"]}),
    "torch-cuda": ("torch", {"device": "cuda"}),  # static KV cache by default on CUDA
    "torch-cuda-graphs": ("torch", {"device": "cuda", "static_cache": True,
                                    "compile": "reduce-overhead"}),
}


def parse_backend(spec: str) -> tuple[str, dict]:
    """`name[:precision]` (e.g. `onnxruntime`, `onnxruntime:int8`, `onnxruntime-cuda:fp16`,
    `tensorrt:fp16`) → (registered backend, loader options)."""
    if not isinstance(spec, str) or not spec.strip():
        raise FerryError(f"backend must be a name such as 'onnxruntime', 'onnxruntime:int8' or "
                         f"'torch', got {spec!r}")
    name, _, precision = spec.strip().partition(":")
    backend, options = BACKEND_SHORTHANDS.get(name, (name, {}))
    options = dict(options)
    if precision:
        options["precision"] = precision
    return backend, options


# Variants only ONNX Runtime's own kernels run: dynamic-quantised int8 (TensorRT's int8 needs QDQ
# graphs), weight-only int4 (`MatMulNBits`) and the fused graphs (com.microsoft contrib ops).
ONNX_RUNTIME_ONLY = {"int8", "int4", "fused"}


def every_backend(precisions: list[str]) -> list[str]:
    """Every `backend[:precision]` a bundle with these precisions could run on, the fp32 torch
    reference first (which of them this machine can load is for the loader to say)."""
    specs = ["torch", "torch-cuda"]
    for precision in precisions:
        suffix = f":{precision}"  # explicit: plain `onnxruntime` may pick the fused graphs
        specs += [f"onnxruntime{suffix}", f"onnxruntime-cuda{suffix}"]
        if precision not in ONNX_RUNTIME_ONLY:
            specs += [f"onnxruntime-tensorrt{suffix}", f"tensorrt{suffix}"]
    return specs


def backend_loader(name: str) -> GraphLoader:
    """The loader registered as `name`; an unknown name lists the known ones."""
    # Importing the modules registers them; their heavy dependencies load only when called.
    from ferry.runtime.backends import onnxruntime, tensorrt, torch  # noqa: F401

    if name not in BACKENDS:
        known = sorted([*BACKENDS, *BACKEND_SHORTHANDS])
        raise FerryError(f"unknown backend {name!r}; available: {', '.join(known)} "
                         "(optionally with :precision, e.g. onnxruntime:int8)")
    return BACKENDS[name]


class GraphSet:
    """A model made of graph backends (`self.graphs`): a context manager that activates them
    all on entry and releases them on `close` / exit."""

    graphs: dict[str, GraphBackend]

    def close(self) -> None:
        for graph in self.graphs.values():
            graph.deactivate()

    def __enter__(self):
        for graph in self.graphs.values():
            graph.activate()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
