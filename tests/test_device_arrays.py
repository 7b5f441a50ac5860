"""Every backend's device arrays keep one contract: numpy's answers for shape, dtype, len, row
selection, `np.repeat` along rows and host reads; cache views show only their cached positions
and keep their buffers' room to grow."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ferry.runtime.backends.device_arrays import DeviceArray, StaticCacheView, move_rows_in_place
from ferry.runtime.backends.onnxruntime import OrtArray, OrtCacheView
from ferry.runtime.backends.torch import TorchArray, TorchCacheView

CAPACITY, LENGTH = 8, 5
BUFFER = np.random.default_rng(0).standard_normal((4, 2, CAPACITY, 3)).astype(np.float32)
EXPECTED = BUFFER[:, :, :LENGTH]  # what a cache view of LENGTH positions holds


def torch_array() -> DeviceArray:
    return TorchArray(torch.from_numpy(EXPECTED.copy()))


def ort_array() -> DeviceArray:
    return OrtArray(ort.OrtValue.ortvalue_from_numpy(EXPECTED.copy()), "cpu", 0)


def torch_view() -> DeviceArray:
    return TorchCacheView(torch.from_numpy(BUFFER.copy()), LENGTH)


def ort_view() -> DeviceArray:
    return OrtCacheView.placed(BUFFER.copy(), LENGTH, "cpu", 0)


KINDS = {"TorchArray": torch_array, "OrtArray": ort_array, "TorchCacheView": torch_view,
         "OrtCacheView": ort_view}


@pytest.mark.parametrize("kind", KINDS)
def test_device_arrays_answer_as_numpy_does(kind):
    array = KINDS[kind]()
    assert array.shape == EXPECTED.shape and array.ndim == 4 and len(array) == 4
    assert array.dtype == np.float32
    assert np.array_equal(np.asarray(array), EXPECTED)
    assert np.array_equal(array.astype(np.float64), EXPECTED.astype(np.float64))
    for rows in (np.array([3, 0, 0]), slice(1, 3), np.array([True, False, True, False])):
        chosen = array[rows]
        assert type(chosen) is type(array) and np.array_equal(np.asarray(chosen), EXPECTED[rows])
    repeated = np.repeat(array, 3, axis=0)  # a view's repeat is a plain array of its positions
    assert isinstance(repeated, DeviceArray) and repeated.shape == (12, *EXPECTED.shape[1:])
    assert np.array_equal(np.asarray(repeated), np.repeat(EXPECTED, 3, axis=0))
    assert np.repeat(array, 1, axis=0) is array
    with pytest.raises(ValueError, match="axis 0"):
        array.repeat(2, axis=1)


@pytest.mark.parametrize("kind", ["TorchCacheView", "OrtCacheView"])
def test_cache_views_keep_their_room_to_grow_through_row_selection(kind):
    view = KINDS[kind]()
    assert isinstance(view, StaticCacheView) and view.capacity == CAPACITY
    chosen = view[np.array([2, 2, 1])]
    assert chosen.capacity == CAPACITY and chosen.length == LENGTH
    assert np.array_equal(np.asarray(chosen), EXPECTED[[2, 2, 1]])
    again = chosen[np.array([1, 0, 2])]  # a selection of a selection keeps the room too
    assert np.array_equal(np.asarray(again), EXPECTED[[2, 2, 1]][[1, 0, 2]])


@pytest.mark.parametrize("kind", KINDS)
def test_rearranging_a_cache_gives_the_selected_rows(kind):
    """Beam reordering (`rearranged`: rows nothing else holds) may move rows in place, as the
    CPU ORT view does, but must give what row selection gives, repeats and swaps included."""
    array = KINDS[kind]()
    rows = np.array([1, 1, 3, 2])
    result = array.rearranged(rows)
    assert np.array_equal(np.asarray(result), EXPECTED[rows])
    if kind == "OrtCacheView":
        assert result is array  # a host buffer: rearranged where it lies
        assert result.rearranged(np.arange(4)) is array


def test_a_large_cache_moves_its_rows_in_parts_exactly(monkeypatch):
    """Caches are moved in parts on host threads — a large one by its heads, several by whole
    caches: the result is the row selection, also when rows read rows that other rows
    overwrite (chains and swaps)."""
    from ferry.runtime import host_parallel

    monkeypatch.setattr(host_parallel, "host_threads", lambda: 4)
    rng = np.random.default_rng(0)
    full = rng.standard_normal((16, 8, 64, 256)).astype(np.float32)  # 8 MB, 8 heads
    rows = np.array([1, 2, 3, 0, 0, 5, 5, 9, 8, 7, 10, 10, 15, 14, 13, 12])
    moved_bytes = full.nbytes * int((rows != np.arange(16)).sum()) // 16
    assert len(host_parallel.axis_parts(8, moved_bytes)) == 4  # four parts of two heads
    expected = full[:, :, :60][rows].copy()
    move_rows_in_place([full[:, :, :60]], rows)
    assert np.array_equal(full[:, :, :60], expected)
    caches = [rng.standard_normal((16, 2, 64, 64)).astype(np.float32) for _ in range(6)]
    expected = [cache[rows].copy() for cache in caches]  # six caches: whole ones per part
    move_rows_in_place(caches, rows)
    assert all(np.array_equal(c, e) for c, e in zip(caches, expected))
