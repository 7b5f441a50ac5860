"""Graph outputs that stay on a backend's device, and the decode step that writes a static cache.

The generation loop only feeds a decoder's KV caches and cross-attention K/V back into the next
graph call. A backend that can keep them where they were computed returns them as `DeviceArray`s:
numpy-like as far as the loop needs (shape, dtype, len, row selection, `np.repeat` along rows,
reading as a numpy array), and fed back to the same backend without a trip through the host.
Each backend subclasses the contract once (`TorchArray`, `OrtArray`).

A static-cache decode step (`StaticCacheStep`) keeps each layer's cache in a preallocated
(B, nh, capacity, hs) buffer that the step writes in place; its `present_*` outputs are
`StaticCacheView`s of those buffers (the first `length` positions), which the next step takes
back as its buffers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ferry.errors import FerryError
from ferry.graph_spec import GraphSpec
from ferry.runtime.backends.base import Feed, GraphBackend, cache_capacity
from ferry.runtime.host_parallel import axis_parts, host_threads, run_parts


def move_rows_in_place(arrays: list[np.ndarray], rows: np.ndarray) -> None:
    """`array[:] = array[rows]` for (rows, heads, …) host arrays (or views of them) nothing
    else holds — a decoder's KV caches, all with the same rows — copying only the rows whose
    source changed: beam search keeps most beams where they were. The copies are split over
    the host threads, by whole arrays when there are enough of them, else along their second
    axis (a cache's heads); each part's rows are its own, so no part reads what another
    writes."""
    moved = np.flatnonzero(rows != np.arange(len(rows)))
    if not moved.size or not arrays:
        return
    sources = rows[moved]
    moved_bytes = sum(a.nbytes for a in arrays) * len(moved) // len(rows)
    if len(arrays) >= host_threads():
        units = [(array, slice(None)) for array in arrays]
    else:  # a few large arrays: each in parts along its heads
        units = [(array, part) for array in arrays
                 for part in axis_parts(array.shape[1], moved_bytes // len(arrays))]

    def move(group: slice) -> None:
        for array, part in units[group]:
            view = array[:, part]
            view[moved] = view[sources]  # the right side is copied out first

    run_parts(move, axis_parts(len(units), moved_bytes))


class DeviceArray(ABC):
    """A graph output held in a backend's memory, numpy-like as far as generation needs."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]:
        """The array's shape, as numpy gives it."""

    @property
    @abstractmethod
    def dtype(self) -> np.dtype:
        """The element type, as a numpy dtype."""

    @abstractmethod
    def take_rows(self, rows: np.ndarray) -> DeviceArray:
        """A new array of rows `rows` (int64 indices, in that order) along the first axis."""

    def rearranged(self, rows: np.ndarray) -> DeviceArray:
        """Rows `rows` (a permutation with repeats, as many as there are rows) of an array that
        nothing else holds, such as the decoder's own KV cache when beams reorder: a backend
        may move the changed rows in place and return this array: where its contents live in
        host memory (`host_view`), it does; elsewhere `take_rows`."""
        view = self.host_view()
        if view is None:
            return self.take_rows(rows)
        move_rows_in_place([view], rows)
        return self

    def host_view(self) -> np.ndarray | None:
        """The numpy view of host memory this array's contents live in, which rearranging in
        place may write (beam search moves several caches' rows in one pass); None where the
        contents are elsewhere (a device) or not writable in place. Default: None."""
        return None

    @abstractmethod
    def repeat_rows(self, repeats: int) -> DeviceArray:
        """A new array with each row `repeats` times in a row (`np.repeat(a, n, axis=0)`)."""

    @abstractmethod
    def host(self) -> np.ndarray:
        """The contents as a host numpy array (a copy when the array lives on a device)."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> DeviceArray:
        """Row selection: `a[index_array]`, `a[slice]` or `a[bool_mask]` along the first
        axis."""
        return self.take_rows(np.arange(len(self))[rows])

    def repeat(self, repeats: int, axis: int | None = None) -> DeviceArray:
        """What `np.repeat(a, repeats, axis=0)` calls."""
        if axis != 0:
            raise ValueError(f"a {type(self).__name__} repeats along axis 0 only")
        return self if repeats == 1 else self.repeat_rows(repeats)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.host()
        return array if dtype is None else array.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return self.host().astype(dtype)


class StaticCacheView(DeviceArray):
    """A static-cache step's `present_*`: the first `length` positions of a (B, nh, capacity,
    hs) buffer that the next step writes into in place. Row selection copies the selected rows'
    whole buffers, so a view keeps its room to grow. Views share their buffer with the step that
    made them: feed each view forward once (as the generation loop does), not an older one
    after a newer."""

    length: int

    @property
    @abstractmethod
    def buffer_shape(self) -> tuple[int, int, int, int]:
        """(B, nh, capacity, hs): the buffer the view lies in."""

    @property
    def capacity(self) -> int:
        return self.buffer_shape[2]

    @property
    def shape(self) -> tuple[int, ...]:
        batch, heads, _, head_dim = self.buffer_shape
        return batch, heads, self.length, head_dim


class StaticCacheStep(GraphBackend):
    """`decoder_step` over static KV caches: the feed and outputs of the portable `decoder_step`
    (`spec`), each `past_*` taken as a buffer with room for the step's new positions: the view's
    own buffer when it has room, else a fresh zeroed one of doubled capacity (`cache_capacity`,
    up to the model's positions) holding the cached positions. Subclasses make fresh buffers
    (`_fresh_view`) and run the step (`_infer`)."""

    view_type: type[StaticCacheView]  # the backend's views, whose buffers a step reuses

    def __init__(self, spec: GraphSpec) -> None:
        super().__init__(spec)
        self.max_positions = spec.dims["past_len"].max + 1
        self.past_names = [n for n in spec.input_names if n.startswith("past_")]
        self.present_names = [n.replace("past_", "present_", 1) for n in self.past_names]

    def caches(self, feed: Feed) -> tuple[int, list[StaticCacheView]]:
        """(P, one view per `past_*` input, each with room for positions P … P+T-1 of the
        step's T new tokens)."""
        cached = feed[self.past_names[0]].shape[2]  # P
        needed = cached + feed["input_ids"].shape[1]  # P + T
        return cached, [self._with_room(feed[name], cached, needed) for name in self.past_names]

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> Feed:
        """A decoder-only model's first prompt chunk, (B, T) ids and mask, run through the step
        over empty caches (buffers made here) → the step's outputs: the last position's (B, 1, V)
        logits and the present_* views. What `decoder_init` and the cache's first step give,
        without `decoder_init`'s logits for every prompt position (the vocabulary projection of
        T rows: a quarter of a 0.5 B model's prompt)."""
        rows, width = input_ids.shape
        if attention_mask.shape != input_ids.shape or width > self.max_positions:
            raise FerryError(f"graph {self.spec.name}: a prompt chunk must be (batch, ≤ "
                             f"{self.max_positions}) ids with a mask of the same shape, got "
                             f"{list(input_ids.shape)} and {list(attention_mask.shape)}")
        empty = {tensor.name: np.zeros((rows, tensor.shape[1], 0, tensor.shape[3]), np.float32)
                 for tensor in self.spec.inputs if tensor.name.startswith("past_")}
        return self._infer({"input_ids": input_ids, "attention_mask": attention_mask, **empty})

    @staticmethod
    def capacity_mask(mask, capacity: int) -> np.ndarray:
        """A decoder-only step's (B, P+T) attention mask over the cached and new positions,
        spread over the buffers' capacity, (B, capacity): the unwritten rest off."""
        mask = np.asarray(mask)
        spanning = np.zeros((len(mask), capacity), dtype=mask.dtype)
        spanning[:, :mask.shape[1]] = mask
        return spanning

    def _with_room(self, value, cached: int, needed: int) -> StaticCacheView:
        if isinstance(value, self.view_type) and value.capacity >= needed:
            return value
        batch, heads, _, head_dim = value.shape
        shape = (batch, heads, cache_capacity(needed, self.max_positions), head_dim)
        return self._fresh_view(value, shape, cached)

    @abstractmethod
    def _fresh_view(self, value, shape: tuple[int, int, int, int], cached: int
                    ) -> StaticCacheView:
        """A zeroed buffer of `shape` holding `value`'s `cached` positions, as a view of them."""
