"""Continuing an epoch with another number of readers (ranks x loader workers).

A source's epoch order does not depend on the readers (stream.py); what depends on them is who
reads which position: reader r of R takes elements r, r + R, r + 2R, ... of the epoch's *layer*,
the positions still to read. A fresh epoch's layer is the whole order. When R changes, the saved
positions of all old readers say which elements of the layer they consumed: every element below
the frontier F (the smallest element not consumed) was, and above it at most a few per reader
were. The new layer is the unconsumed elements up to the last consumed one (the holes), then the
rest of the order: the new readers split it the same way, so every sample of the epoch is read
once, across any number of changes. Readers may be in different epochs (a reader finished its
share first), so a layer is kept per epoch still in progress.

Documents in a reader's unfinished sequence (the packer's) count as consumed: the rest of such a
document is not trained on. The mixture's draws after a change come from new generators, so the
sources of the next documents differ from what the old readers would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Layer:
    """The positions of an epoch's order still to read: `holes` first, then `base`, `base + 1`, ..."""

    holes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    base: int = 0

    def length(self, total: int) -> int:
        return len(self.holes) + total - self.base

    def element(self, index: int) -> int:
        """The order position of the layer's index-th element."""
        return int(self.holes[index]) if index < len(self.holes) else self.base + index - len(self.holes)

    def to_state(self) -> dict:
        return {"holes": self.holes.tolist(), "base": self.base}

    @classmethod
    def from_state(cls, state: dict) -> Layer:
        return cls(np.asarray(state["holes"], dtype=np.int64), state["base"])


def _consumed_elements(layer_length: int, positions: dict[int, int | None], readers: int) -> tuple[int, np.ndarray]:
    """(frontier, consumed elements above it) of one layer; `positions[r]` is how many of its
    elements reader r consumed, None when it finished its share."""
    next_element = {r: (r + k * readers if k is not None else layer_length) for r, k in positions.items()}
    frontier = min(min(next_element.values()), layer_length)
    consumed = [np.arange(r + ((frontier - r + readers - 1) // readers) * readers, next_element[r], readers)
                for r in positions if next_element[r] > frontier]  # fmt: skip
    return frontier, np.sort(np.concatenate(consumed)) if consumed else np.zeros(0, dtype=np.int64)


def rebalanced_layer(layer: Layer, total: int, positions: dict[int, int | None], readers: int) -> Layer:
    """The layer the next readers split, whatever their number."""
    frontier, consumed = _consumed_elements(layer.length(total), positions, readers)
    last = int(consumed[-1]) if len(consumed) else frontier - 1
    elements = np.concatenate(
        [np.setdiff1d(np.arange(frontier, last + 1), consumed), np.arange(last + 1, len(layer.holes))]
    )
    holes = np.array([layer.element(int(i)) for i in elements], dtype=np.int64)
    return Layer(holes, layer.base + max(0, last + 1 - len(layer.holes)))


def rebalance(total: int, readers: list[dict]) -> dict:
    """From every old reader's stream state of one source ({"epoch", "position", "layers"}, in
    reader order), the state all new readers start from: {"epoch", "layers"} with position 0."""
    count = len(readers)
    first, last = min(r["epoch"] for r in readers), max(r["epoch"] for r in readers)
    layers = {}
    for epoch in range(first, last + 1):
        # Readers not past this epoch still hold its layer (a fresh epoch has none).
        old = next((s["layers"][str(epoch)] for s in readers if str(epoch) in s.get("layers", {})), None)
        layer = Layer.from_state(old) if old else Layer()
        positions = {
            r: (None if state["epoch"] > epoch else state["position"] if state["epoch"] == epoch else 0)
            for r, state in enumerate(readers)
        }
        layers[str(epoch)] = rebalanced_layer(layer, total, positions, count).to_state()
    return {"epoch": first, "layers": layers}
