"""An engine under benchmark, loaded and run in a process of its own.

Engines sharing one process slow each other down: OpenMP runtimes (llama.cpp's, CTranslate2's,
torch's) and ONNX Runtime thread pools each keep their own worker threads, some spinning after
their work, and an allocator or thread pool warmed by one engine is cold for the next. On a
2-core Xeon (2026-12-03) llama.cpp's Q8_0 decoded 15.3 tok/s timed in one process with ferry,
ONNX Runtime GenAI and CTranslate2, and 41.4 tok/s alone. So the benchmarks time each engine in
a spawned process (nothing inherited but the arguments): the parent holds only a proxy and times
its calls, which cost one pipe round trip (tens of µs) on top of the engine's work.

An engine here is a factory `() -> make`, `make(*arguments) -> call`: the factory loads the
model in the child, `make` prepares one measured call (a batch of prompts, a setting) and `call`
runs it. Errors raised in the child come back as the same kind where the caller tells them apart
(`ImportError`: a peer that is not installed; `NotImplementedError`: a setting it lacks).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable
from typing import Any

ERROR_KINDS = {"ImportError": ImportError, "ModuleNotFoundError": ImportError,
               "NotImplementedError": NotImplementedError}


class IsolatedEngine:
    """A proxy for the engine `factory()` builds in a spawned process (`factory` must pickle: a
    module-level function, or a `functools.partial` of one); calling it as `make` returns a
    callable that runs the prepared call there and waits for it to finish."""

    def __init__(self, factory: Callable[[], Callable[..., Callable[[], Any]]], *,
                 torch_threads: int | None = None):
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(factory, torch_threads, child),
                                        daemon=True)
        self._process.start()
        child.close()
        try:
            self._reply()  # loaded, or the loading error raised here
        except BaseException:
            self.close()
            raise

    def __call__(self, *arguments) -> Callable[[], Any]:
        self._pipe.send(("make", arguments))
        key = self._reply()

        def call() -> Any:
            """Run the prepared call in the child; what it returns (pickled across)."""
            self._pipe.send(("run", key))
            return self._reply()

        return call

    def close(self) -> None:
        """Stop the child (its memory goes with it)."""
        if self._process.is_alive():
            try:
                self._pipe.send(("stop", None))
            except OSError:
                pass
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._pipe.close()

    def _reply(self):
        try:
            status, value = self._pipe.recv()
        except EOFError:
            raise RuntimeError(f"the engine's process ended (exit code "
                               f"{self._process.exitcode})") from None
        if status == "error":
            kind, message = value
            raise ERROR_KINDS.get(kind, RuntimeError)(message if kind in ERROR_KINDS
                                                      else f"{kind}: {message}")
        return value


def start_engine(factory: Callable[[], Callable], *, isolated: bool = True,
                 torch_threads: int | None = None) -> Callable:
    """The engine `factory` builds: in a process of its own (an `IsolatedEngine`), or, not
    `isolated`, in this one (how the benchmarks' `--one-process` shows what sharing costs)."""
    return IsolatedEngine(factory, torch_threads=torch_threads) if isolated else factory()


def close_engines(engines: Iterable[Callable]) -> None:
    """Stop the processes of the isolated ones among `engines`."""
    for engine in engines:
        if isinstance(engine, IsolatedEngine):
            engine.close()


def _serve(factory: Callable, torch_threads: int | None, pipe) -> None:
    """The child: build the engine, then prepare and run calls until told to stop."""
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    calls: list[Callable[[], Any]] = []
    try:
        make = factory()
    except Exception as exc:  # reported to the parent, which raises it
        pipe.send(("error", (type(exc).__name__, str(exc))))
        return
    pipe.send(("ok", None))
    while True:
        request, value = pipe.recv()
        if request == "stop":
            return
        try:
            if request == "make":
                calls.append(make(*value))
                pipe.send(("ok", len(calls) - 1))
            else:
                pipe.send(("ok", calls[value]()))
        except Exception as exc:
            pipe.send(("error", (type(exc).__name__, str(exc))))
