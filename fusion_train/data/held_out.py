"""Held-out data for validation: every source scored on its own, each of its samples once.

A rank reads its share of a source (every world_size-th sample of the source's first-epoch order,
as training's readers do) from the start at each validation, packs it like training data and
stops at the end of its share, or after `max_batches` micro-batches: the same samples every
time, none of them twice. The sources are kept apart so that each has its own loss; their
weights do not matter here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fusion_train.data.loader import DataConfig, read_manifests
from fusion_train.data.manifest import DataError
from fusion_train.data.packing import Packer
from fusion_train.data.stream import SourceStream
from fusion_train.model.loss import IGNORE_INDEX
from fusion_train.vocab import VocabLayout


@dataclass
class Coverage:
    """How much of a source one validation scored, summed over ranks."""

    samples: int  # read and scored (in part, for the last one of a capped pass)
    skipped: int  # unreadable, counted
    total: int  # in the source's manifest

    @property
    def full_pass(self) -> bool:
        return self.samples + self.skipped >= self.total

    def describe(self, max_batches: int | None) -> str:
        if self.full_pass:
            return f"one full pass, {self.samples:,} samples" + (
                f" ({self.skipped:,} unreadable)" if self.skipped else ""
            )
        return (
            f"the first {max_batches} micro-batches per rank (trainer.eval_batches), {self.samples:,} of "
            f"{self.total:,} samples: the same ones each time"
        )


class HeldOutSet:
    def __init__(
        self, cfg: DataConfig, rank: int, world_size: int, vocab: VocabLayout, fingerprints: dict[str, str],
        max_batches: int | None,
    ):  # fmt: skip
        """`vocab` and `fingerprints`: the training data's, which the held-out shards must share."""
        self.cfg, self.rank, self.world_size, self.max_batches = cfg, rank, world_size, max_batches
        self.manifests = read_manifests(cfg, fingerprints)
        for name, manifest in self.manifests.items():
            if manifest.vocab != vocab:
                raise DataError(
                    f"held-out source {name} ({cfg.sources[name].path}) has vocabulary layout {manifest.vocab}, "
                    f"the training data {vocab}: build it with the training run's tokenizers"
                )
        Packer(cfg.seq_len, vocab, list(cfg.sources))  # checks seq_len now rather than at the first validation
        self.names, self.vocab = list(cfg.sources), vocab
        self.streams: dict[str, SourceStream] = {}

    def batches(self, name: str) -> Iterator[dict]:
        """This rank's micro-batches of source `name`, from its start; a short last batch is
        completed with padding rows."""
        source = self.cfg.sources[name]
        stream = SourceStream(
            name, source.path, self.manifests[name], self.rank, self.world_size, self.cfg.seed,
            self.cfg.verify_checksums, self.cfg.shuffle_block_size,
        )  # fmt: skip
        self.streams[name] = stream
        documents = ((0, document) for document in self._readable(stream))
        packer = Packer(self.cfg.seq_len, self.vocab, [name])
        produced = 0
        while self.max_batches is None or produced < self.max_batches:
            rows = []
            while len(rows) < self.cfg.micro_batch_size and (
                row := packer.next_sequence(lambda: next(documents, None))
            ):
                rows.append(row)
            if not rows:
                return
            yield self._batch(rows)
            produced += 1
            if len(rows) < self.cfg.micro_batch_size:
                return

    @staticmethod
    def _readable(stream: SourceStream) -> Iterator:
        """The stream's documents; a share of which none could be read is an error (the shards
        are gone or damaged), not a validation of nothing."""
        yield from stream.rest_of_epoch()
        skipped = sum(stream.skipped.values())
        if stream.per_epoch and skipped == stream.per_epoch:
            raise DataError(
                f"none of the {skipped} samples of held-out source {stream.name} this rank reads could be read "
                f"({dict(stream.skipped)}): check its shards with `fusion-data verify {stream.folder}`"
            )

    def padding_batch(self) -> dict:
        """A micro-batch that scores nothing: for a rank whose share has ended while others' go on."""
        return self._batch([])

    def _batch(self, rows: list[dict]) -> dict:
        shape = (self.cfg.micro_batch_size, self.cfg.seq_len)
        batch = {
            "input_ids": torch.full(shape, self.vocab.pad, dtype=torch.long),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
            "doc_ids": torch.full(shape, -1, dtype=torch.long),  # padding, as the Packer numbers it
            "in_video": torch.zeros(shape, dtype=torch.bool),
        }
        for i, row in enumerate(rows):
            for key, values in batch.items():
                values[i] = row[key]
        return batch

    def read_counts(self, name: str) -> list[int]:
        """[samples scored, samples skipped] by this rank in its last pass over `name`."""
        stream = self.streams[name]
        skipped = sum(stream.skipped.values())
        return [stream.position - skipped, skipped]

    def coverage(self, name: str, scored: int, skipped: int) -> Coverage:
        return Coverage(scored, skipped, self.manifests[name].samples)
