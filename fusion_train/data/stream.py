"""One source's documents for one reader (a loader worker of one data-parallel rank).

Each epoch has a seeded order of the source's samples, computed from the manifest's counts alone:
the shards are permuted, their samples laid end to end, and each block of `shuffle_block`
consecutive samples of that sequence is permuted. Reader `s` of `S` takes every S-th sample of the
order starting at the s-th, so the S readers together see every sample exactly once per epoch,
and a reader's position is two integers (epoch, position) that are saved and restored without
reading anything (after a change of readers, also the epoch's layer: elastic.py).

Why blocks: all readers move through the order together, so what a global batch can mix is what
one block holds. A block spanning many shards mixes shards written from sorted or per-domain
inputs, and spreads the cluster's reads over that many files (MosaicML Streaming's block shuffle;
its default block is 2^18 samples). Readers keep up to MAX_OPEN shards open for that.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fusion_train.data.elastic import Layer
from fusion_train.data.manifest import DataError, Manifest, Skip
from fusion_train.data.reads import ReadSlot
from fusion_train.data.shards import Document, ShardIndex, ShardReader

log = logging.getLogger(__name__)
MAX_OPEN = 64  # shards a reader keeps open (a file descriptor and a small index each)


class SourceStream:
    def __init__(
        self, name: str, folder: str | Path, manifest: Manifest, reader: int, readers: int, seed: int,
        verify_checksums: bool = True, shuffle_block: int = 2**18, reads: ReadSlot | None = None,
    ):  # fmt: skip
        """`reads`: where this reader posts the shard it is reading (reads.py), if anywhere."""
        self.name, self.folder, self.manifest = name, Path(folder), manifest
        self.reads = reads
        # Shards built before samples carried checksums are read unchecked.
        self.verify_checksums = verify_checksums and manifest.sample_checksums is not None
        self.reader, self.readers = reader, readers
        self.seed = [seed, zlib.crc32(name.encode())]
        self.counts = np.array([s.samples for s in manifest.shards], dtype=np.int64)
        self.total = int(self.counts.sum())
        self.shuffle_block = shuffle_block
        self.layers: dict[int, Layer] = {}  # epochs that continue after a change of readers (elastic.py)
        self._enter_epoch(0)
        self.skipped: Counter = Counter()
        self._order_epoch = None
        self._open: OrderedDict[int, ShardReader] = OrderedDict()
        # The indices of the shards read lately, many more than stay open: a block spans
        # shuffle_block samples, which in small shards is many more shards than MAX_OPEN, and
        # opening one again then costs a file open instead of reading all its headers.
        self._indices: OrderedDict[int, ShardIndex] = OrderedDict()
        self._indexed_samples = 0
        self._block_order: tuple[tuple[int, int], np.ndarray] | None = None

    @property
    def has_samples(self) -> bool:
        """Whether a whole epoch gives this reader any sample."""
        return len(range(self.reader, self.total, self.readers)) > 0

    def _enter_epoch(self, epoch: int) -> None:
        """Start `epoch` at its layer's first element: this reader's share is every readers-th."""
        self.epoch, self.position = epoch, 0
        self.layers = {e: layer for e, layer in self.layers.items() if e >= epoch}
        self.layer = self.layers.get(epoch, Layer())
        self.per_epoch = len(range(self.reader, self.layer.length(self.total), self.readers))

    def continue_elsewhere(self, state: dict) -> None:
        """Take up an epoch that other readers began, from `elastic.rebalance`'s state."""
        self.layers = {int(e): Layer.from_state(layer) for e, layer in state["layers"].items()}
        self._enter_epoch(state["epoch"])

    def _epoch_order(self) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's shard permutation and where each permuted shard starts in the order."""
        if self._order_epoch != self.epoch:
            permutation = np.random.default_rng([*self.seed, self.epoch]).permutation(len(self.counts))
            self._starts = np.concatenate([[0], np.cumsum(self.counts[permutation])])
            self._permutation, self._order_epoch = permutation, self.epoch
        return self._permutation, self._starts

    def _address(self, index: int) -> tuple[int, int]:
        """(shard, sample in shard) of the epoch order's index-th sample."""
        block, offset = divmod(index, self.shuffle_block)
        if self._block_order is None or self._block_order[0] != (self.epoch, block):
            size = min(self.shuffle_block, self.total - block * self.shuffle_block)
            order = np.random.default_rng([*self.seed, self.epoch, block + 1]).permutation(size)
            self._block_order = ((self.epoch, block), order)
        position = block * self.shuffle_block + int(self._block_order[1][offset])
        permutation, starts = self._epoch_order()
        slot = int(np.searchsorted(starts, position, side="right")) - 1
        return int(permutation[slot]), position - int(starts[slot])

    def _reader(self, shard: int) -> ShardReader:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        if len(self._open) == MAX_OPEN:
            self._open.popitem(last=False)[1].close()
        index = self._indices.pop(shard, None)
        if index is not None:
            self._indexed_samples -= len(index)
        path = self.folder / self.manifest.shards[shard].name
        reader = self._open[shard] = ShardReader(path, self.manifest.vocab, self.verify_checksums, index)
        self._remember(shard, reader.index)
        return reader

    def _remember(self, shard: int, index: ShardIndex) -> None:
        """Keep a shard's index, the most recent last: up to two blocks' samples, or the open shards'."""
        self._indices[shard] = index
        self._indexed_samples += len(index)
        while self._indexed_samples > 2 * self.shuffle_block and len(self._indices) > MAX_OPEN:
            self._indexed_samples -= len(self._indices.popitem(last=False)[1])

    def next_document(self) -> Document:
        for _ in range(self.per_epoch + len(range(self.reader, self.total, self.readers)) + 1):
            if self.position >= self.per_epoch:
                self._enter_epoch(self.epoch + 1)
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
        shard, sample = self._address(self.layer.element(self.reader + self.position * self.readers))
        self.position += 1
        if self.reads:
            self.reads.begin(shard)
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
        finally:
            if self.reads:
                self.reads.end()

    def state_dict(self) -> dict:
        layers = {str(e): layer.to_state() for e, layer in self.layers.items()}
        return {"epoch": self.epoch, "position": self.position, "skipped": dict(self.skipped), "layers": layers}

    def load_state_dict(self, state: dict) -> None:
        self.layers = {int(e): Layer.from_state(layer) for e, layer in state.get("layers", {}).items()}
        self._enter_epoch(state["epoch"])
        self.position = state["position"]
        self.skipped = Counter(state["skipped"])
