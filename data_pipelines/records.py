"""What a source kind's parser works with: skips and images awaiting their codes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion_train.data.manifest import Skip


@dataclass
class PendingImage:
    """An image loaded and preprocessed, waiting for its chunk's VQ batch to give it codes."""

    pixels: np.ndarray
    codes: np.ndarray | None = None


def resolve(segments: list) -> list:
    """Segments with each pending image replaced by its codes."""
    return [s.codes if isinstance(s, PendingImage) else s for s in segments]


def text_field(record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise Skip(f"missing_{name}")
    if not value.strip():
        raise Skip("empty_text")
    return value
