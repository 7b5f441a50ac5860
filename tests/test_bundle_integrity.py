"""Opening a bundle verifies it: damaged, missing or foreign files are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import flip_byte

import ferry.runtime
from ferry.errors import FerryError
from ferry.runtime import Bundle
from ferry.runtime.bundle import MANIFEST_FILE, SUPPORTED_FORMAT_VERSIONS
from ferry.runtime.manifest import Manifest


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def delete(path: Path) -> None:
    path.unlink()


DAMAGES = [
    pytest.param(flip_byte, "decoder_step.onnx", id="flipped-byte-decoder_step"),
    pytest.param(truncate, "encoder.onnx", id="truncated-encoder"),
    pytest.param(delete, "tokenizer.json", id="deleted-tokenizer"),
]


def open_bundle(path):
    return Bundle.open(path)


def load_ort(path):
    return ferry.runtime.load(path, backend="onnxruntime")


def load_torch(path):
    return ferry.runtime.load(path, backend="torch")


OPENERS = [
    pytest.param(open_bundle, id="Bundle.open"),
    pytest.param(load_ort, id="load-onnxruntime"),
    pytest.param(load_torch, id="load-torch"),
]


def edit_manifest(bundle: Path, **changes) -> None:
    path = bundle / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest.update(changes)
    path.write_text(json.dumps(manifest), encoding="utf-8")


def test_intact_copy_opens(bundle_copy):
    """The baseline for the damage tests below: the undamaged copy opens and loads."""
    bundle = Bundle.open(bundle_copy)
    assert bundle.path == bundle_copy
    assert set(bundle.graphs) == {"encoder", "decoder_init", "decoder_step"}
    assert load_ort(bundle_copy).generate(["March 5, 2021"], max_new_tokens=4)


@pytest.mark.parametrize("opener", OPENERS)
@pytest.mark.parametrize("damage, name", DAMAGES)
def test_damaged_file_is_refused_by_name(damage, name, opener, bundle_copy):
    target = bundle_copy / name
    assert target.is_file()
    damage(target)
    with pytest.raises(FerryError) as excinfo:
        opener(bundle_copy)
    message = str(excinfo.value)
    assert name in message
    assert "\n" not in message


def test_damage_to_one_file_names_only_that_file(bundle_copy):
    flip_byte(bundle_copy / "decoder_step.onnx")
    with pytest.raises(FerryError) as excinfo:
        Bundle.open(bundle_copy)
    message = str(excinfo.value)
    for other in ("encoder.onnx", "decoder_init.onnx", "tokenizer.json", "golden.npz"):
        assert other not in message


def test_unsupported_format_version_lists_supported(bundle_copy):
    edit_manifest(bundle_copy, format_version=999)
    with pytest.raises(FerryError) as excinfo:
        Bundle.open(bundle_copy)
    message = str(excinfo.value)
    assert "999" in message
    assert str(list(SUPPORTED_FORMAT_VERSIONS)) in message
    with pytest.raises(FerryError):
        load_ort(bundle_copy)


def test_a_decoder_only_bundle_from_before_chunked_prefill_asks_to_be_re_exported(bundle_copy):
    """Format 2 decoder-only steps took one token and a mask over the cached positions only;
    other bundles of format 2 still load."""
    edit_manifest(bundle_copy, format_version=2)
    assert Bundle.open(bundle_copy).manifest.format_version == 2  # an encoder-decoder: loads
    manifest = json.loads((bundle_copy / MANIFEST_FILE).read_text(encoding="utf-8"))
    with pytest.raises(FerryError, match="format version 2.*re-export it"):
        Manifest.from_dict({**manifest, "architecture": "decoder-only"})


def test_foreign_format_is_refused(bundle_copy):
    edit_manifest(bundle_copy, format="some-other-format")
    with pytest.raises(FerryError, match="ferry-bundle"):
        Bundle.open(bundle_copy)


def test_directory_without_manifest(bundle_copy, tmp_path):
    (bundle_copy / MANIFEST_FILE).unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    for path in (bundle_copy, empty):
        with pytest.raises(FerryError) as excinfo:
            Bundle.open(path)
        assert MANIFEST_FILE in str(excinfo.value)
        with pytest.raises(FerryError):
            load_ort(path)


def test_plain_file_is_refused(tmp_path):
    path = tmp_path / "bundle.zip"
    path.write_bytes(b"PK\x03\x04 not a bundle")
    with pytest.raises(FerryError) as excinfo:
        Bundle.open(path)
    assert str(path) in str(excinfo.value)
    with pytest.raises(FerryError):
        load_ort(path)


def test_missing_path_is_refused(tmp_path):
    path = tmp_path / "no-such-bundle"
    with pytest.raises(FerryError) as excinfo:
        Bundle.open(path)
    assert str(path) in str(excinfo.value)
    with pytest.raises(FerryError):
        load_ort(path)
    assert not path.exists()


@pytest.mark.parametrize("content", [
    b"{not json",
    b"",
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    b"null",
], ids=["broken", "empty", "binary", "list", "null"])
def test_invalid_manifest_is_refused(content, bundle_copy):
    (bundle_copy / MANIFEST_FILE).write_bytes(content)
    with pytest.raises(FerryError) as excinfo:
        Bundle.open(bundle_copy)
    assert MANIFEST_FILE in str(excinfo.value)
    with pytest.raises(FerryError):
        load_ort(bundle_copy)
