"""Reading an input segment by segment through a segment-recurrent graph (XLNet's memory).

A graph whose spec takes `memory` / `memory_mask` (`ferry.graph_spec.MemoryShape`) reads one
segment of at most its `seq_len` range per call, attending over the memory of the earlier ones
and returning the next. `infer_segments` runs a whole padded batch through it: per-token outputs
(a `seq_len` axis) are joined back along the sequence; per-sequence outputs (a classifier's
logits, read at each row's last real token) come from the segment that holds that token.
"""

from __future__ import annotations

import numpy as np

from ferry.graph_spec import MEMORY_INPUTS, GraphSpec
from ferry.runtime.backends.base import Feed, GraphBackend

LONG_INPUT_SEGMENTS = 16  # the longest input a recurrent model reads, in segments


def has_memory(spec: GraphSpec) -> bool:
    """Whether the graph reads one segment after the memory of earlier ones."""
    return MEMORY_INPUTS[0] in spec.input_names


def empty_memory(spec: GraphSpec, batch: int) -> Feed:
    """A first segment's memory: one masked zero slot per row (it changes nothing: its keys are
    masked, and relative distances between real tokens do not move)."""
    layers, _, _, width = spec.input(MEMORY_INPUTS[0]).shape
    return {"memory": np.zeros((layers, batch, 1, width), np.float32),
            "memory_mask": np.zeros((batch, 1), np.int64)}


def carried_memory(outputs: Feed) -> Feed:
    """A call's `next_memory` outputs as the next call's memory inputs."""
    return {"memory": outputs["next_memory"], "memory_mask": outputs["next_memory_mask"]}


def infer_segments(graph: GraphBackend, feed: Feed) -> Feed:
    """Run a (B, S) right-padded `feed` (without memory) through a recurrent graph in segments
    of its longest `seq_len`; returns the graph's outputs for the whole input, memory dropped."""
    spec = graph.spec
    segment = spec.dims["seq_len"].max
    batch, length = feed["input_ids"].shape
    last_token = (np.arange(length) * feed["attention_mask"]).max(axis=1)  # (B,)
    memory = empty_memory(spec, batch)
    pieces: dict[str, list[np.ndarray]] = {}
    for start in range(0, length, segment):
        part = {name: array[:, start:start + segment] for name, array in feed.items()}
        outputs = graph.infer({**part, **memory})
        memory = carried_memory(outputs)
        for name, array in outputs.items():
            pieces.setdefault(name, []).append(array)
    joined = {}
    for tensor in spec.outputs:
        if tensor.name.startswith("next_memory"):
            continue
        parts = pieces[tensor.name]
        if "seq_len" in tensor.shape:  # per token: the segments side by side
            joined[tensor.name] = np.concatenate(parts, axis=tensor.shape.index("seq_len"))
        else:  # per sequence: from the segment holding each row's last real token
            holder = last_token // segment  # (B,)
            joined[tensor.name] = np.stack([parts[s][row] for row, s in enumerate(holder)])
    return joined
