"""Batching across requests: concurrent requests that can share a backend call (same endpoint,
same settings) are grouped into one, up to `max_batch` inputs, the oldest waiting at most
`max_wait_ms` for company. One worker thread runs the batches in arrival order of their oldest
request; a request cancelled before its batch starts (its client left, its time ran out) is
dropped without being computed.

A key the runner can batch continuously (a decoder-only generation) runs instead as a batch
that takes more requests with its key between its steps (`Admissions`) and settles each request
as soon as its own inputs are done; it stops taking them once a request with another key has
waited `max_wait_ms`, so that one's turn comes at the end of the running batch.

Clients usually send their next request when their answer comes, so a batch that ends is
followed by its requests' successors, arriving over a few milliseconds. Starting the next batch
with the first few of them would split the clients into a small batch and a large one that
alternate from then on (a 32-client load ran batches of 16 and 16, or 27 and 5). So right
after a batch ends, the next one with its key waits for the inputs it expects back (the ended
batch's, and those that queued meanwhile) at most `REFILL_SHARE` of the ended batch's run time
(and `REFILL_MAX_S`), and starts at once when they are in. A continuous batch does the same
for requests that end inside it: their successors join together once all of them are back (or
the room is full, or that time is up), not in groups as they come: each join costs a prompt
run and a copy of the batch's cache, and rows that joined apart end apart, so the groups would
only split further (a 32-client load of the demo model drifted from one group into three, its
steps ~20 % slower)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ferry.errors import FerryError

# run(key, inputs) → one result per input, for inputs of requests submitted with that key
BatchRunner = Callable[[Hashable, list[Any]], Sequence[Any]]
# run_continuous(key, admissions): takes requests from `admissions`, settles each of them
ContinuousRunner = Callable[[Hashable, "Admissions"], None]
# joining a running batch costs a prompt run and a copy of the batch's cache: waiting requests
# join together once they make this share of the running rows (or fill the batch, or the
# oldest has waited max_join_wait_ms)
JOIN_SHARE = 0.25
# after a batch ends, the next batch with its key waits at most this share of the ended batch's
# run time, and at most REFILL_MAX_S, for the inputs it expects back (see the module docstring)
REFILL_SHARE, REFILL_MAX_S = 0.25, 0.1


class QueueFull(Exception):
    """The batcher holds `max_queue` inputs already; the request should be retried later."""


class RequestFuture(Future):
    """A request's future; `abandoned` once cancelled, even while running (too late for
    `Future.cancel`), so a continuous batch can let the request's rows go."""

    abandoned = False

    def cancel(self) -> bool:
        self.abandoned = True
        return super().cancel()


@dataclass
class QueuedRequest:
    """A submitted request: its batching key, its inputs and the future of its results."""

    key: Hashable
    inputs: list[Any]
    future: RequestFuture = field(default_factory=RequestFuture)
    arrived: float = field(default_factory=time.monotonic)

    def resolve(self, results: list[Any]) -> None:
        """Hand the request its results, one per input."""
        self.future.set_result(results)

    def fail(self, error: BaseException) -> None:
        """Hand the request the error its inputs met."""
        self.future.set_exception(error)


@dataclass
class Returning:
    """Inputs of requests that ended inside a continuous batch since its last join, whose
    successors are expected back by `deadline` (see the module docstring)."""

    inputs: int
    deadline: float


class Admissions:
    """The requests of a continuous batch: `take` gives the ones it starts with, then, each
    time it is asked between steps, waiting requests with its key that fit beside the running
    ones (live ones only, marked running). The batcher settles whatever the runner left."""

    def __init__(self, batcher: RequestBatcher, key: Hashable, first: list[QueuedRequest]) -> None:
        self._batcher, self.key, self._first = batcher, key, first
        self.taken: list[QueuedRequest] = []
        self._running: list[tuple[QueuedRequest, float]] = []  # (request, when it was taken)
        self._returning: Returning | None = None

    def take(self, room: int, running: int) -> list[QueuedRequest]:
        """The batch's first requests on the first call; later, waiting requests with the
        batch's key of `room` inputs at most in all, beside `running` rows: a group once it
        is worth its join (see `RequestBatcher`), none once a request with another key has
        waited its `max_wait_ms`."""
        now = time.monotonic()
        if self._first is not None:
            joining, self._first = self._first, None
        else:
            if room > 0:  # rows of a request that ended left room (none ended otherwise)
                self._note_ended(now)
            joining = self._batcher._joining_running(self.key, room, running, self._returning)
            if joining:
                self._returning = None
                self._batcher._on_batch(sum(len(r.inputs) for r in joining))
        self.taken += joining
        self._running += [(request, now) for request in joining]
        return joining

    def _note_ended(self, now: float) -> None:
        """Count the requests answered since the last call as expected back (not those whose
        client left); the first of them sets how long their successors are waited for."""
        still = []
        for request, taken in self._running:
            if not request.future.done():
                still.append((request, taken))
            elif not request.future.abandoned:
                if self._returning is None:
                    self._returning = Returning(0, now + self._batcher.refill_time(now - taken))
                self._returning.inputs += len(request.inputs)
        self._running = still


class RequestBatcher:
    """Groups concurrent requests into batched calls of `run` on one worker thread.

    Args:
        run: `run(key, inputs) -> results`, one result per input, in order.
        max_batch: inputs per call at most (a single larger request runs alone).
        max_wait_ms: how long the oldest waiting request waits for others with its key.
        max_join_wait_ms: how long a request waits for others to join a running continuous
            batch with (see `JOIN_SHARE`).
        max_queue: inputs waiting at most; `submit` raises `QueueFull` beyond.
        on_batch: called with each batch's input count (metrics), and with the count of each
            group of requests joining a continuous batch.
        continuous: which keys run as continuous batches, by `run_continuous`.
    """

    def __init__(self, run: BatchRunner, *, max_batch: int, max_wait_ms: float,
                 max_queue: int, max_join_wait_ms: float = 100.0,
                 on_batch: Callable[[int], None] = lambda size: None,
                 continuous: Callable[[Hashable], bool] = lambda key: False,
                 run_continuous: ContinuousRunner | None = None) -> None:
        self._run, self._continuous, self._run_continuous = run, continuous, run_continuous
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_ms / 1e3, max_queue
        self.max_join_wait_s = max_join_wait_ms / 1e3
        self._on_batch = on_batch
        self._waiting: deque[QueuedRequest] = deque()
        self._ended: tuple[Hashable, int, float] | None = None  # key, inputs, refill deadline
        self._changed = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="ferry-batcher", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Inputs waiting for a batch."""
        with self._changed:
            return sum(len(r.inputs) for r in self._waiting)

    def submit(self, key: Hashable, inputs: list[Any]) -> Future:
        """Queue a request's inputs; the future resolves to their results (a list), or to the
        exception `run` raised for them."""
        request = QueuedRequest(key, list(inputs))
        with self._changed:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if sum(len(r.inputs) for r in self._waiting) + len(request.inputs) > self.max_queue:
                raise QueueFull(f"{self.max_queue} inputs are waiting already")
            self._waiting.append(request)
            self._changed.notify_all()
        return request.future

    def close(self, timeout: float | None = None) -> None:
        """Take no more requests, finish the waiting ones, stop the worker."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._worker.join(timeout)

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if not live:
                continue
            size = sum(len(r.inputs) for r in live)
            self._on_batch(size)
            started = time.monotonic()
            if self._run_continuous is not None and self._continuous(live[0].key):
                size = self._run_joined(live)
            else:
                self._run_batch(live)
            ended = time.monotonic()
            with self._changed:  # its requests' successors, beside those queued meanwhile
                expected = size + sum(len(r.inputs) for r in self._waiting
                                      if r.key == live[0].key)
                self._ended = (live[0].key, expected, ended + self.refill_time(ended - started))

    def _next_batch(self) -> list[QueuedRequest] | None:
        """The oldest live request and the ones with its key that fit beside it, once the batch
        is full, its start time has come (`_start_time`), or the batcher is closing."""
        with self._changed:
            while True:
                self._drop_cancelled()
                if self._waiting:
                    oldest = self._waiting[0]
                    joining = self._joining(oldest)
                    size = sum(len(r.inputs) for r in joining)
                    left = self._start_time(oldest, size) - time.monotonic()
                    if size >= self.max_batch or left <= 0 or self._closed:
                        for request in joining:
                            self._waiting.remove(request)
                        return joining
                    self._changed.wait(left)
                elif self._closed:
                    return None
                else:
                    self._changed.wait()

    def _start_time(self, oldest: QueuedRequest, size: int) -> float:
        """When the batch of `oldest` (`size` inputs so far) starts unless it fills first:
        `max_wait_ms` after `oldest` came; or, right after a batch with its key ended, as soon
        as the inputs expected back are in, at the latest at that batch's refill deadline."""
        if self._ended is None:
            return oldest.arrived + self.max_wait_s
        now, (key, expected, refill_deadline) = time.monotonic(), self._ended
        if key != oldest.key or now > refill_deadline:
            return oldest.arrived + self.max_wait_s
        return now if size >= min(expected, self.max_batch) else refill_deadline

    def _joining(self, oldest: QueuedRequest) -> list[QueuedRequest]:
        batch, size = [oldest], len(oldest.inputs)
        for request in list(self._waiting)[1:]:
            if request.key == oldest.key and size + len(request.inputs) <= self.max_batch:
                batch.append(request)
                size += len(request.inputs)
        return batch

    def refill_time(self, run_time: float) -> float:
        """How long the successors of requests that ran `run_time` seconds are waited for."""
        return min(REFILL_SHARE * run_time, REFILL_MAX_S)

    def _joining_running(self, key: Hashable, room: int, running: int,
                         returning: Returning | None = None) -> list[QueuedRequest]:
        """Waiting live requests with `key` that fit in `room` inputs beside `running` rows,
        taken off the queue and marked running, once they are worth a join: they fill the
        room, or — unless `returning` inputs are still expected back before its deadline —
        they make `JOIN_SHARE` of the running rows or the oldest has waited
        `max_join_wait_ms`. None while a request with another key has waited its turn."""
        if room <= 0:  # a full batch: nothing to look for (the queue may be long)
            return []
        with self._changed:
            self._drop_cancelled()
            now, joining, size = time.monotonic(), [], 0
            for request in self._waiting:
                if request.key != key:
                    if now - request.arrived >= self.max_wait_s:
                        return []  # its turn comes when the running batch ends
                    continue
                if size + len(request.inputs) <= room:
                    joining.append(request)
                    size += len(request.inputs)
            expected = (returning is not None and now < returning.deadline
                        and size < min(returning.inputs, room))
            if not joining or not (size == room or not expected and (
                    size >= JOIN_SHARE * running
                    or now - joining[0].arrived >= self.max_join_wait_s)):
                return []
            for request in joining:
                self._waiting.remove(request)
            return [r for r in joining if r.future.set_running_or_notify_cancel()]

    def _run_joined(self, live: list[QueuedRequest]) -> int:
        """A continuous batch: the runner takes `live` (started) and the requests that join
        it; → the inputs it took in all."""
        admissions = Admissions(self, live[0].key, live)
        try:
            self._run_continuous(live[0].key, admissions)
            error: BaseException = RuntimeError("the batch ended without this request's result")
        except Exception as failure:  # noqa: BLE001 - handed to its requests, which report it
            error = failure
        for request in admissions.taken:
            if not request.future.done():
                request.future.set_exception(error)
        return sum(len(request.inputs) for request in admissions.taken)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.future.cancelled()]:
            self._waiting.remove(request)

    def _run_batch(self, live: list[QueuedRequest]) -> None:
        """One call of `run` for the (started) requests `live`."""
        inputs = [x for r in live for x in r.inputs]
        try:
            results = list(self._run(live[0].key, inputs))
        except FerryError as error:
            if len(live) > 1:  # one request's input spoiled the batch: run each alone
                for request in live:
                    self._settle(request, request.inputs)
                return
            live[0].future.set_exception(error)
            return
        except Exception as error:  # noqa: BLE001 - handed to the request, which reports it
            for request in live:
                request.future.set_exception(error)
            return
        start = 0
        for request in live:
            request.future.set_result(results[start : start + len(request.inputs)])
            start += len(request.inputs)

    def _settle(self, request: QueuedRequest, inputs: list[Any]) -> None:
        try:
            request.future.set_result(list(self._run(request.key, inputs)))
        except Exception as error:  # noqa: BLE001 - handed to the request, which reports it
            request.future.set_exception(error)
