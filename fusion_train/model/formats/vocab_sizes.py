"""The vocabulary sizes a user gives on the command line for an export that does not record them
(Meta's release records none; an HF export by transformers' own converter records only names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_train.model.formats import ConversionError
from fusion_train.vocab import CHAMELEON_VOCAB, VocabLayout


@dataclass
class VocabSizes:
    """Layout sizes as a user gave them on the command line; None: not given."""

    image_codebook_size: int | None = None
    image_grid: int | None = None
    n_reserved: int | None = None

    FLAGS: ClassVar[dict] = {
        "image_codebook_size": "--image-codebook-size", "image_grid": "--image-grid", "n_reserved": "--n-reserved",
    }  # fmt: skip

    def given(self) -> list[tuple[str, str, int]]:
        """(flag, field, value) of each size given."""
        return [(flag, f, getattr(self, f)) for f, flag in self.FLAGS.items() if getattr(self, f) is not None]

    def layout(self, vocab_size: int, defaults: VocabLayout = CHAMELEON_VOCAB) -> VocabLayout:
        """The sizes given, the defaults' for the rest; an impossible layout is an error naming the flags."""
        sizes = {f: getattr(defaults, f) for f in self.FLAGS} | {f: v for _, f, v in self.given()}
        try:
            return VocabLayout(**sizes, vocab_size=vocab_size)
        except ValueError as err:
            message = str(err).replace("vocab.vocab_size", "the checkpoint's vocab_size")
            for field, flag in self.FLAGS.items():
                message = message.replace(f"vocab.{field}", flag).replace(field, flag)
            raise ConversionError(message) from None
