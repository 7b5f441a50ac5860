"""What a TensorRT engine was built for, kept beside it: TensorRT plans carry no user metadata and
only deserialise on the TensorRT version and GPU they were built with.

Layout, under a bundle's `tensorrt/` directory (or any engine directory):

    <graph>.<precision>.plan    the serialized engine
    <graph>.<precision>.json    its sidecar (this module)
    timing.cache                TensorRT's timing cache, reused by later builds

Pure Python: the builder writes sidecars, the `tensorrt` backend and the builder's up-to-date
check read them, and the matching rules are tested without TensorRT.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ferry.errors import FerryError
from ferry.files import atomic_write_bytes

SIDECAR_FORMAT = 1


@dataclass(frozen=True)
class Platform:
    """The TensorRT and GPU an engine is built for or run on."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class EngineSidecar:
    graph: str
    precision: str
    platform: Platform
    onnx_file: str
    onnx_sha256: str  # the bundle's checksum of the graph the engine was built from
    plan_sha256: str
    profiles: dict[str, list[list[int]]]  # input → [min, opt, max] shapes
    workspace_bytes: int
    build_seconds: float
    format: int = SIDECAR_FORMAT

    def matches_plan(self, plan: bytes) -> bool:
        """Whether `plan` is the engine this sidecar describes (not modified or truncated)."""
        return hashlib.sha256(plan).hexdigest() == self.plan_sha256

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def read(cls, path: Path) -> EngineSidecar:
        try:
            data = json.loads(path.read_text())
            data["platform"] = Platform(**data["platform"])
            return cls(**data)
        except FileNotFoundError as exc:
            raise FerryError(f"engine sidecar {path} is missing; rebuild the engines with "
                             "`ferry export tensorrt BUNDLE`") from exc
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise FerryError(f"engine sidecar {path} is malformed ({exc}); rebuild the engines "
                             "with `ferry export tensorrt BUNDLE`") from exc

    def write(self, path: Path) -> None:
        atomic_write_bytes(path, self.to_json())


def engine_paths(engine_dir: Path, graph: str, precision: str) -> tuple[Path, Path]:
    """(plan, sidecar) of one graph's engine in one precision; refused when either is a symlink
    leading out of the engine directory."""
    from ferry.runtime.bundle import inside

    stem = f"{graph}.{precision}"
    return (inside(engine_dir, f"{stem}.plan", "engine"),
            inside(engine_dir, f"{stem}.json", "engine sidecar"))


def mismatch(sidecar: EngineSidecar, platform: Platform, onnx_sha256: str) -> str | None:
    """Why an engine cannot serve on `platform` for the graph whose checksum is `onnx_sha256`,
    or None when it can. Plans are tied to the exact TensorRT version and to the GPU's compute
    capability; the GPU name is recorded but a different card of the same capability is
    accepted (TensorRT itself only warns)."""
    if sidecar.format != SIDECAR_FORMAT:
        return f"sidecar format {sidecar.format}, this ferry writes {SIDECAR_FORMAT}"
    if sidecar.onnx_sha256 != onnx_sha256:
        return (f"built from another {sidecar.onnx_file} (sha256 {sidecar.onnx_sha256[:12]}…, "
                f"the bundle's is {onnx_sha256[:12]}…): the bundle was re-exported")
    built, here = sidecar.platform, platform
    if built.tensorrt_version != here.tensorrt_version:
        return (f"built with TensorRT {built.tensorrt_version}, installed is "
                f"{here.tensorrt_version}")
    if built.compute_capability != here.compute_capability:
        return (f"built for {built.gpu_name} (compute capability {built.compute_capability}), "
                f"this GPU is {here.gpu_name} ({here.compute_capability})")
    return None
