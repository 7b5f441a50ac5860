"""Which of a bundle's fp32 graph variants runs fastest on this CPU: measured the first time the
bundle loads on a machine, recorded, and used by every later load.

A bundle exported for CPUs carries its fp32 weights twice: the portable graphs (standard ONNX
ops, what every backend runs) and the fused ones (ONNX Runtime's attention / layer-norm kernels,
the decoder step writing its cache in place). Both meet the same tolerance; which is faster
depends on the CPU and its ISA — on a 2-core Xeon with AMX the fused graphs won by 3 % (batch 1)
and 10 % (batch 16), on a 2-core AMD EPYC the portable ones by 4–8 % — so no fixed default is the
fastest everywhere. `fastest_model` times both on a short forced-length generation (or a
single pass, for encoder-only bundles) at batch 1 and 8, in alternating rounds, and keeps the
faster; the choice is recorded per machine (CPU model and flags, threads, spinning, ONNX Runtime
version) and bundle (its manifest's file checksums) in `cpu_variants.json` under the cache directory
(`FERRY_CACHE_DIR`, else `$XDG_CACHE_HOME/ferry`, else `~/.cache/ferry`).

`FERRY_CPU_VARIANT=fused` (or `fp32`) pins a variant without measuring; `ferry tune` measures
again and prints the timings.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
import statistics
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ferry.errors import FerryError
from ferry.files import atomic_write_bytes
from ferry.runtime.bundle import Bundle
from ferry.runtime.cpu_threads import thread_plan

CANDIDATES = ("fused", "fp32")  # the first wins ties (no per-step cache copy)
PIN_VARIABLE = "FERRY_CPU_VARIANT"
RECORD_FILE = "cpu_variants.json"
BATCHES = (1, 8)  # a latency-bound and a throughput-bound batch
NEW_TOKENS = 16  # generated per timed call (EOS held back)
SOURCE_LENGTH = 32  # tokens per source / prompt / encoder input
ROUNDS = 3  # timed calls per variant and batch, alternating variants; medians compared

_lock = threading.Lock()  # one measurement at a time in this process (they would disturb each
# other) and one read-modify-write of the record


@dataclass(frozen=True)
class VariantTiming:
    """What a measurement found: the median seconds per call of each variant at each batch
    (same order as `batches`), and the variant chosen."""

    chosen: str
    batches: tuple[int, ...]
    seconds: dict[str, list[float]]
    machine: str
    measured: str  # ISO date and time

    def speedup(self) -> float:
        """How much faster the chosen variant was than the other (geometric mean over
        batches)."""
        other = next(v for v in self.seconds if v != self.chosen)
        ratios = [o / c for o, c in zip(self.seconds[other], self.seconds[self.chosen],
                                        strict=True)]
        return math.exp(statistics.fmean(math.log(r) for r in ratios))


def cache_directory() -> Path:
    """Where ferry records what it measured on this machine."""
    if os.environ.get("FERRY_CACHE_DIR"):
        return Path(os.environ["FERRY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ferry"


def pinned_variant() -> str | None:
    """The variant `FERRY_CPU_VARIANT` pins, if set; refused unless it is a candidate."""
    pinned = os.environ.get(PIN_VARIABLE, "").strip()
    if not pinned:
        return None
    if pinned not in CANDIDATES:
        raise FerryError(f"{PIN_VARIABLE}={pinned!r}: expected one of {list(CANDIDATES)} "
                         "(or unset it to measure which is faster)")
    return pinned


@functools.cache
def machine_key(threads: int, spinning: bool) -> str:
    """The machine as it matters to the choice: CPU model and speed flags, threads, spinning,
    ONNX Runtime's version."""
    import onnxruntime

    from ferry.runtime.benchmark import cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    return (f"{model} [{' '.join(flags)}] threads={threads} "
            f"{'spinning' if spinning else 'sleeping'} onnxruntime={onnxruntime.__version__}")


def bundle_key(bundle: Bundle) -> str:
    """The bundle's files by the checksums its manifest lists (no file is read): a bundle whose
    graphs or weights changed is measured again."""
    files = sorted(bundle.manifest.files.items())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:32]


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure again and rewrite it
        return {}
    return record if isinstance(record, dict) else {}


def recorded_choice(key: str, path: Path) -> str | None:
    entry = _read_record(path).get(key)
    chosen = entry.get("chosen") if isinstance(entry, dict) else None
    return chosen if chosen in CANDIDATES else None


def record_choice(key: str, timing: VariantTiming, path: Path) -> None:
    """Add this choice to the record (atomically); a cache directory that cannot be written
    only costs a measurement at the next load."""
    record = _read_record(path)
    record[key] = asdict(timing)
    try:
        atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    except OSError:
        pass


def _workload(model, batch: int) -> Callable[[], object]:
    """One timed call of `model` at `batch`: a forced-length greedy generation, or a single
    pass of an encoder-only bundle's graph."""
    rng = np.random.default_rng(batch)
    generator = getattr(model, "generator", model)
    if generator is not None and hasattr(generator, "generate_ids"):
        length = min(SOURCE_LENGTH, generator.codec.max_length - NEW_TOKENS - 1)
        ids = rng.integers(5, generator.vocab_size, size=(batch, max(length, 1)))
        mask = np.ones_like(ids)
        settings = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
        return lambda: generator.generate_ids(ids, mask, **settings)
    from ferry.runtime.parity import FeedSizes, graph_feeds

    config = model.model_config
    length = min(SOURCE_LENGTH, config["max_positions"])
    feeds = graph_feeds(model.graphs, sizes=FeedSizes(batch=batch, src_len=length),
                        vocab_size=config["vocab_size"], pad=model.special.pad, seed=batch,
                        segments=config.get("type_vocab_size", 0))
    name, feed = next(iter(feeds.items()))
    return lambda: model.graphs[name].infer(feed)


def measure(models: dict[str, object], machine: str, batches: tuple[int, ...] = BATCHES,
            rounds: int = ROUNDS) -> VariantTiming:
    """Time each loaded variant (`{variant: model}`) at each batch — a warm-up call, then
    `rounds` calls alternating between variants — and choose the lowest geometric mean of the
    median times (ties: the first candidate)."""
    from ferry.runtime.benchmark import alternating_medians

    seconds: dict[str, list[float]] = {variant: [] for variant in models}
    for batch in batches:
        calls = {variant: _workload(model, batch) for variant, model in models.items()}
        for call in calls.values():
            call()
        for variant, median in alternating_medians(calls, rounds).items():
            seconds[variant].append(median)
    score = {variant: sum(math.log(s) for s in seconds[variant]) for variant in models}
    chosen = min(models, key=lambda variant: (score[variant], CANDIDATES.index(variant)))
    return VariantTiming(chosen=chosen, batches=tuple(batches), seconds=seconds,
                         machine=machine,
                         measured=datetime.datetime.now().isoformat(timespec="seconds"))


def measures(bundle: Bundle, options: dict) -> bool:
    """Whether `load` chooses between variants here: ONNX Runtime on the CPU provider, no
    precision asked for, and a bundle carrying both candidates."""
    from ferry.runtime.backends.onnxruntime import PROVIDERS, resolve_providers

    on_cpu = resolve_providers(options.get("providers")) == [PROVIDERS["cpu"]]
    return (options.get("precision") is None and on_cpu
            and all(variant in bundle.precisions for variant in CANDIDATES))


def fastest_model(bundle: Bundle, options: dict, build: Callable[[str], object], *,
                  again: bool = False) -> tuple[object, VariantTiming | None]:
    """The model in this machine's fastest variant, built with `build(precision)`: the pinned
    one, the recorded one, or (`again`, or none recorded) each candidate built and measured,
    the choice recorded. Returns the model and the new measurement (None when none was
    taken)."""
    pinned = pinned_variant()
    if pinned and not again:
        return build(pinned), None
    plan = thread_plan(options.get("intra_op_threads", 0), options.get("spinning"))
    machine = machine_key(plan.threads, plan.spinning)
    key, path = f"{machine} | {bundle_key(bundle)}", cache_directory() / RECORD_FILE
    with _lock:
        chosen = None if again else recorded_choice(key, path)
        if chosen is not None:
            return build(chosen), None
        models = {variant: build(variant) for variant in CANDIDATES}
        timing = measure(models, machine)
        record_choice(key, timing, path)
    return models[timing.chosen], timing
