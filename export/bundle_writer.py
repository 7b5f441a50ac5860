"""Checkpoint → bundle, one fixed pipeline: load → export → validate → golden → manifest → install.

Everything is written into a staging directory beside the destination and moved into place only
when validation has passed, so a failed export never damages an existing bundle.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from safetensors.torch import save

import ferry
from ferry.errors import FerryError
from ferry.export.onnx_export import DEFAULT_OPSET, export_graph
from ferry.export.precision import GraphSource, variant
from ferry.export.precision import Variant as VariantRecipe
from ferry.export.shared_weights import share_weights
from ferry.files import atomic_write_bytes, sha256_file, staged_directory
from ferry.graph_spec import segment_count
from ferry.model import TransformerConfig, load_checkpoint
from ferry.model.graphs import GRAPH_MODULES, graph_specs
from ferry.runtime.backends.base import GraphBackend
from ferry.runtime.backends.onnxruntime import (
    OnnxRuntimeGraph,
    onnxruntime_graph,
    session_options,
)
from ferry.runtime.backends.torch import torch_graphs
from ferry.runtime.bundle import MANIFEST_FILE
from ferry.runtime.generation import greedy_generate
from ferry.runtime.manifest import FORMAT_VERSION, Manifest, Variant
from ferry.runtime.parity import (
    FP32_ATOL,
    FP32_RTOL,
    FeedSizes,
    ParityReport,
    compare_graphs,
    graph_feeds,
    is_generative,
    load_golden,
    verify_against_golden,
)
from ferry.runtime.special_ids import SpecialIds
from ferry.runtime.tokenization import TextCodec

GOLDEN_SIZES = FeedSizes(batch=3, src_len=9, tgt_len=4, past_len=5)
VALIDATION_SIZES = FeedSizes(batch=4, src_len=13, tgt_len=7, past_len=8)
GOLDEN_NEW_TOKENS = 32


def export_bundle(checkpoint: str | Path, out: str | Path, *, opset: int = DEFAULT_OPSET,
                  precisions: tuple[str, ...] = ("fp32",),
                  log: Callable[[str], None] = print) -> Path:
    """Export a training checkpoint to a verified ONNX bundle directory at `out`.

    Args:
        precisions: fp32 (always written) and the variants to add, e.g. ("fp32", "int8"); each
            variant is measured against the fp32 torch reference and must meet its tolerance.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    extra = [p for p in dict.fromkeys(precisions) if p != "fp32"]
    for precision in extra:
        variant(precision)  # unknown names fail before any work
    _check_destination(out)
    model, meta = load_checkpoint(checkpoint)
    tokenizer_path = checkpoint / "tokenizer.json"
    if not tokenizer_path.is_file() or "special_ids" not in meta:
        raise FerryError(f"{checkpoint} lacks tokenizer.json or special ids; export a checkpoint "
                         "written by `ferry train`")
    config = model.config
    task = meta.get("task") or {}
    specs = graph_specs(config, lm=task.get("lm"))
    if not specs:
        raise FerryError(f"{checkpoint} has nothing to serve: no task head and no language-model "
                         "head (a Hugging Face base model such as BertModel); fine-tune a task "
                         "on it first (`ferry train finetune … --set model.init_from=…`)")
    with staged_directory(out) as staging:
        roles: dict[str, str] = {}
        for i, (name, spec) in enumerate(specs.items(), start=1):
            log(f"[{i}/{len(specs)}] exporting {name} graph")
            export_graph(GRAPH_MODULES[name](model), spec, staging / f"{name}.onnx",
                         vocab_size=config.vocab_size, opset=opset)
            roles[name] = f"{name}.onnx"
        shutil.copyfile(tokenizer_path, staging / "tokenizer.json")
        atomic_write_bytes(staging / "model.safetensors",
                           save({k: v.contiguous() for k, v in model.state_dict().items()}))
        roles.update(tokenizer="tokenizer.json", weights="model.safetensors",
                     golden="golden.npz")

        reference = torch_graphs(model, specs)
        candidate = {name: OnnxRuntimeGraph(spec, ort.InferenceSession(
            str(staging / roles[name]), session_options(), providers=["CPUExecutionProvider"]))
            for name, spec in specs.items()}
        special = meta["special_ids"]
        log("validating ONNX Runtime against torch on padded inputs")
        validation = _validate(reference, candidate, config, special["pad"])
        del candidate  # its sessions hold a copy of every weight (GBs for an LLM): not needed
        # while the variants are made and measured, each with sessions of its own
        log("writing golden inputs and reference outputs")
        codec = TextCodec.from_file(tokenizer_path, pad_id=special["pad"],
                                    max_length=config.max_positions)
        _write_golden(staging / "golden.npz", reference, codec, meta, config)
        sources = {name: GraphSource(staging / roles[name], GRAPH_MODULES[name](model), spec,
                                     opset) for name, spec in specs.items()}
        made = {precision: _write_variant(staging, precision, sources, special, log)
                for precision in sorted(extra, key=lambda p: p != "fused")}  # int8 and int4
        variants = {precision: made[precision] for precision in extra}  # quantise fused graphs
        share_weights(staging, [roles[name] for name in specs] + [
            file for made_variant in variants.values() for file in made_variant.graphs.values()],
            log)

        manifest = Manifest(
            format_version=FORMAT_VERSION,
            architecture=config.architecture,
            model=config.to_dict(),
            special_ids=special,
            task=task,
            generation=meta.get("generation") or {},
            chat_template=meta.get("chat_template") or {},
            graphs=specs,
            roles=roles,
            variants=variants,
            opset=opset,
            producer={"ferry": ferry.__version__, "torch": torch.__version__,
                      "onnx": onnx.__version__, "onnxruntime": ort.__version__},
            validation=validation,
            source_checkpoint={"step": meta.get("step"), "metrics": meta.get("metrics"),
                               **({"imported_from": meta["source"]} if "source" in meta
                                  else {})},
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            files={p.name: sha256_file(p) for p in sorted(staging.iterdir())},
        )
        Manifest.from_dict(manifest.to_dict())  # what `load` will accept, checked here first
        atomic_write_bytes(staging / MANIFEST_FILE,
                           json.dumps(manifest.to_dict(), indent=2).encode())
    log(f"bundle written to {out}")
    return out


def _write_variant(staging: Path, precision: str, sources: dict[str, GraphSource],
                   special: dict[str, int], log: Callable[[str], None]) -> Variant:
    """Write `<graph>.<precision>.onnx` for every graph and measure it on the golden set (on the
    CPU, through its emulation where ONNX Runtime's CPU provider lacks its kernels). A variant
    made one way that misses its check is made again its fallback way, while it has one."""
    log(f"making the {precision} variant and checking it against the fp32 reference")
    made = variant(precision)
    while True:
        files, report = _write_and_measure(staging, made, sources, special)
        if report.passed:
            break
        failed = [f"{d.graph}/{d.output} ({d.describe()})" for d in report.diffs if not d.passed]
        why = (f"{'; '.join(failed[:3]) + '; ' if failed else ''}greedy tokens agree on "
               f"{report.token_agreement:.0%} of the golden inputs "
               f"(needed {report.min_token_agreement:.0%})")
        if made.fallback is None:
            raise FerryError(f"the {precision} variant fails its check: {why}")
        log(f"{precision} with {made.settings} misses its check ({why}); "
            f"making it with {made.fallback.settings}")
        made = made.fallback
    measured_on = "onnxruntime CPU" + (f" ({precision} emulated: fp32 arithmetic on "
                                       f"{precision}-rounded values)"
                                       if made.cpu_emulation else "")
    log(f"{precision}{f' ({made.settings})' if made.settings else ''}: {measured_on}; greedy "
        f"agreement {report.token_agreement:.0%}, "
        f"worst max |Δ| {max(d.max_abs for d in report.diffs):.2e}")
    return Variant(graphs=files, measured_on=measured_on, settings=made.settings,
                   token_agreement=report.token_agreement,
                   max_abs={f"{d.graph}/{d.output}": d.max_abs for d in report.diffs},
                   q99_abs={f"{d.graph}/{d.output}": d.q99_abs for d in report.diffs})


def _write_and_measure(staging: Path, made: VariantRecipe, sources: dict[str, GraphSource],
                       special: dict[str, int]) -> tuple[dict[str, str], ParityReport]:
    """Write every graph of the variant `made` (replacing an earlier try's) and measure them
    against the golden outputs; returns the graph files by name and the report."""
    precision = made.name
    files = {}
    for name, source in sources.items():
        files[name] = f"{name}.{precision}.onnx"
        for stale in staging.glob(f"{files[name]}*"):  # an earlier try's graph and weights
            stale.unlink()  # (ONNX's external-data writer appends to an existing file)
        made.make(source, staging / files[name])
        for written in staging.glob(f"{files[name]}*"):  # the graph and any weights file
            written.chmod(0o644)  # some writers create 0600 files; a bundle is world-readable
    graphs = {name: onnxruntime_graph(source.spec, made.cpu_session(staging / files[name],
                                                                    session_options()))
              for name, source in sources.items()}
    report = verify_against_golden(
        graphs, load_golden(staging / "golden.npz"), backend=f"onnxruntime {precision}",
        precision=precision,
        special=SpecialIds.from_ids(special))
    return files, report


def _check_destination(out: Path) -> None:
    """Refuse to replace anything but an earlier bundle."""
    if out.exists() and not out.is_dir():
        raise FerryError(f"--out {out} is a file; choose a directory for the bundle")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise FerryError(f"--out {out} is a non-empty directory that is not a ferry bundle; "
                         "choose an empty or new directory")


def _validate(reference: dict[str, GraphBackend], candidate: dict[str, GraphBackend],
              config: TransformerConfig, pad: int) -> dict:
    """ONNX Runtime vs torch on a padded batch; raises if any output is off by more than
    `FP32_ATOL` (or `FP32_RTOL` × its largest magnitude, where larger)."""
    feeds = graph_feeds(reference, sizes=VALIDATION_SIZES, vocab_size=config.vocab_size, pad=pad,
                        seed=1, segments=segment_count(config.to_dict()))
    diffs = compare_graphs(reference, candidate, feeds, FP32_ATOL)
    failed = [d for d in diffs if not d.passed]
    if failed:
        worst = max(failed, key=lambda d: d.max_abs)
        raise FerryError(f"export validation failed: {worst.graph}/{worst.output} differs from "
                         f"torch by {worst.max_abs:.2e} (> {FP32_ATOL:.0e}, and > "
                         f"{FP32_RTOL:.0e} × its largest magnitude)")
    return {"atol": FP32_ATOL,
            "max_abs": {f"{d.graph}/{d.output}": d.max_abs for d in diffs}}


def _write_golden(path: Path, reference: dict[str, GraphBackend], codec: TextCodec, meta: dict,
                  config: TransformerConfig) -> None:
    """golden.npz: per graph, fixed inputs and torch outputs; plus greedy generations for
    encoder-decoder models.

    Keys: `<graph>/in/<tensor>`, `<graph>/out/<tensor>`, `generation/<input_ids|attention_mask|
    output_ids>`. Loaded with `allow_pickle=False`.
    """
    special = meta["special_ids"]
    feeds = graph_feeds(reference, sizes=GOLDEN_SIZES, vocab_size=config.vocab_size,
                        pad=special["pad"], seed=0, segments=segment_count(config.to_dict()))
    arrays: dict[str, np.ndarray] = {}
    for graph, feed in feeds.items():
        arrays.update({f"{graph}/in/{k}": v for k, v in feed.items()})
        arrays.update({f"{graph}/out/{k}": v for k, v in reference[graph].infer(feed).items()})
    if is_generative(reference):
        arrays.update(_golden_generations(reference, feeds, codec, meta))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _golden_generations(reference: dict[str, GraphBackend], feeds: dict, codec: TextCodec,
                        meta: dict) -> dict[str, np.ndarray]:
    """Greedy generations of the checkpoint's held-out samples (else of the golden sources or
    prompts) by the torch reference."""
    special = meta["special_ids"]
    samples = meta.get("samples") or []
    if samples:
        input_ids, mask = codec.encode(samples)
    else:
        first = feeds["encoder" if "encoder" in feeds else "decoder_init"]
        input_ids, mask = first["input_ids"], first["attention_mask"]
    output_ids = greedy_generate(
        reference, input_ids, mask, max_new_tokens=GOLDEN_NEW_TOKENS,
        special=SpecialIds.from_ids(special))
    return {"generation/input_ids": input_ids, "generation/attention_mask": mask,
            "generation/output_ids": output_ids}
