"""The special token ids a model was trained with, by role."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecialIds:
    """Padding, the end of a sequence, and the token an encoder-decoder's decoder starts from
    (ferry's own models: `<s>`; BART: `</s>`; Marian: the pad token, as their checkpoints were
    trained); the roles a model may lack (`bos`, `unk`, `mask`: a masked-LM prompt needs
    `mask`) are None when absent."""

    pad: int
    eos: int
    decoder_start: int
    bos: int | None = None
    unk: int | None = None
    mask: int | None = None

    @classmethod
    def from_ids(cls, ids: dict) -> SpecialIds:
        """From a checkpoint's or manifest's `special_ids` (role → id); bundles written before
        `decoder_start` was recorded start decoding from `bos`."""
        start = ids.get("decoder_start")
        return cls(pad=ids["pad"], eos=ids["eos"],
                   decoder_start=ids["bos"] if start is None else start,
                   bos=ids.get("bos"), unk=ids.get("unk"), mask=ids.get("mask"))
