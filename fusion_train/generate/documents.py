"""Prompts to ids and generated ids back to text and pictures, with the run's tokenizers.

A prompt is a list of segments: a string (or `{"text": ...}`) is text, `{"image": PATH}` an image
file, VQ-encoded after the SFT prompts' preprocessing (longest side resized, border padded),
`{"audio": PATH}` a sound file, read at the audio tokenizer's rate and encoded. `<s>` starts it; a
chat prompt (a model after SFT) ends with the end-of-prompt id the SFT shards put between prompt
and answer; an image-mode prompt then opens the image with `<racm3:break>`, an audio-mode prompt
the clip with `<begin-audio>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fusion_train.generate.constraints import Mode
from fusion_train.tokenizers.audio import AudioError, AudioTokenizer
from fusion_train.tokenizers.image import ImageTokenizer
from fusion_train.tokenizers.multimodal import AudioCodes, DocumentTokenizer
from fusion_train.tokenizers.text import TextTokenizer


@dataclass
class Sound:
    """A decoded clip: float32 mono samples at `rate`, and the codes they came from [levels, frames]."""

    samples: np.ndarray
    rate: int
    codes: np.ndarray


# A decoded segment: text, an image as uint8 [H, W, 3], or a sound.
Segment = str | np.ndarray | Sound
MEDIA = {Mode.IMAGE: "image", Mode.AUDIO: "audio"}  # what each mode's output needs a tokenizer for


class PromptError(ValueError):
    """A prompt that cannot be generated from; the message names it."""


def read_prompt_records(path: Path) -> list[tuple[int, dict]]:
    """A prompts file's records with their line numbers: JSONL of {"prompt": [segments], "mode": ...,
    ...}, blank lines skipped; a line that is not one is an error naming it."""
    if not path.is_file():
        raise PromptError(f"prompts file {path} does not exist")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptError(f"{path}, line {number}: not JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), list):
            raise PromptError(f'{path}, line {number}: expected {{"prompt": [segments], "mode": ...}}')
        records.append((number, record))
    return records


class Codec:
    def __init__(self, text: TextTokenizer, images: ImageTokenizer | None, audio: AudioTokenizer | None = None):
        self.text, self.images, self.audio, self.vocab = text, images, audio, text.vocab
        self.documents = DocumentTokenizer(text, text.vocab)

    def prompt_ids(self, segments: list, mode: Mode | str, chat: bool, where: str, base: Path = Path()) -> list[int]:
        """`where` names the prompt in errors; `base` is the folder relative image paths start from."""
        try:
            mode = Mode(mode)
        except ValueError:
            raise PromptError(f"{where}: mode {mode!r} is not one of {[m.value for m in Mode]}") from None
        if mode in (Mode.IMAGE, Mode.INTERLEAVED) and self.images is None:
            raise PromptError(
                f"{where}: {mode.value} mode draws images, which needs the run's image tokenizer (--image-tokenizer)"
            )
        if mode == Mode.AUDIO and self.audio is None:
            raise PromptError(f"{where}: audio mode makes sound, which needs the run's audio tokenizer "
                              "(--audio-tokenizer) and a model whose vocabulary has audio codes")  # fmt: skip
        parsed = [self._segment(s, where, base) for s in segments]
        ids = [self.vocab.bos, *self.documents.segments(parsed).tolist()]
        if chat:
            ids.append(self.vocab.sft_separator)
        if mode == Mode.IMAGE:
            ids.append(self.vocab.begin_of_image)
        if mode == Mode.AUDIO:
            ids.append(self.vocab.begin_of_audio)
        return ids

    def _segment(self, segment, where: str, base: Path) -> str | np.ndarray | AudioCodes:
        if isinstance(segment, dict) and segment.keys() == {"text"}:
            segment = segment["text"]
        if isinstance(segment, str):
            return segment
        if isinstance(segment, dict) and segment.keys() == {"audio"} and isinstance(segment["audio"], str):
            return self._clip(base / segment["audio"], where)
        if not (isinstance(segment, dict) and segment.keys() == {"image"} and isinstance(segment["image"], str)):
            raise PromptError(f'{where}: segment {segment!r} is neither text, {{"image": PATH}} nor {{"audio": PATH}}')
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

    def _clip(self, path: Path, where: str) -> AudioCodes:
        if self.audio is None:
            raise PromptError(f"{where}: has audio, which needs the run's audio tokenizer (--audio-tokenizer)")
        try:
            return AudioCodes(self.audio.encode([self.audio.read(path)])[0])
        except AudioError as err:
            raise PromptError(f"{where}: audio file {path}: {err}") from None

    def decode(self, tokens: list[int], mode: Mode | str) -> list[Segment]:
        """Generated ids as text runs, pictures and sounds; control ids (stops, markers) are left
        out. In image and audio modes the ids start inside the block the prompt opened."""
        v = self.vocab
        ends = {v.begin_of_image: v.end_of_image, v.begin_of_audio: v.end_of_audio}
        opened = {Mode.IMAGE: v.begin_of_image, Mode.AUDIO: v.begin_of_audio}.get(Mode(mode))
        segments, text, block = [], [], [] if opened is not None else None
        for token in tokens:
            if block is not None:
                if token == ends[opened]:
                    segments.append(self._picture(block) if opened == v.begin_of_image else self._sound(block))
                    block = None
                else:
                    block.append(token)
            elif token in ends and (token == v.begin_of_image or self.audio is not None):
                segments.append(self._text(text))
                text, block, opened = [], [], token
            elif v.text_start <= token < v.text_end or token == v.unk:
                text.append(token)
        segments.append(self._text(text))
        return [s for s in segments if not isinstance(s, str) or s]

    def _sound(self, code_ids: list[int]) -> Sound:
        whole = len(code_ids) - len(code_ids) % self.vocab.audio_levels  # a clip cut short by the budget
        codes = self.vocab.ids_to_audio_codes(torch.tensor(code_ids[:whole], dtype=torch.long)).numpy()
        return Sound(self.audio.decode(codes) if codes.size else np.zeros(0, np.float32), self.audio.sampling_rate,
                     codes)  # fmt: skip

    def _text(self, ids: list[int]) -> str:
        known = self.text.sp.get_piece_size()
        return self.text.decode([[i if i < known else self.vocab.unk for i in ids]])[0]

    def _picture(self, code_ids: list[int]) -> np.ndarray:
        grid = self.vocab.image_grid
        codes = np.asarray(code_ids, dtype=np.int64) - self.vocab.image_code_start
        return self.images.decode(codes.reshape(1, grid, grid))[0]
