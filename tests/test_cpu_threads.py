"""CPU sessions choose their threads and spinning for the machine as it is: all cores and
spinning when it is idle, fewer threads that sleep between operators when other work keeps
cores busy — measured, not assumed."""

from __future__ import annotations

import os
import time

import pytest

from ferry.runtime import cpu_threads, load
from ferry.runtime.benchmark import background_load
from ferry.runtime.cpu_threads import ThreadPlan, busy_cores, thread_plan


@pytest.mark.parametrize(("threads", "spinning", "busy", "expected"), [
    (0, None, 0.0, ThreadPlan(2, True, 2)),  # idle: every core, spinning
    (0, None, 1.0, ThreadPlan(1, True, 1)),  # one core taken: the other, spinning on it
    (0, None, 3.5, ThreadPlan(1, False, 1)),  # oversubscribed: one thread, sleeping
    (2, None, 1.0, ThreadPlan(2, False, 1)),  # two asked for, one free: they sleep
    (2, True, 3.5, ThreadPlan(2, True, 2)),  # both given: as given
])
def test_a_plan_uses_the_free_cores_and_spins_only_when_each_thread_has_one(
        threads, spinning, busy, expected):
    assert thread_plan(threads, spinning, cores=2, cpus=2, busy=busy) == expected


def test_hyperthreads_count_as_their_core_share():
    # 4 physical cores, 8 logical CPUs, 4 of them busy: half of each core's share is taken
    assert thread_plan(cores=4, cpus=8, busy=4.0) == ThreadPlan(2, True, 2)


def test_busy_cores_sees_another_process_keeping_a_cpu_busy(monkeypatch):
    monkeypatch.setattr(cpu_threads, "_recent", [])
    quiet = busy_cores(0.2)
    monkeypatch.setattr(cpu_threads, "_recent", [])
    with background_load(1):
        time.sleep(1.0)  # the spawned process starts
        loaded = busy_cores(0.2)
    assert loaded >= quiet + 0.6, (quiet, loaded)


def test_a_burst_within_the_load_sample_does_not_count(monkeypatch):
    """Three readings, the least counts: one busy reading (a process starting) among quiet ones
    reads as quiet; busy in every reading reads as busy."""
    cpus = os.cpu_count() or 1

    def jiffies(busy_shares):  # cumulative (busy, total) at each reading, 100 jiffies apart
        readings, busy = [(0, 0)], 0
        for share in busy_shares:
            busy += round(100 * share)
            readings.append((busy, readings[-1][1] + 100))
        return iter(readings)

    monkeypatch.setattr(cpu_threads.time, "sleep", lambda seconds: None)
    for shares, expected in (([1.0, 0.0, 0.05], 0.0), ([0.5, 0.5, 0.6], 0.5 * cpus)):
        readings = jiffies(shares)
        monkeypatch.setattr(cpu_threads, "_busy_and_total", readings.__next__)
        assert busy_cores(reuse=False) == pytest.approx(expected)


def test_a_benchmark_loads_its_next_engine_once_the_machine_is_quiet(monkeypatch):
    """`wait_until_quiet` samples afresh (no reused sample) until the busy CPUs fall below the
    bar, and gives up after its time limit with the last sample."""
    from ferry.runtime import benchmark

    sampled = iter([1.8, 0.9, 0.1, 0.0])
    monkeypatch.setattr(benchmark, "busy_cores",
                        lambda seconds, *, samples, reuse: 0.0 if reuse else next(sampled))
    assert benchmark.wait_until_quiet(busy_below=0.3) == 0.1
    assert next(sampled) == 0.0  # no sample taken after the quiet one
    monkeypatch.setattr(benchmark, "busy_cores", lambda seconds, *, samples, reuse: 2.0)
    assert benchmark.wait_until_quiet(max_seconds=0.0) == 2.0


def test_onnxruntime_sessions_run_with_the_plan(tiny_bundle, monkeypatch):
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda: 0.0)
    idle = thread_plan()
    model = load(tiny_bundle, "onnxruntime")
    session = next(iter(model.graphs.values())).session
    assert session.get_session_options().intra_op_num_threads == idle.threads
    assert idle.spinning  # an idle machine: pools spin within a run, and stop when it returns
    assert session.get_session_options().get_session_config_entry(
        "session.force_spinning_stop") == "1"
    model = load(tiny_bundle, "onnxruntime", intra_op_threads=1, spinning=False)
    options = next(iter(model.graphs.values())).session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
