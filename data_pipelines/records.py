"""What a source kind's parser works with: skips, and media (images, audio) awaiting their codes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion_train.data.manifest import Skip
from fusion_train.tokenizers.multimodal import AudioCodes


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
    """Segments with each pending image or clip replaced by its codes."""
    return [s.segment() if isinstance(s, PendingImage | PendingAudio) else s for s in segments]


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
