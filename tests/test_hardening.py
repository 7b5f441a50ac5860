"""Hardening: a bundle cannot reach outside itself, every bad input is one line (exit 2) with the
file tree untouched, and no interruption loses the way back.

The tables below are the cases tried; every row asserts exit status 2, exactly one line
starting `error:`, no traceback, and (for the CLI) the file tree before and after unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import ferry.runtime
from ferry.cli import main
from ferry.errors import FerryError
from ferry.files import recover_directory
from ferry.runtime import Bundle
from ferry.runtime.bundle import MANIFEST_FILE
from ferry.runtime.engine_sidecar import engine_paths
from ferry.runtime.onnx_scan import external_data_locations


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time (what 'unchanged' means)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST_FILE).read_text())


def write_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- a bundle is untrusted


def _outside(tmp_path: Path) -> Path:
    secret = tmp_path / "outside.txt"
    secret.write_text("not the bundle's")
    return secret


def traversal_role(bundle, secret):
    manifest = manifest_of(bundle)
    manifest["roles"]["tokenizer"] = os.path.relpath(secret, bundle)
    manifest["files"][manifest["roles"]["tokenizer"]] = sha256(secret)
    write_manifest(bundle, manifest)


def absolute_file(bundle, secret):
    manifest = manifest_of(bundle)
    manifest["files"][str(secret)] = sha256(secret)
    write_manifest(bundle, manifest)


def symlinked_graph(bundle, secret):
    (bundle / "encoder.onnx").unlink()
    (bundle / "encoder.onnx").symlink_to(secret)
    manifest = manifest_of(bundle)
    manifest["files"]["encoder.onnx"] = sha256(secret)
    write_manifest(bundle, manifest)


def traversal_variant(bundle, secret):
    manifest = manifest_of(bundle)
    manifest["variants"]["int8"] = {"graphs": {"encoder": "../../x.onnx"}}
    write_manifest(bundle, manifest)


MALICIOUS = {
    "tokenizer role ../ outside": (traversal_role, "a path outside the bundle"),
    "absolute path in files": (absolute_file, "a path outside the bundle"),
    "graph symlinked outside": (symlinked_graph, "leads outside the bundle"),
    "variant graph ../": (traversal_variant, "a path outside the bundle"),
}


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_a_bundle_cannot_reach_outside_itself(bundle_copy, tmp_path, case, monkeypatch):
    secret = _outside(tmp_path)
    edit, message = MALICIOUS[case]
    edit(bundle_copy, secret)
    opened = []
    real_open = open

    def watching_open(file, *args, **kwargs):
        opened.append(Path(file).resolve() if isinstance(file, str | Path) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watching_open)
    with pytest.raises(FerryError, match=message):
        Bundle.open(bundle_copy)
    assert secret.resolve() not in opened  # refused before any outside file is read
    monkeypatch.undo()
    one_error_line(CliRunner().invoke(main, ["verify", str(bundle_copy)]))


def test_a_refused_bundle_does_not_reveal_whether_an_outside_file_exists(bundle_copy,
                                                                         tmp_path):
    secret = _outside(tmp_path)
    messages = []
    for target in (secret, tmp_path / "absent.txt"):
        manifest = manifest_of(bundle_copy)
        manifest["roles"]["tokenizer"] = os.path.relpath(target, bundle_copy)
        manifest["files"][manifest["roles"]["tokenizer"]] = "0" * 64
        write_manifest(bundle_copy, manifest)
        with pytest.raises(FerryError) as info:
            Bundle.open(bundle_copy)
        messages.append(str(info.value).replace(target.name, "X"))
    assert messages[0] == messages[1]


def _with_external_location(graph: Path, location: str) -> None:
    """Make `graph`'s first inline initializer read its bytes from `location` (external data;
    the large ones already read the bundle's shared weights file)."""
    model = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.HasField("raw_data"))
    raw = tensor.raw_data
    if "/" not in location:  # a data file inside the bundle (a traversal needs none)
        (graph.parent / location).write_bytes(raw)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("location", ["extra.data", "../extra.data"])
def test_every_file_a_graph_reads_must_be_listed_and_checksummed(bundle_copy, location):
    graph = bundle_copy / "encoder.onnx"
    _with_external_location(graph, location)
    assert external_data_locations(graph) == {location, "weights.onnx.data"}
    manifest = manifest_of(bundle_copy)
    manifest["files"]["encoder.onnx"] = sha256(graph)
    write_manifest(bundle_copy, manifest)
    with pytest.raises(FerryError, match=f"reads '{location}'.*does not list and checksum"):
        Bundle.open(bundle_copy)
    if "/" not in location:  # listed and checksummed, it is accepted (and loads)
        manifest["files"][location] = sha256(bundle_copy / location)
        write_manifest(bundle_copy, manifest)
        ferry.runtime.load(bundle_copy, "onnxruntime:fp32")


def test_external_data_is_found_in_nested_subgraph_attributes(tmp_path):
    """The scan reads tensors wherever ONNX can hold them: initializers, node attributes,
    subgraphs of attributes (an If branch's Constant)."""
    from onnx import helper, numpy_helper

    value = numpy_helper.from_array(np.ones(3, np.float32), "k")
    value.data_location = onnx.TensorProto.EXTERNAL
    entry = value.external_data.add()
    entry.key, entry.value = "location", "deep.data"
    branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=value)], "b", [],
                               [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [3])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch)], "g",
        [helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [3])])
    path = tmp_path / "m.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert external_data_locations(path) == {"deep.data"}
    path.write_bytes(b"\x0a\xff\xff\xff\xff\x0f")  # a field longer than the file
    with pytest.raises(FerryError, match="not a readable ONNX model"):
        external_data_locations(path)


def edit(path: str, value):
    """A manifest edit: set the field at a dotted `path` (list indices as numbers)."""
    def apply(manifest: dict) -> None:
        *parents, last = path.split(".")
        node = manifest
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is DELETE:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
    return apply


DELETE = object()
BAD_MANIFESTS = {
    "missing files": (edit("files", DELETE), "lacks files"),
    "graphs a list": (edit("graphs", []), "graphs must be dict"),
    "pad a string": (edit("special_ids.pad", "0"), r"special_ids.pad must be int or null"),
    "negative vocabulary": (edit("model.vocab_size", -1), r"model.vocab_size must be an integer"),
    "version a string": (edit("format_version", "2"), "format version '2'"),
    "giant batch range": (edit("graphs.encoder.dims.batch.max", 10**12),
                          r"graphs.encoder.dims.batch.max must be an integer in \[0, 1048576\]"),
    "giant fixed dim": (edit("graphs.decoder_step.inputs.0.shape", ["batch", 10**9]),
                        r"shape must be an integer in \[0, 1048576\]"),
    "unknown dtype": (edit("graphs.encoder.inputs.0.dtype", "object"), "dtype must be one of"),
    "undeclared input dim": (edit("graphs.encoder.inputs.0.shape", ["batch", "nope"]),
                             "fixed sizes or dims of"),
    "graph name with a slash": (lambda m: m["graphs"].update({"../x": m["graphs"]["encoder"]}),
                                "names of lowercase letters"),
    "checksum not hex": (lambda m: m["files"].update({"tokenizer.json": "abc"}),
                         "a sha256 hex digest"),
    "labels not strings": (edit("task", {"labels": [1, 2]}), "task.labels must be a list"),
    "chat template not text": (edit("chat_template", {"template": 5}),
                               r"chat_template must be \{template: a string"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_a_malformed_manifest_is_one_error_naming_the_field(bundle_copy, case):
    change, message = BAD_MANIFESTS[case]
    manifest = manifest_of(bundle_copy)
    change(manifest)
    write_manifest(bundle_copy, manifest)
    for call in (lambda: Bundle.open(bundle_copy), lambda: ferry.runtime.load(bundle_copy)):
        with pytest.raises(FerryError, match=message):
            call()
    for command in (["inspect", str(bundle_copy)], ["verify", str(bundle_copy)],
                    ["generate", str(bundle_copy), "5 March 2021"]):
        assert re.search(message, one_error_line(CliRunner().invoke(main, command)))


def test_a_golden_file_claiming_absurd_sizes_is_refused_before_allocating(bundle_copy):
    from ferry.runtime.parity import load_golden

    golden = bundle_copy / "golden.npz"
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)}
    np.lib.format.write_array_header_1_0(buffer, header)
    import zipfile

    with zipfile.ZipFile(golden, "w") as archive:
        archive.writestr("encoder/in/input_ids.npy", buffer.getvalue() + b"\0" * 16)
    with pytest.raises(FerryError, match="declares 1,000,000,000,000 values"):
        load_golden(golden)


def test_engines_symlinked_out_of_their_directory_are_refused(tmp_path):
    engines = tmp_path / "tensorrt"
    engines.mkdir()
    (engines / "encoder.fp16.plan").symlink_to(_outside(tmp_path))
    with pytest.raises(FerryError, match="leads outside"):
        engine_paths(engines, "encoder", "fp16")


# ---------------------------------------------------------------- every bad input is one line


def _config(date_data: Path, out: Path, **changes) -> dict:
    from conftest import tiny_train_config

    config = tiny_train_config(date_data, out, max_steps=2)
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (config.setdefault(section, {}) if section else config)[name] = value
    return config


CONFIG_CASES = {
    "batch_size 0": ({"optim.batch_size": 0}, "optim.batch_size must be ≥ 1"),
    "negative batch_size": ({"optim.batch_size": -4}, "optim.batch_size must be ≥ 1"),
    "one beta": ({"optim.betas": [0.9]}, "optim.betas must be two numbers"),
    "nan lr": ({"optim.lr": float("nan")}, "optim.lr must be a finite number > 0"),
    "device banana": ({"device": "banana"}, "device must be cpu, cuda or cuda:N"),
    "threads -1": ({"threads": -1}, "threads must be ≥ 0"),
    "unknown schedule": ({"optim.schedule": "wobbly"}, "optim.schedule must be one of"),
    "overrides not a mapping": ({"model.overrides": [1, 2]}, "model.overrides must be a mapping"),
    "vocab_size 0": ({"tokenizer.vocab_size": 0}, "tokenizer.vocab_size must be ≥"),
    "negative warmup": ({"optim.warmup_steps": -5}, "optim.warmup_steps must be ≥ 0"),
    "max_source_len 0": ({"data.max_source_len": 0}, "data.max_source_len must be ≥ 2"),
    "no eval data": ({"data.eval": ""}, "data.eval is empty"),
    "missing train file": ({"data.train": "nope.jsonl"}, "data.train: nope.jsonl does not exist"),
    "label smoothing 1": ({"optim.label_smoothing": 1.0}, "optim.label_smoothing must be in"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_bad_training_config_is_one_line_and_leaves_the_run_directory_alone(
        date_data, tmp_path, case):
    import yaml

    changes, message = CONFIG_CASES[case]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("the earlier run's config\n")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_config(date_data, run_dir, **changes)))
    before = tree(tmp_path)
    error = one_error_line(CliRunner().invoke(main, ["train", "finetune", "--config", str(path)]))
    assert message in error
    assert tree(tmp_path) == before


def test_a_failed_data_check_leaves_a_new_run_directory_absent(date_data, tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text("{not json\n")
    config = _config(date_data, tmp_path / "fresh")
    config["data"]["eval"] = str(bad)
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    one_error_line(CliRunner().invoke(main, ["train", "finetune", "--config", str(path)]))
    assert not (tmp_path / "fresh").exists()


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join(
            [f"*{chr(96 + i)}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    error = one_error_line(CliRunner().invoke(main, ["train", "finetune", "--config", str(path)]))
    assert "aliases" in error


def _unwritable_out(tmp_path: Path) -> list[str]:
    blocker = tmp_path / "a-file"
    if not blocker.exists():
        blocker.write_text("x")
    return ["--out", str(blocker / "bundle")]


CLI_CASES = {
    "opset 99": (lambda b, t: ["export", "onnx", str(b), "--out", str(t / "o"), "--opset", "99"],
                 "--opset"),
    "out is a file": (lambda b, t: ["export", "onnx", str(b), *_unwritable_out(t)],
                      "cannot read or write"),
    "demo steps 0": (lambda b, t: ["demo", "--workdir", str(t / "d"), "--steps", "0"],
                     "--steps"),
    "data dates -5": (lambda b, t: ["data", "dates", "--out", str(t / "x"), "--train", "-5"],
                      "--train"),
    "num_beams huge": (lambda b, t: ["generate", str(b), "hi", "--num-beams", "100000"],
                       "num_beams=100000"),
    "negative seed": (lambda b, t: ["generate", str(b), "hi", "--do-sample", "--seed", "-1"],
                      "seed=-1"),
    "zero new tokens": (lambda b, t: ["generate", str(b), "hi", "--max-new-tokens", "0"],
                        "max_new_tokens=0"),
    "unknown command": (lambda b, t: ["frobnicate"], "No such command"),
    "backend 5": (lambda b, t: ["generate", str(b), "hi", "--backend", "5"], "unknown backend"),
    "bench runs 0": (lambda b, t: ["bench", str(b), "--runs", "0"], "--runs"),
    "max-input-tokens without truncate": (
        lambda b, t: ["generate", str(b), "hi", "--max-input-tokens", "4"], "needs --truncate"),
    "answer on a generator": (lambda b, t: ["answer", str(b), "--question", "q", "--context",
                                            "c"], "encoder-decoder"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_bad_command_lines_are_one_line_and_write_nothing(tiny_bundle, tiny_run, tmp_path,
                                                          case):
    args, message = CLI_CASES[case]
    checkpoint = tiny_run.checkpoint
    target = checkpoint if args(tiny_bundle, tmp_path)[:2] == ["export", "onnx"] else tiny_bundle
    before, bundle_before = tree(tmp_path), tree(tiny_bundle)
    error = one_error_line(CliRunner().invoke(main, args(target, tmp_path)))
    assert message in error
    assert tree(tmp_path) == before and tree(tiny_bundle) == bundle_before


def test_plot_of_malformed_metrics_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for content in ('{"step": "one"}\n', '[1, 2]\n', '{"train_loss": 1.0}\n'):
        (run / "metrics.jsonl").write_text(content)
        assert "metrics.jsonl:1" in one_error_line(CliRunner().invoke(main, ["plot", str(run)]))
    assert not (run / "loss.png").exists()


def test_a_full_disk_is_one_line(tiny_run, tmp_path, monkeypatch):
    import errno

    import ferry.export.bundle_writer as writer

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer, "atomic_write_bytes", full)
    error = one_error_line(CliRunner().invoke(
        main, ["export", "onnx", str(tiny_run.checkpoint), "--out", str(tmp_path / "b"),
               "--precision", "fp32"]))
    assert "No space left on device" in error
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))


def test_a_closed_stdout_is_one_line_on_stderr(tiny_bundle):
    ferry_command = Path(sys.executable).with_name("ferry")
    done = subprocess.run(f"'{ferry_command}' inspect '{tiny_bundle}' >&-", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr


API_CASES = {
    "nested text lists": (lambda m: m.generate([["a", "b"]]), "texts must be a string or a list"),
    "a number as text": (lambda m: m.generate(5), "texts must be a string or a list"),
    "float ids": (lambda m: m.generate_ids(np.array([[5.7, 6.2]])), "input_ids must hold"),
    "mask of another shape": (lambda m: m.generate_ids(np.array([[5, 6]]), np.ones((1, 3), int)),
                              "attention_mask must be 1/0"),
    "num_beams huge": (lambda m: m.generate("hi", num_beams=10**6), "num_beams=1000000"),
    "negative seed": (lambda m: m.generate("hi", do_sample=True, seed=-1), "seed=-1"),
    "string max_new_tokens": (lambda m: m.generate("hi", max_new_tokens="5"),
                              "max_new_tokens='5'"),
    "truncation to 0": (lambda m: m.generate("hi", truncation=0), "truncation must be"),
    "stream of a list": (lambda m: list(m.stream(["a", "b"])), "stream takes one text"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_bad_python_arguments_are_one_error_naming_them(tiny_bundle, case):
    call, message = API_CASES[case]
    model = ferry.runtime.load(tiny_bundle)
    with pytest.raises(FerryError, match=message):
        call(model)


@pytest.mark.parametrize("backend, options, message", [
    (None, {}, "backend must be a name"),
    (5, {}, "backend must be a name"),
    ("onnxruntime", {"intra_op_threads": -1}, "intra_op_threads=-1: expected an integer ≥ 0"),
    ("onnxruntime", {"providers": "cpu"}, "providers='cpu'"),
    ("torch", {"device": "banana"}, "device must be cpu, cuda or cuda:N"),
    ("onnxruntime", {"io_binding": "yes"}, "io_binding='yes'"),
])
def test_bad_load_arguments_are_one_error_naming_them(tiny_bundle, backend, options, message):
    with pytest.raises(FerryError, match=message):
        ferry.runtime.load(tiny_bundle, backend, **options)
    with pytest.raises(FerryError, match="bundle must be a bundle directory"):
        ferry.runtime.load(5)


# ---------------------------------------------------------------- over-long inputs


def test_over_long_inputs_are_refused_by_index_or_truncated_as_asked(tiny_bundle):
    model = ferry.runtime.load(tiny_bundle)
    long = "5 March 2021 " * 100
    with pytest.raises(FerryError, match="input 1 is .* tokens long.*truncation=True"):
        model.generate(["5 March 2021", long], max_new_tokens=4)
    cut = model.codec.encode([long], truncation=True)[0]
    assert cut.shape[1] == model.codec.max_length
    assert model.codec.encode([long], truncation=10)[0].shape[1] == 10
    expected = model.generate_ids(cut, max_new_tokens=4)
    assert model.codec.decode(expected) == model.generate([long], truncation=True,
                                                          max_new_tokens=4)
    result = CliRunner().invoke(main, ["generate", str(tiny_bundle), long, "--truncate",
                                       "--max-input-tokens", "12", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- no interruption loses the way


KILLER = """
import os, shutil, sys
from pathlib import Path
import ferry.files as files

kill_at, out = int(sys.argv[1]), Path(sys.argv[2])
calls = [0]

def counted(function):
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os._exit(9)  # a SIGKILL: no handler, no clean-up runs
        return function(*args, **kwargs)
    return wrapper

os.rename, os.replace, shutil.rmtree = counted(os.rename), counted(os.replace), counted(
    shutil.rmtree)
with files.staged_directory(out) as staging:
    (staging / "content").write_text("new")
print("finished", calls[0])
"""


def test_a_kill_at_every_step_of_a_replacement_is_recovered(tmp_path):
    """Fault injection, not timing: the writer dies at each filesystem step of replacing a
    directory; the next caller finds the old content (died before the journal) or the new one
    (after), and nothing left behind."""
    steps = None
    for kill_at in range(1, 10):
        out = tmp_path / f"kill{kill_at}" / "bundle"
        out.mkdir(parents=True)
        (out / "content").write_text("old")
        done = subprocess.run([sys.executable, "-c", KILLER, str(kill_at), str(out)],
                              capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            steps = kill_at - 1
            break
        assert done.returncode == 9, done.stderr
        recover_directory(out)
        content = (out / "content").read_text()
        assert content in ("old", "new"), kill_at
        assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"], kill_at
    assert steps is not None and steps >= 4  # rmtree, journal, 2 renames, rmtree at least


def test_an_interrupted_export_is_finished_by_the_next_load(tiny_run, tiny_bundle, tmp_path):
    """The bundle path empty between the two renames of a re-export: `load` restores the
    new bundle (its journal says it was complete) and removes the old one."""
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    staging = tmp_path / f".bundle.staging-{2**22 + 7}-x"  # a writer PID that is not alive
    shutil.copytree(tiny_bundle, staging)
    (tmp_path / ".bundle.swap").write_text(f"{staging.name} {2**22 + 7}\n")
    out.rename(tmp_path / ".bundle.old")
    assert not out.exists()
    model = ferry.runtime.load(out)
    assert model.generate("5 March 2021", max_new_tokens=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_run_killed_mid_swap_of_best_keeps_a_best(tiny_run, tmp_path):
    from ferry.train.checkpointing import CheckpointManager

    run = Path(shutil.copytree(tiny_run.run_dir, tmp_path / "run", symlinks=True))
    manager = CheckpointManager(run, keep_last=3)
    best = run / "best"
    staging = run / f".best.staging-{2**22 + 9}-y"
    shutil.copytree(best, staging)
    (run / ".best.swap").write_text(f"{staging.name} {2**22 + 9}\n")
    best.rename(run / ".best.old")  # killed here: no best/ at all
    (run / f".best.staging-{2**22 + 11}-z").mkdir()  # an abandoned copy of a dead writer
    manager.recover()
    assert (best / "model.safetensors").is_file()
    assert not [p for p in run.iterdir() if p.name.startswith(".best")]
