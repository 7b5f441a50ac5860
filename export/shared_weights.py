"""One copy of every weight: the graphs of a bundle keep their initializers in one shared file.

Each graph is exported on its own, so `decoder_init` and `decoder_step` each carry the whole
decoder, the tied embedding sits in the encoder and both decoder graphs, and the fused variant
repeats the fp32 weights byte for byte. `share_weights` moves every initializer of at least
`MIN_SHARED_BYTES` into `weights.onnx.data` (ONNX external data), each distinct tensor once (by
content), at `ALIGNMENT`-aligned offsets, and points every graph that holds it there; within a
graph, a tensor held twice (the exporter folds a transposed weight once per use, so layers
sharing their weights, ALBERT's, would each get a copy) becomes one initializer that every user
reads. The graphs stay plain ONNX: ONNX Runtime, TensorRT's parser and `onnx.load` read external
data beside the model file; the data file is listed and checksummed like every other file. A
graph's own `<graph>.onnx.data` (weights over protobuf's 2 GB) is folded in and removed.

Loaded, ONNX Runtime reads each session's weights from the file (prepacking its copy of each
matrix) and keeps no second, protobuf copy: the base preset's resident memory after `load`
falls from 630 to 396 MB (fp32) and from 350 to 114 MB (int8) (docs/bundle.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

SHARED_DATA = "weights.onnx.data"
MIN_SHARED_BYTES = 1024  # smaller tensors (shapes, scalars, norms of small models) stay inline
ALIGNMENT = 4096  # a page: lets ONNX Runtime map a tensor straight from the file


def _tensor_bytes(tensor: onnx.TensorProto, directory: Path) -> bytes:
    """A tensor's raw bytes, inline or from the external data file it names."""
    if not uses_external_data(tensor):
        return tensor.raw_data
    info = {entry.key: entry.value for entry in tensor.external_data}
    with open(directory / info["location"], "rb") as data:
        data.seek(int(info.get("offset", 0)))
        return data.read(int(info["length"])) if "length" in info else data.read()


def _point_to(tensor: onnx.TensorProto, offset: int, length: int) -> None:
    """Make `tensor` read its bytes from `SHARED_DATA` at `offset`."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", SHARED_DATA), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def _merge(graph: onnx.GraphProto, copies: dict[str, str]) -> None:
    """Drop the initializers `copies` names and point their users at the one each copies."""
    kept = [t for t in graph.initializer if t.name not in copies]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in graph.node:
        node.input[:] = [copies.get(name, name) for name in node.input]


def share_weights(directory: Path, graphs: list[str],
                  log: Callable[[str], None] = lambda message: None) -> Path:
    """Move the weights of `graphs` (file names in `directory`) into `directory/SHARED_DATA`,
    each distinct tensor once; rewrite the graphs to point there; delete the per-graph data
    files they read before. Tensors are streamed one at a time (an LLM's graphs never sit in
    memory whole). Returns the data file."""
    target = directory / SHARED_DATA
    offsets: dict[str, tuple[int, int]] = {}  # sha256 → (offset, length)
    stored = referenced = 0
    replaced: set[Path] = set()
    with open(target, "wb") as data:
        for name in graphs:
            path = directory / name
            model = onnx.load(str(path), load_external_data=False)
            first: dict[tuple, str] = {}  # (type, dims, sha256) → the initializer kept
            copies: dict[str, str] = {}  # initializer dropped → the one its users read now
            for tensor in model.graph.initializer:
                if not tensor.HasField("raw_data") and not uses_external_data(tensor):
                    continue  # typed fields (float_data, …): small constants
                if uses_external_data(tensor):
                    location = {e.key: e.value for e in tensor.external_data}["location"]
                    replaced.add(directory / location)
                raw = _tensor_bytes(tensor, directory)
                digest = hashlib.sha256(raw).hexdigest()
                key = (tensor.data_type, tuple(tensor.dims), digest)
                if key in first:  # the same tensor twice in one graph: a layer's weights
                    copies[tensor.name] = first[key]  # reused (ALBERT), folded per use
                    continue
                first[key] = tensor.name
                if len(raw) < MIN_SHARED_BYTES:
                    if uses_external_data(tensor):  # keep it, inline
                        del tensor.external_data[:]
                        tensor.data_location = onnx.TensorProto.DEFAULT
                        tensor.raw_data = raw
                    continue
                if digest not in offsets:
                    data.write(b"\0" * (-data.tell() % ALIGNMENT))
                    offsets[digest] = (data.tell(), len(raw))
                    data.write(raw)
                    stored += len(raw)
                referenced += len(raw)
                _point_to(tensor, offsets[digest][0], len(raw))
            _merge(model.graph, copies)
            onnx.save(model, str(path))
    for old in replaced - {target}:
        old.unlink(missing_ok=True)
    target.chmod(0o644)
    log(f"weights stored once: {referenced / 1e6:,.1f} MB held by {len(graphs)} graphs in "
        f"{stored / 1e6:,.1f} MB ({SHARED_DATA})")
    return target
