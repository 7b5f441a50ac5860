"""The files an ONNX graph reads besides itself (external data), found without the onnx package.

A bundle is untrusted input: before a graph is handed to a runtime, every external-data location
it names must be a file the manifest lists (and checksums) inside the bundle. The runtime depends
on numpy and onnxruntime only, so this walks the protobuf wire format of the few messages that
can hold tensors (ModelProto → GraphProto / FunctionProto → initializers, nodes' attributes,
subgraphs) and reads each TensorProto's `external_data` entries; everything else is skipped by
length, never decoded. Field numbers are those of onnx.proto.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

from ferry.errors import FerryError

# (message, field number) pairs that lead to tensors; the value is the sub-message kind
_CHILDREN = {
    ("model", 7): "graph", ("model", 25): "function",
    ("function", 7): "node",
    ("graph", 1): "node", ("graph", 5): "tensor", ("graph", 15): "sparse",
    ("node", 5): "attribute",
    ("attribute", 5): "tensor", ("attribute", 6): "graph", ("attribute", 10): "tensor",
    ("attribute", 11): "graph", ("attribute", 22): "sparse", ("attribute", 23): "sparse",
    ("sparse", 1): "tensor", ("sparse", 2): "tensor",
}
_TENSOR_EXTERNAL_DATA, _ENTRY_KEY, _ENTRY_VALUE = 13, 1, 2
_MAX_DEPTH = 64  # nested subgraphs deeper than this are refused (a hostile file)


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return value, position
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, value) of one message: length-delimited values as views."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
        elif wire == 1:
            value, position = 0, position + 8
        elif wire == 5:
            value, position = 0, position + 4
        elif wire == 2:
            length, position = _varint(data, position)
            if position + length > len(data):
                raise ValueError("a field runs past the end of its message")
            value, position = data[position : position + length], position + length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _locations(data: memoryview, kind: str, depth: int) -> Iterator[str]:
    if depth > _MAX_DEPTH:
        raise ValueError("nesting too deep")
    for number, wire, value in _fields(data):
        if wire != 2:
            continue
        if kind == "tensor" and number == _TENSOR_EXTERNAL_DATA:
            entry = {n: bytes(v).decode("utf-8", "replace")
                     for n, w, v in _fields(value) if w == 2}
            if entry.get(_ENTRY_KEY) == "location":
                yield entry.get(_ENTRY_VALUE, "")
        elif (kind, number) in _CHILDREN:
            yield from _locations(value, _CHILDREN[kind, number], depth + 1)


def external_data_locations(path: str | Path) -> set[str]:
    """Every external-data `location` the ONNX model at `path` names (as written, unresolved)."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            data = memoryview(view)
            try:
                return set(_locations(data, "model", 0))
            finally:
                data.release()
    except (ValueError, OSError) as exc:
        raise FerryError(f"{path} is not a readable ONNX model ({exc})") from exc
