"""Prompts to ids and generated ids back to text and pictures, with the run's tokenizers.

A prompt is a list of segments: a string (or `{"text": ...}`) is text, `{"image": PATH}` an image
file, VQ-encoded after the SFT prompts' preprocessing (longest side resized, border padded).
`<s>` starts it; a chat prompt (a model after SFT) ends with the end-of-prompt id the SFT shards
put between prompt and answer; an image-mode prompt then opens the image with `<racm3:break>`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fusion_train.generate.constraints import Mode
from fusion_train.tokenizers.image import ImageTokenizer
from fusion_train.tokenizers.multimodal import DocumentTokenizer
from fusion_train.tokenizers.text import TextTokenizer

# A decoded segment: text, or an image as uint8 [H, W, 3].
Segment = str | np.ndarray


class PromptError(ValueError):
    """A prompt that cannot be generated from; the message names it."""


class Codec:
    def __init__(self, text: TextTokenizer, images: ImageTokenizer | None):
        self.text, self.images, self.vocab = text, images, text.vocab
        self.documents = DocumentTokenizer(text, text.vocab)

    def prompt_ids(self, segments: list, mode: Mode | str, chat: bool, where: str, base: Path = Path()) -> list[int]:
        """`where` names the prompt in errors; `base` is the folder relative image paths start from."""
        try:
            mode = Mode(mode)
        except ValueError:
            raise PromptError(f"{where}: mode {mode!r} is not one of {[m.value for m in Mode]}") from None
        if mode != Mode.TEXT and self.images is None:
            raise PromptError(
                f"{where}: {mode.value} mode draws images, which needs the run's image tokenizer (--image-tokenizer)"
            )
        parsed = [self._segment(s, where, base) for s in segments]
        ids = [self.vocab.bos, *self.documents.segments(parsed).tolist()]
        if chat:
            ids.append(self.vocab.sft_separator)
        if mode == Mode.IMAGE:
            ids.append(self.vocab.begin_of_image)
        return ids

    def _segment(self, segment, where: str, base: Path) -> str | np.ndarray:
        if isinstance(segment, dict) and segment.keys() == {"text"}:
            segment = segment["text"]
        if isinstance(segment, str):
            return segment
        if not (isinstance(segment, dict) and segment.keys() == {"image"} and isinstance(segment["image"], str)):
            raise PromptError(f'{where}: segment {segment!r} is neither text nor {{"image": PATH}}')
        if self.images is None:
            raise PromptError(f"{where}: has an image, which needs the run's image tokenizer (--image-tokenizer)")
        path = base / segment["image"]
        try:
            with Image.open(path) as image:
                pixels = self.images.preprocess(image, pad=True)
        except FileNotFoundError:
            raise PromptError(f"{where}: image file {path} does not exist") from None
        except (UnidentifiedImageError, OSError) as err:
            raise PromptError(f"{where}: image file {path} cannot be read as an image ({err})") from None
        return self.images.encode(pixels[None])[0]

    def decode(self, tokens: list[int], mode: Mode | str) -> list[Segment]:
        """Generated ids as text runs and pictures; control ids (stops, markers) are left out. In
        image mode the ids start inside the image the prompt opened."""
        v = self.vocab
        segments, text, block = [], [], [] if Mode(mode) == Mode.IMAGE else None
        for token in tokens:
            if block is not None:
                if token == v.end_of_image:
                    segments.append(self._picture(block))
                    block = None
                elif v.image_code_start <= token < v.image_code_end:
                    block.append(token)
            elif token == v.begin_of_image:
                segments.append(self._text(text))
                text, block = [], []
            elif token >= v.text_start or token == v.unk:
                text.append(token)
        segments.append(self._text(text))
        return [s for s in segments if not isinstance(s, str) or s]

    def _text(self, ids: list[int]) -> str:
        known = self.text.sp.get_piece_size()
        return self.text.decode([[i if i < known else self.vocab.unk for i in ids]])[0]

    def _picture(self, code_ids: list[int]) -> np.ndarray:
        grid = self.vocab.image_grid
        codes = np.asarray(code_ids, dtype=np.int64) - self.vocab.image_code_start
        return self.images.decode(codes.reshape(1, grid, grid))[0]
