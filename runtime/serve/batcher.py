"""Batching across requests: concurrent requests that can share a backend call (same endpoint,
same settings) are grouped into one, up to `max_batch` inputs, the oldest waiting at most
`max_wait_ms` for company. One worker thread runs the batches in arrival order of their oldest
request; a request cancelled before its batch starts (its client left, its time ran out) is
dropped without being computed."""

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


class QueueFull(Exception):
    """The batcher holds `max_queue` inputs already; the request should be retried later."""


@dataclass
class _Request:
    key: Hashable
    inputs: list[Any]
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class RequestBatcher:
    """Groups concurrent requests into batched calls of `run` on one worker thread.

    Args:
        run: `run(key, inputs) -> results`, one result per input, in order.
        max_batch: inputs per call at most (a single larger request runs alone).
        max_wait_ms: how long the oldest waiting request waits for others with its key.
        max_queue: inputs waiting at most; `submit` raises `QueueFull` beyond.
        on_batch: called with each batch's input count (metrics).
    """

    def __init__(self, run: BatchRunner, *, max_batch: int, max_wait_ms: float,
                 max_queue: int, on_batch: Callable[[int], None] = lambda size: None) -> None:
        self._run = run
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_ms / 1e3, max_queue
        self._on_batch = on_batch
        self._waiting: deque[_Request] = deque()
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
        request = _Request(key, list(inputs))
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
            self._run_batch(batch)

    def _next_batch(self) -> list[_Request] | None:
        """The oldest live request and the ones with its key that fit beside it, once the batch
        is full, the oldest has waited `max_wait_ms`, or the batcher is closing."""
        with self._changed:
            while True:
                self._drop_cancelled()
                if self._waiting:
                    oldest = self._waiting[0]
                    joining = self._joining(oldest)
                    size = sum(len(r.inputs) for r in joining)
                    left = oldest.arrived + self.max_wait_s - time.monotonic()
                    if size >= self.max_batch or left <= 0 or self._closed:
                        for request in joining:
                            self._waiting.remove(request)
                        return joining
                    self._changed.wait(left)
                elif self._closed:
                    return None
                else:
                    self._changed.wait()

    def _joining(self, oldest: _Request) -> list[_Request]:
        batch, size = [oldest], len(oldest.inputs)
        for request in list(self._waiting)[1:]:
            if request.key == oldest.key and size + len(request.inputs) <= self.max_batch:
                batch.append(request)
                size += len(request.inputs)
        return batch

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.future.cancelled()]:
            self._waiting.remove(request)

    def _run_batch(self, batch: list[_Request]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        inputs = [x for r in live for x in r.inputs]
        self._on_batch(len(inputs))
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

    def _settle(self, request: _Request, inputs: list[Any]) -> None:
        try:
            request.future.set_result(list(self._run(request.key, inputs)))
        except Exception as error:  # noqa: BLE001 - handed to the request, which reports it
            request.future.set_exception(error)
