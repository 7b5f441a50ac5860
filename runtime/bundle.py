"""Reading a bundle: the self-describing, self-verifying directory that `ferry export` writes.

    bundle/
      manifest.json      format + version, model config, special ids, graph specs, producer
                         versions, sha256 of every other file (`ferry.runtime.manifest`)
      tokenizer.json     Hugging Face tokenizers format
      encoder.onnx, decoder_init.onnx, decoder_step.onnx   (encoder-decoder)
      decoder_init.onnx, decoder_step.onnx                 (decoder-only language model)
      lm.onnx and/or head.onnx                             (encoder-only; task heads)
      <graph>.<precision>.onnx                             (variants)
      weights.onnx.data  every graph's weights, each distinct tensor once (external data)
      model.safetensors  weights for the torch reference backend
      golden.npz         fixed inputs and fp32 torch outputs, to verify any backend anywhere

A bundle is untrusted input. Opening one validates the manifest against its schema, checks that
every file it names is a plain path that stays inside the bundle (no `..`, no absolute path, no
symlink leaving it) before any file is opened, verifies every checksum, and checks that every
file a graph reads (external data) is one of the listed, checksummed files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ferry.errors import FerryError
from ferry.files import recover_directory, sha256_file
from ferry.graph_spec import GraphSpec
from ferry.runtime.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SUPPORTED_FORMAT_VERSIONS,
    Manifest,
)
from ferry.runtime.onnx_scan import external_data_locations

MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is kilobytes; refuse to parse a giant one

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "SUPPORTED_FORMAT_VERSIONS", "MANIFEST_FILE",
           "Bundle", "inside"]


def inside(root: Path, name: str, what: str) -> Path:
    """`root / name`, refused unless it resolves inside `root` (a symlink may point only at
    another file of the bundle). Checked before the file is opened."""
    path = root / name
    resolved, top = path.resolve(), root.resolve()
    if resolved != top and top not in resolved.parents:
        raise FerryError(f"{what} {name!r} of bundle {root} leads outside the bundle (to "
                         f"{resolved}); refusing to open it")
    return path


@dataclass(frozen=True)
class Bundle:
    """An opened, verified bundle directory."""

    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> Bundle:
        """Read and validate `path/manifest.json`, check every path it names stays inside the
        bundle, and verify every checksum and every graph's external data."""
        path = Path(path)
        try:  # an export interrupted mid-swap is finished (or undone) first
            recover_directory(path)
        except OSError as exc:  # e.g. a read-only location: usable as it is, if it is there
            if not path.exists():
                raise FerryError(f"bundle {path} was left mid-replacement by an interrupted "
                                 f"export and cannot be restored here ({exc}); re-export "
                                 "it") from exc
        if not path.exists():
            raise FerryError(f"bundle {path} does not exist; create one with `ferry export onnx`")
        if not path.is_dir():
            raise FerryError(f"{path} is not a bundle directory (a folder with {MANIFEST_FILE})")
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FerryError(
                f"{path} is not a ferry bundle: {MANIFEST_FILE} is missing "
                "(create a bundle with `ferry export onnx`)"
            )
        inside(path, MANIFEST_FILE, "the manifest")
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise FerryError(f"{manifest_path} is {manifest_path.stat().st_size:,} bytes, not a "
                             "manifest; re-export the bundle")
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise FerryError(
                f"{manifest_path} is not valid JSON ({exc}); re-export the bundle"
            ) from exc
        try:
            manifest = Manifest.from_dict(data)
        except FerryError as exc:
            raise FerryError(f"bundle {path}: {exc}") from exc
        bundle = cls(path=path, manifest=manifest)
        bundle.check_paths()
        if verify:
            bundle.verify_checksums()
        return bundle

    def check_paths(self) -> None:
        """Every file the manifest names resolves inside the bundle (before any is opened)."""
        manifest = self.manifest
        for role, name in manifest.roles.items():
            inside(self.path, name, f"roles.{role}")
        for precision, variant in manifest.variants.items():
            for graph, name in variant.graphs.items():
                inside(self.path, name, f"variants.{precision}.graphs.{graph}")
        for name in manifest.files:
            inside(self.path, name, "files entry")

    def verify_checksums(self) -> None:
        """Recompute the sha256 of every listed file; refuse a missing or modified one by name.

        Every file the manifest points to (graphs, tokenizer, weights, golden) and every file a
        graph reads (external data) must be listed.
        """
        files = self.manifest.files
        referenced = set(self.manifest.roles.values())
        for variant in self.manifest.variants.values():
            referenced |= set(variant.graphs.values())
        unlisted = sorted(referenced - set(files))
        if unlisted:
            raise FerryError(f"{self.path / MANIFEST_FILE} has no checksum for {unlisted}; "
                             "re-export the bundle")
        for name, expected in files.items():
            file = self.path / name
            if not file.is_file():
                raise FerryError(f"bundle {self.path} is missing {name}; re-export the bundle")
            if sha256_file(file) != expected:
                raise FerryError(
                    f"bundle file {file} does not match its checksum in {MANIFEST_FILE} "
                    "(modified or truncated); re-export the bundle"
                )
        graphs = [self.manifest.roles[g] for g in self.graphs] + [
            f for v in self.manifest.variants.values() for f in v.graphs.values()]
        for graph in graphs:
            folder = PurePosixPath(graph).parent
            for location in sorted(external_data_locations(self.path / graph)):
                if str(folder / location) not in files or ".." in PurePosixPath(location).parts:
                    raise FerryError(f"graph {graph} of bundle {self.path} reads {location!r}, "
                                     "which the manifest does not list and checksum; "
                                     "re-export the bundle")

    @property
    def model_config(self) -> dict:
        return self.manifest.model

    @property
    def special_ids(self) -> dict[str, int | None]:
        return self.manifest.special_ids

    @property
    def graphs(self) -> dict[str, GraphSpec]:
        return self.manifest.graphs

    @property
    def precisions(self) -> list[str]:
        """fp32 and the variants the bundle carries."""
        return ["fp32", *self.manifest.variants]

    def graph_file(self, graph: str, precision: str = "fp32") -> Path:
        """The ONNX file of `graph` in `precision`."""
        if precision == "fp32":
            return self.file(graph)
        variants = self.manifest.variants
        if precision not in variants:
            raise FerryError(f"bundle {self.path} has no {precision} variant; it has "
                             f"{self.precisions} (add one with `ferry export onnx … "
                             f"--precision fp32,{precision}`)")
        if graph not in variants[precision].graphs:
            raise FerryError(f"bundle {self.path}: the {precision} variant has no {graph!r} "
                             "graph; re-export the bundle")
        return self.path / variants[precision].graphs[graph]

    def graph_checksum(self, graph_file: Path) -> str:
        """The sha256 of a graph file of this bundle, combined with those of the external data
        files it reads (shared weights): what an engine built from it must match."""
        name = graph_file.relative_to(self.path).as_posix()
        folder = PurePosixPath(name).parent
        digests = [self.manifest.files[name]] + [
            self.manifest.files[str(folder / location)]
            for location in sorted(external_data_locations(graph_file))]
        if len(digests) == 1:  # weights inside the graph: its own checksum, as before
            return digests[0]
        return hashlib.sha256("".join(digests).encode()).hexdigest()

    def file(self, role: str) -> Path:
        """The path of a file by role: 'tokenizer', 'weights', 'golden' or a graph name."""
        names = self.manifest.roles
        if role not in names:
            raise FerryError(f"bundle {self.path} has no {role!r} file; it lists {sorted(names)}")
        return self.path / names[role]
