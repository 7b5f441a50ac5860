"""The `ferry` command: output of inspect/generate/verify/compare, exit status 1 on failed checks,
and exit status 2 with one `error:` line (no traceback) on bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ferry.cli import main
from ferry.runtime.bundle import MANIFEST_FILE

FERRY = Path(sys.executable).with_name("ferry")
GRAPH_NAMES = ["encoder", "decoder_init", "decoder_step"]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_bad_input(result) -> str:
    """Exit status 2, one stderr line starting with `error:`, no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- inspect


def test_inspect_prints_graphs(tiny_bundle):
    result = invoke("inspect", tiny_bundle)
    assert result.exit_code == 0, result.output
    for name in GRAPH_NAMES:
        assert f"graph {name}:" in result.stdout
    assert "ferry-bundle" in result.stdout
    assert "sha256 verified" in result.stdout


def test_inspect_json_is_the_manifest(tiny_bundle):
    result = invoke("inspect", tiny_bundle, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    assert sorted(data["graphs"]) == sorted(GRAPH_NAMES)


# ---------------------------------------------------------------- generate


def test_generate_json(tiny_bundle):
    result = invoke("generate", tiny_bundle, "March 5, 2021", "1 May 1999", "--json",
                    "--max-new-tokens", "16")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [row["input"] for row in data] == ["March 5, 2021", "1 May 1999"]
    assert all(isinstance(row["output"], str) for row in data)


def test_generate_text_prints_one_line_per_input(tiny_bundle):
    as_json = json.loads(invoke("generate", tiny_bundle, "March 5, 2021", "1 May 1999",
                                "--json").stdout)
    result = invoke("generate", tiny_bundle, "March 5, 2021", "1 May 1999")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [row["output"] for row in as_json]


def test_generate_torch_backend_agrees(tiny_bundle):
    texts = ["March 5, 2021", "12/25/1999", "5th of March, 2021"]
    outputs = {}
    for backend in ("onnxruntime", "torch"):
        result = invoke("generate", tiny_bundle, *texts, "--json", "--backend", backend)
        assert result.exit_code == 0, result.output
        outputs[backend] = [row["output"] for row in json.loads(result.stdout)]
    assert outputs["torch"] == outputs["onnxruntime"]


# ---------------------------------------------------------------- verify


def test_verify_passes(tiny_bundle):
    result = invoke("verify", tiny_bundle)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout


def test_verify_json(tiny_bundle):
    result = invoke("verify", tiny_bundle, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True
    assert report["candidate"] == "onnxruntime"
    assert report["sequences"] == report["identical_sequences"] > 0
    assert all(o["max_abs"] <= report["atol"] for o in report["outputs"])


# ---------------------------------------------------------------- compare


def test_compare_json_passes(tiny_bundle):
    result = invoke("compare", tiny_bundle, "--backends", "torch,onnxruntime", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["passed"] is True
    assert len(data["reports"]) == 1
    report = data["reports"][0]
    assert (report["reference"], report["candidate"]) == ("torch", "onnxruntime")
    assert report["token_agreement"] == 1.0
    assert report["sequences"] > 0
    graphs = {o["graph"] for o in report["outputs"]}
    assert graphs == set(GRAPH_NAMES)
    for output in report["outputs"]:
        assert isinstance(output["max_abs"], float) and isinstance(output["max_rel"], float)
        assert 0.0 <= output["max_abs"] <= report["atol"]
        assert output["max_rel"] >= 0.0
        assert output["passed"] is True


def test_compare_table(tiny_bundle):
    result = invoke("compare", tiny_bundle)
    assert result.exit_code == 0, result.output
    assert "parity PASS" in result.stdout


def perturb_weights(bundle: Path) -> str:
    """Change one decoder weight in model.safetensors and re-sign it in the manifest, so the
    checksums still verify but the torch backend no longer matches the ONNX graphs."""
    weights = bundle / "model.safetensors"
    state = load_file(str(weights))
    # a decoder FFN weight: only the decoder graphs use it (cross-attention K/V projections
    # would change the encoder graph's outputs instead)
    key = next(k for k in sorted(state)
               if k.startswith("decoder.") and ".ffn." in k and state[k].ndim == 2)
    generator = torch.Generator().manual_seed(0)
    state[key] = state[key] + 0.5 * torch.randn(state[key].shape, generator=generator)
    save_file(state, str(weights))
    manifest_path = bundle / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.safetensors"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return key


def test_compare_fails_when_backends_disagree(bundle_copy):
    perturb_weights(bundle_copy)
    assert invoke("inspect", bundle_copy).exit_code == 0  # the checksums still verify
    result = invoke("compare", bundle_copy, "--backends", "torch,onnxruntime", "--json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["passed"] is False
    report = data["reports"][0]
    assert report["passed"] is False
    failed = [o for o in report["outputs"] if not o["passed"]]
    assert failed
    assert all(o["max_abs"] > report["atol"] for o in failed)
    assert {o["graph"] for o in failed} == {"decoder_init", "decoder_step"}
    # the ONNX graphs are untouched, so onnxruntime still matches the golden outputs
    assert invoke("verify", bundle_copy).exit_code == 0
    # and the torch backend, now different, fails verification with status 1
    torch_result = invoke("verify", bundle_copy, "--backend", "torch", "--json")
    assert torch_result.exit_code == 1, torch_result.output
    assert json.loads(torch_result.stdout)["passed"] is False


def test_compare_table_fails_when_backends_disagree(bundle_copy):
    perturb_weights(bundle_copy)
    result = invoke("compare", bundle_copy)
    assert result.exit_code == 1, result.output
    assert "parity FAIL" in result.stdout


# ---------------------------------------------------------------- bad input → status 2


@pytest.mark.parametrize("command", ["inspect", "verify", "compare", "generate"])
def test_missing_bundle_path(command, tmp_path):
    missing = tmp_path / "no-bundle"
    args = [command, missing] + (["March 5, 2021"] if command == "generate" else [])
    line = assert_bad_input(invoke(*args))
    assert str(missing) in line


@pytest.mark.parametrize("command", ["inspect", "verify", "compare", "generate"])
def test_file_that_is_not_a_bundle(command, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a bundle")
    args = [command, path] + (["March 5, 2021"] if command == "generate" else [])
    line = assert_bad_input(invoke(*args))
    assert str(path) in line


def test_directory_that_is_not_a_bundle(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    line = assert_bad_input(invoke("inspect", tmp_path))
    assert MANIFEST_FILE in line


@pytest.mark.parametrize("command", ["generate", "verify"])
def test_unknown_backend(command, tiny_bundle):
    args = [command, tiny_bundle] + (["March 5, 2021"] if command == "generate" else [])
    line = assert_bad_input(invoke(*args, "--backend", "nope"))
    assert "nope" in line and "onnxruntime" in line


def test_compare_unknown_backend(tiny_bundle):
    line = assert_bad_input(invoke("compare", tiny_bundle, "--backends", "torch,nope"))
    assert "nope" in line


@pytest.mark.parametrize("backends", ["torch", "onnxruntime,", ""])
def test_compare_needs_two_backends(backends, tiny_bundle):
    assert_bad_input(invoke("compare", tiny_bundle, "--backends", backends))


def test_compare_same_backend_twice_is_not_a_passing_comparison(tiny_bundle):
    """`torch,torch` names one backend: comparing nothing must not report a parity pass."""
    result = invoke("compare", tiny_bundle, "--backends", "torch,torch", "--json")
    line = assert_bad_input(result)
    assert "torch" in line


def test_damaged_bundle_is_bad_input(bundle_copy):
    encoder = bundle_copy / "encoder.onnx"
    encoder.write_bytes(encoder.read_bytes()[:100])
    for args in (["inspect", bundle_copy], ["verify", bundle_copy],
                 ["generate", bundle_copy, "March 5, 2021"]):
        line = assert_bad_input(invoke(*args))
        assert "encoder.onnx" in line


def test_overlong_input_is_bad_input(tiny_bundle):
    text = " ".join(["March 5, 2021"] * 200)
    line = assert_bad_input(invoke("generate", tiny_bundle, text))
    assert "positions" in line


@pytest.mark.parametrize("config", [
    {"objective": "seq2seq", "bogus_key": 1},
    {"objective": "seq2seq", "optim": {"lr": 0.001, "bogus_key": 1}},
], ids=["top-level", "nested"])
def test_train_config_with_unknown_key(config, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    line = assert_bad_input(invoke("train", "finetune", "--config", path))
    assert "bogus_key" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_train_missing_config(tmp_path):
    missing = tmp_path / "missing.yaml"
    line = assert_bad_input(invoke("train", "finetune", "--config", missing))
    assert str(missing) in line


@pytest.mark.parametrize("kind", ["empty_dir", "other_dir", "missing"])
def test_export_non_checkpoint(kind, tmp_path):
    source = tmp_path / "source"
    if kind != "missing":
        source.mkdir()
    if kind == "other_dir":
        (source / "weights.bin").write_bytes(b"junk")
    out = tmp_path / "bundle"
    line = assert_bad_input(invoke("export", "onnx", source, "--out", out))
    assert str(source) in line
    assert not out.exists()


def test_export_refuses_nonempty_non_bundle_out(tiny_run, tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "important.txt").write_text("precious data\n")
    (out / "nested").mkdir()
    (out / "nested" / "more.bin").write_bytes(bytes(range(256)))
    before = snapshot(out)
    line = assert_bad_input(invoke("export", "onnx", tiny_run.checkpoint, "--out", out))
    assert str(out) in line
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


# ---------------------------------------------------------------- the real console script


@pytest.mark.parametrize("args", [
    pytest.param(["inspect", "{missing}"], id="missing-bundle"),
    pytest.param(["generate", "{bundle}", "March 5, 2021", "--backend", "nope"],
                 id="unknown-backend"),
])
def test_console_script_exit_status_2(args, tiny_bundle, tmp_path):
    assert FERRY.is_file()
    argv = [a.format(missing=tmp_path / "missing", bundle=tiny_bundle) for a in args]
    done = subprocess.run([str(FERRY), *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout


def test_console_script_success(tiny_bundle):
    done = subprocess.run([str(FERRY), "inspect", str(tiny_bundle), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["format"] == "ferry-bundle"


# ---------------------------------------------------------------- data


def test_data_dates_writes_both_files(tmp_path):
    out = tmp_path / "dates"
    result = invoke("data", "dates", "--out", out, "--train", "50", "--eval", "10")
    assert result.exit_code == 0, result.output
    counts = {}
    for split in ("train", "eval"):
        path = out / f"{split}.jsonl"
        assert path.is_file()
        assert str(path) in result.stdout
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert all(set(row) == {"source", "target"} for row in rows)
        counts[split] = len(rows)
    assert counts == {"train": 50, "eval": 10}
    train = {row["target"] for row in map(json.loads, (out / "train.jsonl").open())}
    held_out = {row["target"] for row in map(json.loads, (out / "eval.jsonl").open())}
    assert not train & held_out


def test_help_lists_every_registered_choice_and_its_docs_page():
    """The help texts name their choices by hand (the CLI loads without torch); they must not
    drift from the registries."""
    import re

    from ferry.runtime.backends.base import BACKEND_SHORTHANDS, backend_loader
    from ferry.train.objectives import all_objectives

    def help_text(*command: str) -> str:
        result = CliRunner().invoke(main, [*command, "--help"], terminal_width=1000)
        assert result.exit_code == 0, result.output
        return re.sub(r"\s+", " ", result.output)

    training = help_text("train", "pretrain") + help_text("train", "finetune")
    assert [n for n in all_objectives() if n not in training] == []
    assert "docs/training.md" in training
    backend_loader("torch")  # registers every backend
    from ferry.runtime.backends.base import BACKENDS

    generate = help_text("generate")
    assert [n for n in [*BACKENDS, *BACKEND_SHORTHANDS] if n not in generate] == []
    assert "docs/" in help_text()
