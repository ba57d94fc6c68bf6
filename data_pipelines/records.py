"""What a source kind's parser works with: skips, and media (images, audio) awaiting their codes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion_train.data.manifest import Skip
from fusion_train.tokenizers.multimodal import AudioCodes, VideoCodes
from fusion_train.tokenizers.video import sound_per_frame


@dataclass
class PendingImage:
    """An image loaded and preprocessed, waiting for its chunk's VQ batch to give it codes."""

    pixels: np.ndarray
    codes: np.ndarray | None = None

    def segment(self) -> np.ndarray:
        return self.codes


@dataclass
class PendingAudio:
    """A clip read as mono samples at the audio tokenizer's rate, waiting for its codes."""

    samples: np.ndarray
    codes: np.ndarray | None = None

    def segment(self) -> AudioCodes:
        return AudioCodes(self.codes)


@dataclass
class PendingVideo:
    """A video read and sampled: its header, its frames and its sound (None: a video without)
    waiting for their codes among the chunk's images and clips; the sound is cut at the frames'
    times (`span`: the sampling period; `code_rate`: the audio tokenizer's code frames a second)."""

    header: str
    frames: list[PendingImage]
    times: np.ndarray
    span: float
    sound: PendingAudio | None
    code_rate: float | None

    def segment(self) -> VideoCodes:
        frames = np.stack([frame.codes for frame in self.frames])
        if self.sound is None:
            return VideoCodes(self.header, frames)
        return VideoCodes(self.header, frames, sound_per_frame(self.sound.codes, self.times, self.span, self.code_rate))


def media_bytes(source: str | bytes | dict, base_dir: Path, kind: str) -> bytes:
    """The encoded bytes of an image or clip given as bytes, a path relative to `base_dir`, or an HF
    datasets struct {"bytes", "path"} (bytes None: the file at path)."""
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, bytes):
        return source
    if not isinstance(source, str):
        raise Skip(f"missing_{kind}")
    path = base_dir / source
    if not path.is_file():
        raise Skip(f"missing_{kind}_file")
    return path.read_bytes()


def resolve(segments: list) -> list:
    """Segments with each pending image, clip or video replaced by its codes."""
    return [s.segment() if isinstance(s, PendingImage | PendingAudio | PendingVideo) else s for s in segments]


def text_field(record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise Skip(f"missing_{name}")
    if not value.strip():
        raise Skip("empty_text")
    return value


def caption_of(record: dict) -> str:
    """A record's caption: its `caption` field, or a WebDataset sample's txt/json member."""
    if "caption_bytes" in record:
        if record["caption_bytes"] is None:
            raise Skip("missing_caption")
        try:
            record = {**record, "caption": record["caption_bytes"].decode("utf-8")}
        except UnicodeDecodeError:
            raise Skip("invalid_utf8") from None
    return text_field(record, "caption")
