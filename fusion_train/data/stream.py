"""One source's documents for one reader (a loader worker of one data-parallel rank).

Each epoch has a seeded order of the source's samples: the shards permuted, and the samples of
each shard permuted, computed from the manifest's counts alone. Reader `s` of `S` takes every S-th
sample of that order starting at the s-th, so the S readers together see every sample exactly
once per epoch, and a reader's position is two integers (epoch, position) that are saved and
restored without reading anything.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fusion_train.data.manifest import DataError, Manifest, Skip
from fusion_train.data.shards import Document, ShardReader

log = logging.getLogger(__name__)


class SourceStream:
    def __init__(
        self, name: str, folder: str | Path, manifest: Manifest, reader: int, readers: int, seed: int,
        verify_checksums: bool = True,
    ):  # fmt: skip
        self.name, self.folder, self.manifest = name, Path(folder), manifest
        # Shards built before samples carried checksums are read unchecked.
        self.verify_checksums = verify_checksums and manifest.sample_checksums is not None
        self.reader, self.readers = reader, readers
        self.seed = [seed, zlib.crc32(name.encode())]
        self.counts = np.array([s.samples for s in manifest.shards], dtype=np.int64)
        self.total = int(self.counts.sum())
        self.per_epoch = len(range(reader, self.total, readers))
        self.epoch, self.position = 0, 0
        self.skipped: Counter = Counter()
        self._order_epoch = None
        self._open: tuple[int, ShardReader] | None = None
        self._shard_order: tuple[int, np.ndarray] | None = None

    @property
    def has_samples(self) -> bool:
        return self.per_epoch > 0

    def _epoch_order(self) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's shard permutation and where each permuted shard starts in the order."""
        if self._order_epoch != self.epoch:
            permutation = np.random.default_rng([*self.seed, self.epoch]).permutation(len(self.counts))
            self._starts = np.concatenate([[0], np.cumsum(self.counts[permutation])])
            self._permutation, self._order_epoch = permutation, self.epoch
        return self._permutation, self._starts

    def _address(self, index: int) -> tuple[int, int]:
        """(shard, sample in shard) of the epoch order's index-th sample."""
        permutation, starts = self._epoch_order()
        slot = int(np.searchsorted(starts, index, side="right")) - 1
        shard = int(permutation[slot])
        if self._shard_order is None or self._shard_order[0] != (self.epoch, shard):
            order = np.random.default_rng([*self.seed, self.epoch, shard + 1]).permutation(self.counts[shard])
            self._shard_order = ((self.epoch, shard), order)
        return shard, int(self._shard_order[1][index - starts[slot]])

    def _reader(self, shard: int) -> ShardReader:
        if self._open is None or self._open[0] != shard:
            if self._open is not None:
                self._open[1].close()
            path = self.folder / self.manifest.shards[shard].name
            self._open = (shard, ShardReader(path, self.manifest.vocab, self.verify_checksums))
        return self._open[1]

    def next_document(self) -> Document:
        for _ in range(self.per_epoch + 1):
            if self.position >= self.per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            document = self._read_next()
            if document is not None:
                return document
        raise DataError(f"source {self.name} ({self.folder}): no usable sample in a whole epoch of this reader")

    def rest_of_epoch(self) -> Iterator[Document]:
        """This reader's remaining documents of the current epoch, each once (validation)."""
        while self.position < self.per_epoch:
            document = self._read_next()
            if document is not None:
                yield document

    def _read_next(self) -> Document | None:
        """The document at the position, or None when it is skipped (counted); then move on."""
        shard, sample = self._address(self.reader + self.position * self.readers)
        self.position += 1
        try:
            return self._reader(shard).read(sample)
        except Skip as skip:
            if not self.skipped[skip.reason]:
                log.warning(
                    "source %s: skipping bad samples (%s), first in %s",
                    self.name,
                    skip.reason,
                    self.manifest.shards[shard].name,
                )
            self.skipped[skip.reason] += 1
            return None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.skipped = Counter(state["skipped"])
