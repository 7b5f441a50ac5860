"""Reading a bundle: the self-describing, self-verifying directory that `ferry export` writes.

    bundle/
      manifest.json      format + version, model config, special ids, graph specs, producer
                         versions, sha256 of every other file
      tokenizer.json     Hugging Face tokenizers format
      encoder.onnx, decoder_init.onnx, decoder_step.onnx   (encoder-decoder)
      decoder_init.onnx, decoder_step.onnx                 (decoder-only language model)
      lm.onnx and/or head.onnx                             (encoder-only; task heads)
      <graph>.<precision>.onnx, <graph>.onnx.data          (variants; weights over 2 GB)
      model.safetensors  weights for the torch reference backend
      golden.npz         fixed inputs and fp32 torch outputs, to verify any backend anywhere

Opening a bundle checks the format version and every file's checksum before anything runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import FerryError
from ferry.files import sha256_file
from ferry.graph_spec import GraphSpec

FORMAT_NAME = "ferry-bundle"
# 2: model options of imported families, `decoder_start` among the special ids, generation
# defaults; version 1 bundles read as before (decoder start = bos, no defaults)
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class Bundle:
    """An opened, verified bundle directory."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> Bundle:
        """Read `path/manifest.json`, check format and version, and verify every checksum."""
        path = Path(path)
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
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FerryError(
                f"{manifest_path} is not valid JSON ({exc}); re-export the bundle"
            ) from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise FerryError(f"{manifest_path} is not a {FORMAT_NAME} manifest")
        version = manifest.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise FerryError(
                f"{path} has bundle format version {version!r}; this ferry reads versions "
                f"{list(SUPPORTED_FORMAT_VERSIONS)}: re-export it or upgrade ferry"
            )
        bundle = cls(path=path, manifest=manifest)
        if verify:
            bundle.verify_checksums()
        return bundle

    def verify_checksums(self) -> None:
        """Recompute the sha256 of every listed file; refuse a missing or modified one by name.

        Every file the manifest points to (graphs, tokenizer, weights, golden) must be listed.
        """
        files = self.manifest.get("files")
        if not isinstance(files, dict):
            raise FerryError(f"{self.path / MANIFEST_FILE} lists no file checksums; "
                             "re-export the bundle")
        referenced = set(self.manifest.get("roles", {}).values())
        for variant in self.manifest.get("variants", {}).values():
            referenced |= set(variant.get("graphs", {}).values())
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

    @property
    def model_config(self) -> dict:
        return self.manifest["model"]

    @property
    def special_ids(self) -> dict[str, int]:
        return self.manifest["special_ids"]

    @property
    def graphs(self) -> dict[str, GraphSpec]:
        return {name: GraphSpec.from_dict(g) for name, g in self.manifest["graphs"].items()}

    @property
    def precisions(self) -> list[str]:
        """fp32 and the variants the bundle carries."""
        return ["fp32", *self.manifest.get("variants", {})]

    def graph_file(self, graph: str, precision: str = "fp32") -> Path:
        """The ONNX file of `graph` in `precision`."""
        if precision == "fp32":
            return self.file(graph)
        variants = self.manifest.get("variants", {})
        if precision not in variants:
            raise FerryError(f"bundle {self.path} has no {precision} variant; it has "
                             f"{self.precisions} (add one with `ferry export onnx … "
                             f"--precision fp32,{precision}`)")
        return self.path / variants[precision]["graphs"][graph]

    def file(self, role: str) -> Path:
        """The path of a file by role: 'tokenizer', 'weights', 'golden' or a graph name."""
        names = {**self.manifest.get("roles", {})}
        if role not in names:
            raise FerryError(f"bundle {self.path} has no {role!r} file; it lists {sorted(names)}")
        return self.path / names[role]
