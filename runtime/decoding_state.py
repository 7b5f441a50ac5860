"""What a batch being decoded holds between steps, and the graph calls that advance it.

`decoding_state` gives the one interface greedy search, sampling and beam search drive:
`start` (the sequences generation begins from), `first` (the prompt or decoder start → logits),
`next` (new tokens → logits), `reorder` (beams survive), `keep` (finished rows leave) and
`join` (another state's rows enter between steps: continuous batching). An encoder-decoder runs
its encoder once per source and keeps the cross-attention K/V (`EncoderDecoderState`); a
decoder-only model runs its prompt (`DecoderOnlyState`); both grow an attention mask over the
KV cache, left-padded where rows joined later. The KV cache and K/V are whatever the backend
returned: numpy arrays or its `DeviceArray`s.
"""

from __future__ import annotations

import numpy as np

from ferry.runtime.backends.base import Feed, GraphBackend
from ferry.runtime.backends.device_arrays import StaticCacheStep, move_rows_in_place
from ferry.runtime.special_ids import SpecialIds


def renamed(outputs: Feed, old: str, new: str) -> Feed:
    """Outputs whose names start with `old` (e.g. present_), keyed with `new` (e.g. past_)."""
    return {new + k[len(old):]: v for k, v in outputs.items() if k.startswith(old)}


def rearranged_caches(past: Feed, rows: np.ndarray) -> Feed:
    """Every cache's rows `rows`. Caches keeping their row count (the decoder's own outputs,
    held nowhere else) are rearranged in place where they live on the host — all of them in one
    pass split over the host threads, moving only the rows that change: beam search keeps many
    beams where they were, and a whole-cache copy per step is its largest cost. A backend's
    `DeviceArray` tells where its contents live (`host_view`) or rearranges itself."""
    if any(len(cache) != len(rows) for cache in past.values()):
        return {name: cache[rows] for name, cache in past.items()}
    on_host, result = [], {}
    for name, cache in past.items():
        view = cache if isinstance(cache, np.ndarray) else cache.host_view()
        if view is None:
            result[name] = cache.rearranged(rows)
        else:
            on_host.append(view)
            result[name] = cache
    move_rows_in_place(on_host, rows)
    return result


class EncoderDecoderState:
    """An encoder-decoder batch being decoded: cross-attention K/V, the KV cache and, where the
    step graph takes one (`joinable`), the decoder's attention mask over it.

    Args:
        copies: rows per source (beams, samples); the encoder runs once per source.
    """

    def __init__(self, graphs: dict[str, GraphBackend], input_ids: np.ndarray,
                 attention_mask: np.ndarray, *, copies: int = 1) -> None:
        self.graphs = graphs
        encoded = graphs["encoder"].infer({"input_ids": input_ids,
                                           "attention_mask": attention_mask})
        # (B·copies, nh, S, hs) per layer, computed once per request
        self.cross = {k: np.repeat(v, copies, axis=0)
                      for k, v in renamed(encoded, "cross_", "cross_").items()}
        self.mask = np.repeat(attention_mask, copies, axis=0)  # (N, S) the sources'
        self.decoder_mask: np.ndarray | None = None  # (N, P) the cache's, once started
        self.masked_steps = joinable(graphs)
        self.past: Feed = {}

    def start(self, special: SpecialIds) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1) the sequences generation begins from — the decoder start token — and (N,)
        leading tokens the repetition penalty skips (none)."""
        rows = len(self.mask)
        return (np.full((rows, 1), special.decoder_start, dtype=np.int64),
                np.zeros(rows, dtype=np.int64))

    def first(self, start_ids: np.ndarray) -> np.ndarray:
        """(N, T) decoder prefix → (N, V) logits of the next token; starts the cache."""
        outputs = self.graphs["decoder_init"].infer({
            "input_ids": start_ids, "encoder_attention_mask": self.mask, **self.cross})
        self.past = renamed(outputs, "present_", "past_")
        self.decoder_mask = np.ones(start_ids.shape, dtype=np.int64)
        return outputs["logits"][:, -1]

    def next(self, token_ids: np.ndarray) -> np.ndarray:
        """(N,) new tokens → (N, V) logits of the following token; grows the cache."""
        if self.decoder_mask.shape[1] > self.graphs["decoder_step"].spec.dims["past_len"].max:
            self.trim()  # rows that joined later: the columns only departed rows used go
        grown = np.concatenate([self.decoder_mask, np.ones((len(self.decoder_mask), 1),
                                                           np.int64)], axis=1)
        masked = {"attention_mask": grown} if self.masked_steps else {}
        outputs = self.graphs["decoder_step"].infer({
            "input_ids": token_ids[:, None], **masked, "encoder_attention_mask": self.mask,
            **self.cross, **self.past})
        self.decoder_mask = grown
        self.past = renamed(outputs, "present_", "past_")
        return outputs["logits"][:, -1]

    def reorder(self, rows: np.ndarray) -> None:
        """Keep cache rows `rows` (beam search's surviving beams), in that order."""
        self.past = rearranged_caches(self.past, rows)
        self.decoder_mask = self.decoder_mask[rows]

    def keep(self, rows: np.ndarray) -> None:
        """Drop every row but `rows` (finished sequences leave the batch), and the host K/V's
        trailing source columns no row left attends to (a longer source that left; a device's
        K/V keep theirs rather than pass through the host)."""
        self.reorder(rows)
        mask = self.mask[rows]
        width = mask.shape[1]
        if all(isinstance(v, np.ndarray) for v in self.cross.values()):
            width = int(np.flatnonzero(mask.any(axis=0)).max(initial=0)) + 1
        self.cross = {k: v[rows, :, :width] if width < v.shape[2] else v[rows]
                      for k, v in self.cross.items()}  # fresh arrays, either way
        self.mask = np.ascontiguousarray(mask[:, :width])

    def join(self, other: EncoderDecoderState) -> None:
        """Append `other`'s rows (encoder and decoder start run, no step taken yet) to this
        batch between steps (`joinable` graphs only: `Decoding.admit` refuses the others before
        their encoder runs): the decoder caches left-padded to one width, the padding masked,
        so each row keeps its own positions and decodes as it would alone; the sources' K/V
        right-padded to the longer source, masked too."""
        self.past, self.decoder_mask = joined(self.past, self.decoder_mask, other.past,
                                              other.decoder_mask)
        source = max(self.mask.shape[1], other.mask.shape[1])
        self.cross = {name: stacked_left_aligned([cache, other.cross[name]], source)
                      for name, cache in self.cross.items()}
        self.mask = stacked_left_aligned([self.mask, other.mask], source)

    def trim(self) -> None:
        """Drop the leading cache columns no row attends to (left by rows that finished)."""
        self.past, self.decoder_mask = trimmed(self.past, self.decoder_mask)


PREFILL_CHUNK = 512  # prompt positions per prefill call: a (chunk × prompt) score matrix per
# head at most, never (prompt × prompt), and the first call's logits for `chunk` positions only


class DecoderOnlyState:
    """A decoder-only batch being decoded: the prompts, left-padded so every row's next token
    is in the last column, and the KV cache with its mask.

    Args:
        copies: rows per prompt (beams, samples); the prompt is run once per copy.

    The prompts are prefilled `PREFILL_CHUNK` positions a call: `decoder_init` takes the first
    chunk, `decoder_step` each following one — or every one, when the step runs over a static
    cache and no prompt is padded (`StaticCacheStep.prefill`: no logits for every prompt
    position, no cache copy).
    """

    def __init__(self, graphs: dict[str, GraphBackend], input_ids: np.ndarray,
                 attention_mask: np.ndarray, *, copies: int = 1) -> None:
        self.graphs = graphs
        ids, mask = left_padded(input_ids, attention_mask)
        self.prompt = np.repeat(ids, copies, axis=0)  # (B·copies, S)
        self.mask = np.repeat(mask, copies, axis=0)
        self.past: Feed = {}

    def start(self, special: SpecialIds) -> tuple[np.ndarray, np.ndarray]:
        """(N, P) the sequences generation begins from — the left-padded prompts, padding as
        the pad token, as `transformers` sees them — and (N,) each row's left padding, which
        the repetition penalty skips."""
        padding = (self.mask == 0)
        return (np.where(padding, special.pad, self.prompt),
                padding.sum(axis=1).astype(np.int64))

    def first(self, start_ids: np.ndarray) -> np.ndarray:
        """The prompts → (N, V) logits of the first new token (`start_ids` unused: a
        decoder-only model continues its prompt); fills the cache chunk by chunk."""
        width, chunk = self.prompt.shape[1], PREFILL_CHUNK
        step = self.graphs["decoder_step"]
        if isinstance(step, StaticCacheStep) and self.mask[:, :chunk].all():
            # unpadded prompts' first chunk goes through the step too, which writes its static
            # cache in place and projects the last position only (over an empty cache ONNX
            # Runtime's GroupQueryAttention takes the chunk for a prompt and numbers its
            # positions itself, wrongly for left-padded rows: those take decoder_init)
            outputs = step.prefill(self.prompt[:, :chunk], self.mask[:, :chunk])
        else:
            outputs = self.graphs["decoder_init"].infer({"input_ids": self.prompt[:, :chunk],
                                                         "attention_mask": self.mask[:, :chunk]})
        self.past = renamed(outputs, "present_", "past_")
        for start in range(chunk, width, chunk):
            end = min(start + chunk, width)
            outputs = self.graphs["decoder_step"].infer({
                "input_ids": self.prompt[:, start:end], "attention_mask": self.mask[:, :end],
                **self.past})
            self.past = renamed(outputs, "present_", "past_")
        return outputs["logits"][:, -1]

    def next(self, token_ids: np.ndarray) -> np.ndarray:
        """(N,) new tokens → (N, V) logits of the following token; grows cache and mask."""
        if self.mask.shape[1] > self.graphs["decoder_step"].spec.dims["past_len"].max:
            self.trim()  # rows that joined later: the columns only departed rows used go
        grown = np.concatenate([self.mask, np.ones((len(self.mask), 1), np.int64)], axis=1)
        outputs = self.graphs["decoder_step"].infer({
            "input_ids": token_ids[:, None], "attention_mask": grown, **self.past})
        self.mask = grown
        self.past = renamed(outputs, "present_", "past_")
        return outputs["logits"][:, -1]

    def reorder(self, rows: np.ndarray) -> None:
        """Keep cache rows `rows` (beam search's surviving beams), in that order."""
        self.past = rearranged_caches(self.past, rows)
        self.mask = self.mask[rows]

    keep = reorder  # finished sequences leave the batch: the same row selection

    def join(self, other: DecoderOnlyState) -> None:
        """Append `other`'s rows (prompts run, no step taken yet) to this batch between steps:
        both left-padded to one width, the padding masked, so each row keeps its own positions
        (numbered by its mask) and decodes as it would alone. Caches pass through the host,
        each copied once."""
        self.past, self.mask = joined(self.past, self.mask, other.past, other.mask)

    def trim(self) -> None:
        """Drop the leading columns no row attends to (left by rows that finished)."""
        self.past, self.mask = trimmed(self.past, self.mask)


def trimmed(past: Feed, mask: np.ndarray) -> tuple[Feed, np.ndarray]:
    """The (B, nh, C, hs) caches and their (B, C) mask without the leading columns no row
    attends to (left by rows that finished); unchanged when every column is in use."""
    unused = int(np.argmax(mask.any(axis=0)))  # columns before the first one in use
    if not unused:
        return past, mask
    return ({name: np.asarray(cache)[:, :, unused:] for name, cache in past.items()},
            mask[:, unused:])


def joined(past: Feed, mask: np.ndarray, other_past: Feed, other_mask: np.ndarray
           ) -> tuple[Feed, np.ndarray]:
    """Two batches' KV caches and their masks stacked along rows (`other`'s after), trimmed
    (`trimmed`) and left-padded to one width (`stacked_right_aligned`): each row keeps its own
    positions."""
    past, mask = trimmed(past, mask)
    width = max(mask.shape[1], other_mask.shape[1])
    return ({name: stacked_right_aligned([cache, other_past[name]], width)
             for name, cache in past.items()},
            stacked_right_aligned([mask, other_mask], width))


def left_padded(input_ids: np.ndarray, attention_mask: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's real tokens moved to the right end (padding first), with the matching mask."""
    lengths = attention_mask.sum(axis=1)
    width = int(lengths.max())
    ids = np.zeros((len(input_ids), width), dtype=np.int64)
    mask = (np.arange(width)[None, :] >= width - lengths[:, None]).astype(np.int64)
    for i, row in enumerate(input_ids):
        ids[i, width - lengths[i]:] = row[attention_mask[i] == 1]
    return ids, mask


def stacked_right_aligned(arrays: list, width: int) -> np.ndarray:
    """(B1+B2+…, …) masks (B, C) or caches (B, nh, C, hs) stacked along rows, each one's C
    columns at the right end of `width` (zeros before): one copy of each."""
    return _stacked(arrays, width, right=True)


def stacked_left_aligned(arrays: list, width: int) -> np.ndarray:
    """As `stacked_right_aligned`, each one's columns at the left end of `width` (zeros
    after): sources' masks and cross-attention K/V."""
    return _stacked(arrays, width, right=False)


def _stacked(arrays: list, width: int, *, right: bool) -> np.ndarray:
    first = np.asarray(arrays[0])
    axis = 1 if first.ndim == 2 else 2
    shape = list(first.shape)
    shape[0], shape[axis] = sum(len(a) for a in arrays), width
    stacked = np.zeros(shape, dtype=first.dtype)
    start = 0
    for array in arrays:
        array = np.asarray(array)
        columns = [slice(None)] * array.ndim
        columns[0] = slice(start, start + len(array))
        columns[axis] = (slice(width - array.shape[axis], width) if right
                         else slice(0, array.shape[axis]))
        stacked[tuple(columns)] = array
        start += len(array)
    return stacked


def joinable(graphs: dict[str, GraphBackend]) -> bool:
    """Whether a running batch of these graphs can take new rows between steps: a decoder-only
    model's (its steps number positions by their mask), or an encoder-decoder's whose step
    takes the decoder's attention mask (bundles exported by ferry since it does)."""
    return "encoder" not in graphs or "attention_mask" in graphs["decoder_step"].spec.input_names


def decoding_state(graphs: dict[str, GraphBackend], input_ids: np.ndarray,
                   attention_mask: np.ndarray, *, copies: int = 1
                   ) -> EncoderDecoderState | DecoderOnlyState:
    """The decoding state for these graphs: encoder-decoder, or decoder-only continuing a
    prompt."""
    kind = EncoderDecoderState if "encoder" in graphs else DecoderOnlyState
    return kind(graphs, input_ids, attention_mask, copies=copies)
