"""`ferry bench`: generation latency and throughput per backend and batch size.

Every request generates exactly `new_tokens` tokens (EOS is held back with `min_new_tokens`), from
random sources of `source_len` tokens, so backends and batch sizes do the same work; greedy, or
beam search with `num_beams` (every beam then runs to the full length). Latency is per
`generate_ids` call (encoder + all decoder steps); tokens/s = batch × new_tokens / median latency
(the tokens of the best hypothesis).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ferry.errors import FerryError
from ferry.runtime.charts import pyplot, saved
from ferry.runtime.cpu_threads import busy_cores
from ferry.runtime.model import Generator

FIRST_ORDINARY_TOKEN = 5  # ids below are pad/bos/eos/unk/mask


@dataclass
class BenchResult:
    backend: str
    batch: int
    num_beams: int
    new_tokens: int
    source_len: int
    runs: int
    latency_p50_ms: float
    latency_p90_ms: float
    tokens_per_s: float


# CPU features that change which engine wins (int8 kernels gain most from VNNI / AMX)
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of `SPEED_FLAGS` it has (Linux's /proc/cpuinfo; the
    platform's processor string elsewhere, flags unknown)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", platform.machine()), [f for f in SPEED_FLAGS if f in flags]


def machine_description() -> str:
    """One line for a benchmark report: CPU model and speed-relevant flags, cores, OS, and the
    1-minute load average when the run started (other work on the machine slows every
    engine, ONNX Runtime's spinning thread pools most)."""
    model, flags = cpu_model_and_flags()
    load = f", load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return (f"{model} [{' '.join(flags) or 'no AVX2'}], {os.cpu_count()} CPUs, "
            f"{platform.system()} {platform.release()}{load}")


QUIET_BELOW = 0.3  # busy CPUs under which a machine counts as quiet


def wait_until_quiet(*, busy_below: float = QUIET_BELOW, max_seconds: float = 10.0) -> float:
    """Wait until other work keeps fewer than `busy_below` CPUs busy (0.2 s samples), at most
    `max_seconds`; the last sample. An engine loaded next then meets the machine an application
    would load it on, not the thread pools an engine loaded just before still spins (ferry's
    sessions choose spinning from what is free when they load: `cpu_threads.thread_plan`)."""
    deadline = time.monotonic() + max_seconds
    while ((busy := busy_cores(0.2, samples=1, reuse=False)) >= busy_below
           and time.monotonic() < deadline):
        pass
    return busy


def _keep_busy(deadline: float) -> None:
    while time.monotonic() < deadline:
        pass


@contextlib.contextmanager
def background_load(processes: int, *, max_seconds: float = 3600.0) -> Iterator[None]:
    """Within this block `processes` other processes each keep one CPU busy (a spinning loop,
    ended when the block exits, or after `max_seconds` at the latest): a known load that every
    engine a benchmark times in turn meets alike."""
    context = multiprocessing.get_context("spawn")
    deadline = time.monotonic() + max_seconds
    workers = [context.Process(target=_keep_busy, args=(deadline,), daemon=True)
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        for worker in workers:
            worker.terminate()
            worker.join()


def alternating_medians(calls: dict[str, Callable[[], object]], rounds: int, *,
                        on_round: Callable[[int], None] | None = None) -> dict[str, float]:
    """Median seconds per call of each of `calls`, timed in `rounds` rounds that call each once
    in turn (so a noisy neighbour slows them alike); `on_round(i)` after round i (from 1)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(1, rounds + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
        if on_round is not None:
            on_round(round_)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def random_sources(model: Generator, batch: int, source_len: int, seed: int) -> np.ndarray:
    """(batch, source_len) ids: random ordinary tokens, the last one EOS as the tokenizer adds."""
    if source_len > model.codec.max_length:
        raise FerryError(f"--source-len {source_len} exceeds the model's "
                         f"{model.codec.max_length} positions")
    rng = np.random.default_rng(seed)
    ids = rng.integers(FIRST_ORDINARY_TOKEN, model.vocab_size, size=(batch, source_len))
    ids[:, -1] = model.special.eos
    return ids.astype(np.int64)


def bench_model(model: Generator, *, batch: int, new_tokens: int, source_len: int,
                runs: int, num_beams: int = 1, warmup: int = 1, seed: int = 0) -> BenchResult:
    """Time `runs` generate calls (after `warmup` untimed ones) of one backend and batch size."""
    if runs < 1 or batch < 1 or new_tokens < 1 or num_beams < 1:
        raise FerryError("--runs, --batch, --num-beams and --new-tokens must be ≥ 1")
    input_ids = random_sources(model, batch, source_len, seed)
    mask = np.ones_like(input_ids)
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                "num_beams": num_beams}
    for _ in range(warmup):
        model.generate_ids(input_ids, mask, **settings)
    latencies = []
    for _ in range(runs):
        start = time.perf_counter()
        output = model.generate_ids(input_ids, mask, **settings)
        latencies.append(time.perf_counter() - start)
        if output.shape != (batch, new_tokens):
            raise RuntimeError(f"expected {new_tokens} tokens per row, got {output.shape}")
    p50 = statistics.median(latencies)
    p90 = float(np.percentile(latencies, 90))
    return BenchResult(backend=model.backend, batch=batch, num_beams=num_beams,
                       new_tokens=new_tokens,
                       source_len=source_len, runs=runs, latency_p50_ms=1000 * p50,
                       latency_p90_ms=1000 * p90, tokens_per_s=batch * new_tokens / p50)


def format_results(results: list[BenchResult]) -> str:
    lines = [f"{'backend':<18} {'batch':>5} {'beams':>5} {'new':>5} {'p50 ms':>10} "
             f"{'p90 ms':>10} {'tokens/s':>10}"]
    lines += [f"{r.backend:<18} {r.batch:>5} {r.num_beams:>5} {r.new_tokens:>5} "
              f"{r.latency_p50_ms:>10.1f} {r.latency_p90_ms:>10.1f} {r.tokens_per_s:>10.1f}"
              for r in results]
    return "\n".join(lines)


def results_dict(results: list[BenchResult]) -> dict:
    return {"machine": machine_description(), "results": [asdict(r) for r in results]}


def plot_results(results: list[BenchResult], path: str | Path) -> Path:
    """A grouped bar chart of tokens/s per backend and batch size."""
    plt = pyplot()
    backends = list(dict.fromkeys(r.backend for r in results))
    batches = sorted({r.batch for r in results})
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        values = [next((r.tokens_per_s for r in results
                        if r.backend == backend and r.batch == b), 0.0) for b in batches]
        positions = [x + i * width for x in range(len(batches))]
        bars = ax.bar(positions, values, width, label=backend)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(batches))])
    ax.set_xticklabels([f"batch {b}" for b in batches])
    ax.set_ylabel("generated tokens / s")
    search = f", {results[0].num_beams} beams" if results[0].num_beams > 1 else ", greedy"
    ax.set_title(f"{results[0].new_tokens} new tokens, source {results[0].source_len} tokens"
                 f"{search}", fontsize=9)
    ax.legend()
    return saved(plt, fig, path, machine_description())
