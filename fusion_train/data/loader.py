"""The training data stream: a weighted mixture of token-shard sources, packed into sequences, split
over data-parallel ranks and loader workers, resumable to the exact position.

Every (rank, worker) pair is one reader; reader r = rank * workers + worker of R = world * workers
takes its share of each source (see stream.py), draws the source of each next document from its
own seeded generator, and packs (see packing.py). Its whole position is small (per-source epoch
and position, the generator's state, the unfinished document), so torchdata's
StatefulDataLoader saves and restores it per worker, with the loader's own bookkeeping.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from fusion_train.data.elastic import rebalance
from fusion_train.data.manifest import DataError, Manifest
from fusion_train.data.packing import Packer
from fusion_train.data.reads import ReadBoard
from fusion_train.data.stream import SourceStream
from fusion_train.vocab import VocabLayout

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    path: str  # a folder with manifest.json and its shards
    weight: float = 1.0


def as_source(name: str, value: Any) -> SourceConfig:
    """A source given as a mapping (YAML, a command-line override) checked into a SourceConfig."""
    if isinstance(value, SourceConfig):
        return value
    known = [f.name for f in dataclasses.fields(SourceConfig)]
    if not isinstance(value, Mapping) or "path" not in value or set(value) - set(known):
        raise DataError(
            f"data source {name!r} is {value!r}: give it as {{path: FOLDER, weight: W}} (keys {known}, path "
            f"required), e.g. +data.sources.{name}.path=FOLDER"
        )
    try:
        return SourceConfig(path=str(value["path"]), weight=float(value.get("weight", 1.0)))
    except (TypeError, ValueError):
        raise DataError(f"data source {name!r}: weight must be a number, not {value.get('weight')!r}") from None


@dataclass
class DataConfig:
    # name -> SourceConfig. Plain mappings in the schema, checked into SourceConfigs on creation:
    # OmegaConf cannot add a key to a dict of dataclasses, so `+data.sources.NAME.path=...` would fail.
    sources: dict[str, Any] = field(default_factory=dict)
    # Multipliers on the weights of named sources: Chameleon's stage 2 halves the stage-1 sources.
    reweight: dict[str, float] = field(default_factory=dict)
    mixture_unit: str = "documents"  # what the weights are proportions of: "documents" or "tokens"
    seq_len: int = 4096
    micro_batch_size: int = 1
    num_workers: int = 2
    seed: int = 0
    # Samples of a source shuffled together (stream.py): many shards' worth, so that a global batch
    # mixes shards written from sorted or per-domain inputs. MosaicML Streaming's default.
    shuffle_block_size: int = 2**18
    # A saved position that does not fit (another split, seed, sources or shuffle block): restart
    # the data order, where another split would otherwise continue the epoch (elastic.py).
    restart_data_order: bool = False
    # Check each sample's CRC-32 on every read: a mismatch is a counted `checksum_mismatch` skip.
    verify_checksums: bool = True
    # Attention confined to each packed document (the batches' doc_ids) rather than causal over the
    # whole sequence. Off: Chameleon, like LLaMA-2 before it, packs documents under plain causal
    # attention (docs/performance.md). The training data's setting holds for validation too.
    document_mask: bool = False
    # Documents of at least long_document_tokens drawn long_document_weight times as often as
    # shorter ones (a long-context stage): each shorter document read is passed over with
    # probability 1 - 1/weight. 1: every document as it comes.
    long_document_tokens: int = 0
    long_document_weight: float = 1.0

    def __post_init__(self) -> None:
        self.sources = {name: as_source(name, value) for name, value in self.sources.items()}
        if self.shuffle_block_size < 1:
            raise DataError(f"data.shuffle_block_size={self.shuffle_block_size} must be positive")
        if self.long_document_weight < 1:
            raise DataError(f"data.long_document_weight={self.long_document_weight} must be at least 1")


def source_weights(cfg: DataConfig, manifests: dict[str, Manifest]) -> dict[str, float]:
    """Probability of drawing each source's next document. Weights given per token (Chameleon
    states its mixture in tokens) become per-document by dividing by mean document length."""
    unknown = sorted(set(cfg.reweight) - set(cfg.sources))
    if unknown:
        raise DataError(f"data.reweight names sources that data.sources lacks: {unknown}")
    if cfg.mixture_unit not in ("documents", "tokens"):
        raise DataError(f"data.mixture_unit must be 'documents' or 'tokens', not {cfg.mixture_unit!r}")
    weights = {name: source.weight * cfg.reweight.get(name, 1.0) for name, source in cfg.sources.items()}
    if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise DataError(f"data source weights must be non-negative with a positive sum; got {weights}")
    if cfg.mixture_unit == "tokens":
        for name, manifest in manifests.items():
            weights[name] /= max(1, sum(s.tokens for s in manifest.shards)) / max(1, manifest.samples)
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def check_shards_present(name: str, folder: str | Path, manifest: Manifest) -> None:
    """One directory listing per source: a source none of whose shards is there stops the run
    before the model is built; one missing a few loses only those (counted skips)."""
    present = set(os.listdir(folder))
    missing = [s.name for s in manifest.shards if s.name not in present]
    if len(missing) == len(manifest.shards):
        raise DataError(
            f"source {name}: none of the {len(missing)} shards its manifest lists is in {folder} "
            f"(first: {missing[0]}); were the shards moved? point data.sources.{name}.path at them"
        )
    if missing:
        log.warning("source %s: %d of %d shards missing from %s (first: %s): their samples are skipped",
                    name, len(missing), len(manifest.shards), folder, missing[0])  # fmt: skip


def _source_manifest(name: str, source: SourceConfig) -> Manifest:
    try:
        return Manifest.read(source.path)
    except DataError as err:
        raise DataError(f"source {name} (path {source.path}): {err}") from None


def read_manifests(cfg: DataConfig, expected_fingerprints: dict[str, str] | None = None) -> dict[str, Manifest]:
    """Every source's manifest; all must share one vocabulary layout and tokenizers, the run's."""
    manifests = {name: _source_manifest(name, source) for name, source in cfg.sources.items()}
    for name, manifest in manifests.items():
        check_shards_present(name, cfg.sources[name].path, manifest)
    reference = dict(expected_fingerprints or {})
    vocab = None
    for name, manifest in manifests.items():
        for tokenizer, fingerprint in manifest.fingerprints.items():
            if fingerprint is None:
                continue  # e.g. text shards did not use the image tokenizer
            expected = reference.setdefault(tokenizer, fingerprint)
            if fingerprint != expected:
                raise DataError(
                    f"source {name} ({cfg.sources[name].path}) was built with {tokenizer} tokenizer {fingerprint}, "
                    f"but this run uses {expected}: rebuild its shards with the run's tokenizers"
                )
        if vocab is not None and manifest.vocab != vocab:
            raise DataError(f"source {name} has vocabulary layout {manifest.vocab}, other sources {vocab}")
        vocab = manifest.vocab
    return manifests


class MixtureDataset(IterableDataset):
    def __init__(self, cfg: DataConfig, rank: int, world_size: int, expected_fingerprints: dict | None = None):
        super().__init__()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.manifests = read_manifests(cfg, expected_fingerprints)
        self.names = list(cfg.sources)
        weights = source_weights(cfg, self.manifests)
        self.probabilities = np.array([weights[n] for n in self.names])
        self.vocab: VocabLayout = next(iter(self.manifests.values())).vocab
        # The tokenizers that made the data (read_manifests checked that the sources agree).
        self.fingerprints = {k: v for m in self.manifests.values() for k, v in m.fingerprints.items() if v}
        unchecked = [n for n, m in self.manifests.items() if m.sample_checksums is None]
        if unchecked and cfg.verify_checksums and rank == 0:
            log.warning("sources %s were built before samples carried checksums: read without verification; "
                        "rebuild their shards to have every read checked", unchecked)  # fmt: skip
        Packer(cfg.seq_len, self.vocab, self.names)  # checks seq_len before any worker starts
        self.reads = ReadBoard(cfg.num_workers)
        self._pending_state: dict | None = None
        self._continued: dict | None = None  # per source, where readers of another split left off

    def identity(self, workers: int) -> dict:
        """What a saved position is only valid for."""
        return {"world_size": self.world_size, "workers": workers, "seed": self.cfg.seed, "sources": self.names,
                "shuffle_block_size": self.cfg.shuffle_block_size}  # fmt: skip

    def __iter__(self):
        # Set up before returning: the loader asks for the state right after iter(), before any next().
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        reads = self.reads.slots(worker, len(self.names))
        self.streams = [
            SourceStream(
                n, self.cfg.sources[n].path, self.manifests[n], reader, readers, self.cfg.seed,
                self.cfg.verify_checksums, self.cfg.shuffle_block_size, reads[i],
            )
            for i, n in enumerate(self.names)
        ]  # fmt: skip
        usable = np.array([s.has_samples for s in self.streams])
        if not usable[self.probabilities > 0].any():
            raise DataError(
                f"reader {reader} of {readers} has no samples in any source: fewer samples than ranks x workers"
            )
        # A source with fewer samples than readers leaves some readers without any: they draw from the rest.
        # Cumulative draw probabilities: a source is where a uniform number falls (unusable ones have no width).
        self.draw = np.cumsum(np.where(usable, self.probabilities, 0.0))
        self.rng = np.random.default_rng([self.cfg.seed, reader, readers])
        self.packer = Packer(self.cfg.seq_len, self.vocab, self.names)
        if self._pending_state is not None:
            self._restore(self._pending_state)
        if self._continued is not None:
            for stream in self.streams:
                stream.continue_elsewhere(self._continued[stream.name])
        return self._sequences()

    def continue_from(self, reader_states: list[dict]) -> None:
        """Continue the epochs that another split's readers (their states, in reader order) left."""
        self._continued = {
            name: rebalance(self.manifests[name].samples, [state["streams"][name] for state in reader_states])
            for name in self.names
        }

    def _sequences(self):
        reported_skips = self.skipped_total()
        while True:
            sequence = self.packer.next_sequence(self._next_document)
            skips = self.skipped_total()
            sequence["skipped_samples"] = torch.tensor(skips - reported_skips)
            reported_skips = skips
            yield sequence

    def _next_document(self):
        while True:
            source = int(np.searchsorted(self.draw, self.rng.random() * self.draw[-1], side="right"))
            document = self.streams[source].next_document()
            if self._kept(document):
                return source, document

    def _kept(self, document) -> bool:
        """Whether a document read is trained on (data.long_document_weight)."""
        if self.cfg.long_document_weight == 1 or len(document.tokens) >= self.cfg.long_document_tokens:
            return True
        return self.rng.random() < 1 / self.cfg.long_document_weight

    def shard_name(self, source: int, shard: int) -> str:
        name = self.names[source]
        return f"{Path(self.cfg.sources[name].path) / self.manifests[name].shards[shard].name} (source {name})"

    def fresh_state(self) -> dict:
        """The position of a reader that has read nothing."""
        return {"streams": {name: {"epoch": 0, "position": 0} for name in self.names}}

    def skipped_total(self) -> int:
        return sum(sum(s.skipped.values()) for s in self.streams)

    def state_dict(self) -> dict:
        return {
            "streams": {s.name: s.state_dict() for s in self.streams},
            "rng": self.rng.bit_generator.state,
            "packer": self.packer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._pending_state = state  # applied when the (worker's) iterator starts

    def _restore(self, state: dict) -> None:
        for stream in self.streams:
            stream.load_state_dict(state["streams"][stream.name])
        self.rng.bit_generator.state = state["rng"]
        self.packer.load_state_dict(state["packer"])


SPLIT = ("world_size", "workers")  # what a saved position may differ in and still continue (elastic.py)


def reader_states(state: dict) -> list[dict | None]:
    """The dataset states of one rank's readers (its loader workers, in order) in a saved position;
    None for a worker that had not produced a batch."""
    inner = state["loader"]
    if "_snapshot" not in inner:
        return [inner.get("dataset_state")]
    workers = inner["_snapshot"]["_worker_snapshots"]
    return [workers[f"worker_{i}"]["dataset_state"] for i in range(len(workers))]


class TokenLoader(StatefulDataLoader):
    """A StatefulDataLoader whose saved position resumes exactly with the same split of the data;
    with another number of ranks or workers it continues the epochs from every old rank's
    position (`every_rank`); another seed, set of sources or shuffle block is refused unless the
    config says to restart the data order."""

    def state_dict(self) -> dict:
        return {"identity": self.dataset.identity(max(self.num_workers, 1)), "loader": super().state_dict()}

    def stalled_read(self) -> str:
        """The loader worker most likely holding the next batch back, and its shard (reads.py)."""
        return self.dataset.reads.stalled(self.dataset.shard_name)

    def load_state_dict(self, state: dict, every_rank: Callable[[], list[dict]] | None = None) -> None:
        """`every_rank()`: every old rank's saved loader state, in rank order; read only when the
        split changed."""
        saved, current = state["identity"], self.dataset.identity(max(self.num_workers, 1))
        if saved == current:
            super().load_state_dict(state["loader"])
            return
        same_data = all(saved[k] == current[k] for k in current if k not in SPLIT)
        if same_data and every_rank is not None and not self.dataset.cfg.restart_data_order:
            readers = [reader for rank_state in every_rank() for reader in reader_states(rank_state)]
            self.dataset.continue_from([s or self.dataset.fresh_state() for s in readers])
            log.warning("data position continued from %d readers (%d ranks x %d workers) on this split's %d",
                        len(readers), saved["world_size"], saved["workers"],
                        current["world_size"] * current["workers"])  # fmt: skip
            return
        if not self.dataset.cfg.restart_data_order:
            need = (
                "give every old rank's position (every_rank)"
                if same_data
                else "resume with the same seed, sources and shuffle block"
            )
            raise DataError(
                f"the saved data position is for {saved}, this run is {current}: {need}, or set "
                "data.restart_data_order=true to start the data order anew"
            )
        log.warning("data order restarted: saved position is for %s, this run is %s", saved, current)


def build_loader(
    cfg: DataConfig, rank: int = 0, world_size: int = 1, expected_fingerprints: dict | None = None
) -> TokenLoader:
    dataset = MixtureDataset(cfg, rank, world_size, expected_fingerprints)
    return TokenLoader(
        dataset,
        batch_size=cfg.micro_batch_size,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU without a staging copy
        # Its own generator: each new iterator draws a base seed, which from the global one would
        # shift the dropout masks of a resumed run (it starts iterating after restoring the RNG).
        generator=torch.Generator().manual_seed(cfg.seed),
    )
