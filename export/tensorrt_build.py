"""`ferry export tensorrt BUNDLE`: one TensorRT engine per graph, with a sidecar each.

Precision comes from the ONNX variant (`--precision fp16` builds `<graph>.fp16.onnx`) and the
network is strongly typed, so the same build works on TensorRT 10 and 11 (whose builder precision
flags are gone). Every dynamic input gets an optimisation profile from the graph spec's
min/opt/max ranges. The timing cache is kept in the engine directory and reused by later builds;
an engine whose sidecar still matches the installed TensorRT, the GPU and the bundle's graph is
kept, anything else is rebuilt. The static check (`tensorrt_check`) runs first, so an unbuildable
graph fails in a second, with the offending nodes named, not after minutes of building.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import FerryError
from ferry.export.tensorrt_check import check_bundle_for_tensorrt
from ferry.files import atomic_write_bytes
from ferry.graph_spec import GraphSpec
from ferry.runtime.backends.tensorrt import current_platform, default_engine_dir, import_tensorrt
from ferry.runtime.bundle import Bundle
from ferry.runtime.engine_sidecar import EngineSidecar, Platform, engine_paths, mismatch

TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class BuiltEngine:
    graph: str
    plan: Path
    status: str  # "built", "rebuilt (<why>)" or "up to date"
    seconds: float


def stale_reason(plan: Path, sidecar_path: Path, platform: Platform, onnx_sha256: str
                 ) -> str | None:
    """Why the engine at `plan` must be (re)built, or None when it can be kept."""
    if not plan.is_file() or not sidecar_path.is_file():
        return "no engine yet"
    try:
        sidecar = EngineSidecar.read(sidecar_path)
    except FerryError as exc:
        return str(exc)
    if not sidecar.matches_plan(plan.read_bytes()):
        return "the plan does not match its sidecar's checksum"
    return mismatch(sidecar, platform, onnx_sha256)


def build_engines(bundle: Bundle, *, precision: str = "fp32", engine_dir: str | Path | None = None,
                  workspace_gib: float = 8.0, rebuild: bool = False,
                  log: Callable[[str], None] = print) -> list[BuiltEngine]:
    """Build (or keep, when up to date) an engine for every graph of `bundle` in `precision`."""
    checks = check_bundle_for_tensorrt(bundle, precision)
    problems = [f"{c.file}: {p}" for c in checks for p in c.problems]
    if problems:
        raise FerryError(f"the {precision} graphs cannot be built by TensorRT: "
                         f"{'; '.join(problems[:3])}"
                         f"{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}; "
                         f"`ferry export tensorrt {bundle.path} --check --precision {precision}` "
                         "lists them all")
    trt, cudart = import_tensorrt(
        "building TensorRT engines",
        "install TensorRT and cuda-python on a machine with an NVIDIA GPU (`pip install tensorrt "
        "cuda-python`); `ferry export tensorrt BUNDLE --check` runs the static check without them")
    platform = current_platform(trt, cudart)
    directory = Path(engine_dir) if engine_dir else default_engine_dir(bundle)
    directory.mkdir(parents=True, exist_ok=True)
    log(f"building {precision} engines for TensorRT {platform.tensorrt_version} on "
        f"{platform.gpu_name} (compute capability {platform.compute_capability}) in {directory}")
    results = []
    for i, (name, spec) in enumerate(bundle.graphs.items(), start=1):
        onnx_path = bundle.graph_file(name, precision)
        onnx_sha256 = bundle.graph_checksum(onnx_path)  # its shared weights included
        plan, sidecar_path = engine_paths(directory, name, precision)
        reason = "rebuild requested" if rebuild else stale_reason(plan, sidecar_path, platform,
                                                                  onnx_sha256)
        if reason is None:
            log(f"[{i}/{len(bundle.graphs)}] {name}: up to date ({plan.name})")
            results.append(BuiltEngine(name, plan, "up to date", 0.0))
            continue
        log(f"[{i}/{len(bundle.graphs)}] {name}: building from {onnx_path.name} ({reason})")
        started = time.perf_counter()
        data = _build_plan(trt, onnx_path, spec, directory / TIMING_CACHE,
                           int(workspace_gib * (1 << 30)), log)
        seconds = time.perf_counter() - started
        atomic_write_bytes(plan, data)
        EngineSidecar(
            graph=name, precision=precision, platform=platform, onnx_file=onnx_path.name,
            onnx_sha256=onnx_sha256, plan_sha256=hashlib.sha256(data).hexdigest(),
            profiles={name: [list(shape) for shape in shapes]
                      for name, shapes in spec.profile_shapes(dynamic_only=True).items()},
            workspace_bytes=int(workspace_gib * (1 << 30)), build_seconds=round(seconds, 1),
        ).write(sidecar_path)
        log(f"[{i}/{len(bundle.graphs)}] {name}: {len(data) / 1e6:.1f} MB plan in {seconds:.0f}s")
        status = "built" if reason == "no engine yet" else f"rebuilt ({reason})"
        results.append(BuiltEngine(name, plan, status, seconds))
    return results


def _build_plan(trt, onnx_path: Path, spec: GraphSpec, timing_cache: Path, workspace: int,
                log: Callable[[str], None]) -> bytes:
    """Parse one ONNX graph into a strongly typed network and build its serialized engine,
    reading and updating the timing cache."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise FerryError(f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors[:3])}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in spec.profile_shapes(dynamic_only=True).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file()
                                       else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt, log)
    if monitor is not None:
        config.progress_monitor = monitor
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise FerryError(f"TensorRT failed to build an engine from {onnx_path.name} (see the "
                         "TensorRT messages above)")
    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def _progress_monitor(trt, log: Callable[[str], None]):
    """A TensorRT progress monitor logging the build's top-level phases (TensorRT ≥ 10)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class PhaseLog(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            if parent_phase is None:
                self.started[phase_name] = time.perf_counter()
                log(f"    {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name) -> None:
            if phase_name in self.started:
                log(f"    {phase_name} done in "
                    f"{time.perf_counter() - self.started.pop(phase_name):.0f}s")

    return PhaseLog()
