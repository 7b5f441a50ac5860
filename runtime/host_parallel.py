"""Host-side numpy work between graph calls, spread over the cores the graph's threads leave idle.

Generation alternates a graph call, which keeps every core busy, with numpy work on its outputs
— beam search's log-softmax over (rows, vocabulary) scores, the KV cache rows it moves when beams
reorder — which numpy runs on one core. While that work runs the graph's thread pool waits, so
splitting it into parts on a small shared pool (numpy releases the GIL in its loops) takes it
off the critical path on a multi-core machine. Parts are whole rows, heads or arrays, so each
element is computed exactly as one call would: results do not depend on the pool's size.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from ferry.runtime.cpu_threads import usable_cores

MAX_THREADS = 8  # beyond this, memory bandwidth, not cores, bounds the copies
MIN_PART_BYTES = 1 << 20  # less work than this per part runs inline: a hand-off costs ~50 µs

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


@functools.cache
def host_threads() -> int:
    """Threads host work is split over: the process's usable cores, at most `MAX_THREADS`
    (read once)."""
    return max(1, min(usable_cores(), MAX_THREADS))


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(host_threads(), thread_name_prefix="ferry-host")
        return _pool


def axis_parts(length: int, nbytes: int) -> list[slice]:
    """The `length` indices along one axis of `nbytes` of work split into contiguous slices,
    one per host thread, none of less than `MIN_PART_BYTES` (one slice for small work)."""
    parts = max(1, min(host_threads(), length, nbytes // MIN_PART_BYTES))
    bounds = [length * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def run_parts(work: Callable[[object], None], parts: Iterable[object]) -> None:
    """`work(part)` for every part: the first inline, the rest on the shared pool; returns when
    all are done and re-raises the first error."""
    parts = list(parts)
    if len(parts) <= 1:
        for part in parts:
            work(part)
        return
    pending = [_shared_pool().submit(work, part) for part in parts[1:]]
    errors = []
    try:
        work(parts[0])
    except Exception as error:  # noqa: BLE001 - re-raised once the other parts are done
        errors.append(error)
    for future in pending:
        if (error := future.exception()) is not None:
            errors.append(error)
    if errors:
        raise errors[0]
