"""How many ONNX Runtime threads a CPU session uses, and whether they spin, chosen for the machine
as it is when the model loads.

ONNX Runtime's defaults (one thread per physical core, idle threads spin-waiting for the next
operator) are the fastest on an idle machine and the slowest on a busy one: a spinning pool
burns the cores other work needs, and every operator waits at a barrier for the thread the
scheduler took away. `thread_plan` reads what is free — the cores this process may run on, less
those other work keeps busy over a short sample of `/proc/stat` — and uses no more threads than
that, spinning only when each thread has a core to itself.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_SECONDS = 0.1  # how long the machine's load is sampled when a model loads …
SAMPLES = 3  # … and how many times: the least counts (one 0.1 s reading caught a just-loaded
# engine's pool and turned a quiet machine's spinning off: int4 decode 43.5 → 37.5 tok/s)
REUSE_SECONDS = 10.0  # a sample stands for this long
PROC_STAT = Path("/proc/stat")


def usable_cores() -> int:
    """Physical cores among the CPUs this process may run on (affinity, cgroup-pinned
    containers); logical CPUs where the topology is unknown."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if cpus is None:
        return os.cpu_count() or 1
    try:
        topology = Path("/proc/cpuinfo").read_text()
    except OSError:
        return len(cpus)
    cores, processor, package = {}, None, "0"
    for line in topology.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            processor = int(value)
        elif key == "physical id":
            package = value
        elif key == "core id" and processor in cpus:
            cores[processor] = (package, value)
    return len(set(cores.values())) if len(cores) == len(cpus) else len(cpus)


def _busy_and_total() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None elsewhere."""
    try:
        fields = [int(v) for v in PROC_STAT.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user … steal (guest time is already in user)
    return total - idle, total


_recent: list[tuple[float, float]] = []  # (monotonic time, busy cores) of the last sample


def busy_cores(sample_seconds: float = SAMPLE_SECONDS, *, samples: int = SAMPLES,
               reuse: bool = True) -> float:
    """Logical CPUs other work keeps busy: the least of `samples` consecutive readings of the
    machine's busy share over `sample_seconds` (this process sleeps meanwhile) × its CPUs, so a
    burst — a process starting, another engine's pool spinning down — does not count and a
    steady load does; 0.0 where the share cannot be read. A result is reused for
    `REUSE_SECONDS` (several models loaded at once sample once) unless `reuse` is False."""
    if reuse and _recent and time.monotonic() - _recent[0][0] < REUSE_SECONDS:
        return _recent[0][1]
    before = _busy_and_total()
    if before is None:
        return 0.0
    readings = []
    for _ in range(samples):
        time.sleep(sample_seconds)
        after = _busy_and_total()
        total = after[1] - before[1]
        readings.append((after[0] - before[0]) / total * (os.cpu_count() or 1)
                        if total > 0 else 0.0)
        before = after
    busy = min(readings)
    _recent[:] = [(time.monotonic(), busy)]
    return busy


@dataclass(frozen=True)
class ThreadPlan:
    """What a CPU session runs with: `threads` intra-op threads, `spinning` or sleeping
    between operators; `free` is how many cores nothing else was using when it was chosen."""

    threads: int
    spinning: bool
    free: int

    def describe(self) -> str:
        return (f"{self.threads} thread{'s' * (self.threads > 1)}, "
                f"{'spinning' if self.spinning else 'sleeping'} between operators "
                f"({self.free} free core{'s' * (self.free != 1)})")


def thread_plan(threads: int = 0, spinning: bool | None = None, *, cores: int | None = None,
                cpus: int | None = None, busy: float | None = None) -> ThreadPlan:
    """The threads and spinning of a CPU session: `threads` (0: one per free core, at least
    one) and `spinning` (None: only when every thread has a free core to itself). `cores`,
    `cpus` (logical) and `busy` default to this machine's (`usable_cores`, `os.cpu_count`,
    `busy_cores`)."""
    cores = usable_cores() if cores is None else cores
    logical = (os.cpu_count() or cores) if cpus is None else cpus
    if threads and spinning is not None:  # nothing to choose
        return ThreadPlan(threads, spinning, cores)
    busy = busy_cores() if busy is None else busy
    # the cores other work leaves (busy is counted over logical CPUs): < 1 when oversubscribed
    room = cores - busy * cores / max(logical, 1)
    free = max(1, min(cores, round(room)))
    chosen = threads or free
    return ThreadPlan(chosen, chosen <= room + 0.5 if spinning is None else spinning, free)
