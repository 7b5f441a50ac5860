"""Benchmarked engines each in a process of their own (ferry.runtime.isolated_engine)."""

import os
from functools import partial

import pytest

from ferry.runtime.isolated_engine import IsolatedEngine

# factories the child can unpickle without this module: factory() → make, make(*a) → call
PROCESS_ID = partial(partial, partial, os.getpid)  # call() → the child's process id
DIVISION = partial(partial, partial, divmod)  # make(a, b) → call() → divmod(a, b)


def test_an_engine_runs_every_call_in_one_process_of_its_own():
    engine = IsolatedEngine(PROCESS_ID)
    try:
        first, second = engine(), engine()
        child = first()
        assert child != os.getpid() and second() == child == first()
    finally:
        engine.close()
    assert not engine._process.is_alive()


def test_calls_return_the_childs_answers_and_raise_its_errors():
    engine = IsolatedEngine(DIVISION)
    try:
        assert engine(17, 5)() == (3, 2)
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            engine(1, 0)()
        assert engine(9, 4)() == (2, 1)  # the child serves on after an error
    finally:
        engine.close()


def test_a_peer_that_is_not_installed_is_an_import_error_in_the_parent():
    with pytest.raises(ImportError, match="no_such_engine"):
        IsolatedEngine(partial(__import__, "no_such_engine"))
