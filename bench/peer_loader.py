"""The training loader against MosaicML Streaming, the data-loading anchor: the demo's image-text
documents (about 80 tokens each, the caption-sized worst case per document), repeated so that one
epoch outlasts the timed batches, written as our WebDataset shards (by our shard writer) and as MDS
shards (by Streaming's writer, about as many shards), read by fusion_train's loader and by
Streaming's `StreamingDataset`, each with its shuffle on, both packed into the same sequences by
our Packer, with 1 and with 2 loader workers. Figures: documents per second after a warm-up.

Same work: before timing, each system reads one epoch in-process, and the documents rebuilt from
its packed sequences must be exactly the shards' documents, each once.

Ours verifies every sample's CRC-32 and validates its ids on every read (the defaults);
Streaming checks nothing per sample (its shard hashes are off by default). mosaicml-streaming's
top-level package imports its vision datasets, which need torchvision, and PyPI's torchvision does
not load beside the CPU build of torch used here: the library's `streaming.base` is loaded without
that package `__init__`.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import sys
import tempfile
import time
import types
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
from side_by_side import alternate, summary
from torch.utils.data import DataLoader, IterableDataset

from data_pipelines.build import ShardSink
from fusion_train.data.loader import DataConfig, SourceConfig, build_loader
from fusion_train.data.manifest import Manifest, token_dtype
from fusion_train.data.packing import Packer
from fusion_train.data.shards import Document, ShardReader
from fusion_train.model.loss import IGNORE_INDEX
from fusion_train.tokenizers.multimodal import TokenizedDocument

SYSTEMS = ("fusion_train/1", "streaming/1", "fusion_train/2", "streaming/2")  # name/loader workers
PEER_OF = {"fusion_train/1": "streaming/1", "streaming/1": "streaming/1",
           "fusion_train/2": "streaming/2", "streaming/2": "streaming/2"}  # fmt: skip
SEQ_LEN, MICRO_BATCH, SEED = 256, 8, 0
BATCHES = {"full": (50, 2000), "toy": (2, 10)}  # warm-up, timed
COPIES = {"full": 200, "toy": 4}  # of each demo document: the full size's epoch is about 100,000 documents
SAMPLES_PER_SHARD = 200  # as the demo's shards


def streaming_base():
    """mosaicml-streaming's `streaming.base` without the package `__init__` (see the docstring)."""
    if "streaming" not in sys.modules:
        package = types.ModuleType("streaming")
        package.__path__ = list(importlib.util.find_spec("streaming").submodule_search_locations)
        sys.modules["streaming"] = package
    import streaming.base

    return streaming.base


def shard_documents(shards: Path) -> list[np.ndarray]:
    """Every document of our shards, in shard order."""
    manifest = Manifest.read(shards)
    documents = []
    for shard in manifest.shards:
        reader = ShardReader(shards / shard.name, manifest.vocab)
        documents += [reader.read(i).tokens for i in range(len(reader))]
        reader.close()
    return documents


def write_ours(documents: list[np.ndarray], like: Manifest, folder: Path) -> Path:
    """The documents as our shards, by our shard writer (checksums, manifest), as the demo's are."""
    folder.mkdir(parents=True)
    manifest = dataclasses.replace(like, shards=[], tokens_by_modality={}, inputs=[])
    sink = ShardSink(folder, manifest, max_samples=SAMPLES_PER_SHARD, max_bytes=1 << 40)
    for i, tokens in enumerate(documents):
        sink.write((0, i), TokenizedDocument(tokens))
    sink.close()
    manifest.write(folder)
    return folder


def write_mds(documents: list[np.ndarray], vocab, folder: Path) -> Path:
    """The documents as MDS shards, by Streaming's writer, about SAMPLES_PER_SHARD to a shard."""
    dtype = token_dtype(vocab)
    size_limit = max(1 << 12, sum(d.astype(dtype).nbytes for d in documents) * SAMPLES_PER_SHARD // len(documents))
    with streaming_base().MDSWriter(out=str(folder), columns={"tokens": f"ndarray:{dtype.name}"},
                                    size_limit=size_limit) as writer:  # fmt: skip
        for tokens in documents:
            writer.write({"tokens": tokens.astype(dtype)})
    return folder


class PackedStreaming(IterableDataset):
    """Streaming's documents, epoch after epoch (or one epoch), packed by our Packer."""

    def __init__(self, mds: Path, vocab, epochs: int | None):
        super().__init__()
        self.mds, self.vocab, self.epochs = mds, vocab, epochs
        self.dataset = streaming_base().StreamingDataset(local=str(mds), shuffle=True, shuffle_seed=SEED, batch_size=1)

    def _documents(self) -> Iterator[tuple[int, Document]]:
        for _ in range(self.epochs) if self.epochs else iter(int, 1):
            for sample in self.dataset:  # each pass is the dataset's next epoch
                yield 0, Document(sample["tokens"].astype(np.int64), None)

    def __iter__(self):
        documents, packer = self._documents(), Packer(SEQ_LEN, self.vocab, ["text"])
        while (sequence := packer.next_sequence(lambda: next(documents, None))) is not None:
            yield sequence


def our_loader(shards: Path, workers: int):
    cfg = DataConfig(sources={"demo": SourceConfig(str(shards))}, seq_len=SEQ_LEN, micro_batch_size=MICRO_BATCH,
                     num_workers=workers, seed=SEED)  # fmt: skip
    return build_loader(cfg)


def streaming_loader(mds: Path, vocab, workers: int, epochs: int | None = None):
    dataset = PackedStreaming(mds, vocab, epochs)
    return DataLoader(dataset, batch_size=MICRO_BATCH, num_workers=workers, persistent_workers=workers > 0)


def documents_per_second(loader, warmup: int, batches: int) -> float:
    iterator = iter(loader)
    for _ in islice(iterator, warmup):  # workers start, first shards open
        pass
    started, documents = time.perf_counter(), 0
    for batch in islice(iterator, batches):
        documents += int(batch["documents_per_source"].sum())  # the Packer's count of documents begun
    return documents / (time.perf_counter() - started)


def rebuilt_documents(loader, count: int) -> list[tuple[int, ...]]:
    """The first `count` whole documents of a loader's packed sequences (one reader, in order): a
    piece whose first label is IGNORE_INDEX opens a document, any other piece continues the last."""
    documents, current = [], None
    for batch in loader:
        for ids, labels, doc_ids in zip(batch["input_ids"], batch["labels"], batch["doc_ids"], strict=True):
            for piece in doc_ids.unique(sorted=True):
                if piece < 0:
                    continue
                where = doc_ids == piece
                tokens = ids[where].tolist()
                if labels[where][0] == IGNORE_INDEX:
                    if current is not None:
                        documents.append(tuple(current))
                    current = tokens
                else:
                    current += tokens
            if len(documents) >= count:
                return documents[:count]
    return documents


def check_same_documents(shards: Path, mds: Path, vocab, expected: Counter) -> dict[str, bool]:
    """One epoch of each system, read in-process: exactly the shards' documents, each once."""
    count = sum(expected.values())
    ours = rebuilt_documents(our_loader(shards, workers=0), count)
    theirs = rebuilt_documents(streaming_loader(mds, vocab, workers=0, epochs=2), count)
    gc.collect()
    return {"fusion_train": Counter(ours) == expected, "streaming": Counter(theirs) == expected}


def compare(size: str, rounds: int, demo: Path | None = None) -> list[dict]:
    """`demo`: a folder make_demo_data built (default: build a small one here)."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if demo is None:
            from data_pipelines.demo import make_demo_data

            demo = Path(make_demo_data(scratch / "demo", images=500, vq_steps=5, sounds=40, audio_steps=5)["folder"])
        demo_manifest = Manifest.read(demo / "shards" / "image_text")
        documents = shard_documents(demo / "shards" / "image_text") * COPIES[size]
        shards = write_ours(documents, demo_manifest, scratch / "shards")
        mds = write_mds(documents, demo_manifest.vocab, scratch / "mds")
        vocab = demo_manifest.vocab
        same = check_same_documents(shards, mds, vocab, Counter(tuple(d.tolist()) for d in documents))
        warmup, batches = BATCHES[size]

        def measure(system: str) -> dict:
            name, workers = system.split("/")
            loader = our_loader(shards, int(workers)) if name == "fusion_train" else streaming_loader(
                mds, vocab, int(workers))  # fmt: skip
            rate = documents_per_second(loader, warmup, batches)
            del loader
            gc.collect()
            return {"system": system, "documents_per_s": rate}

        records = alternate(SYSTEMS, measure, rounds)
    figures = {system: [r["documents_per_s"] for r in runs] for system, runs in records.items()}
    return [
        summary(
            "loader",
            system,
            PEER_OF[system],
            "documents/s",
            figures,
            size=size,
            workers=int(system[-1]),
            seq_len=SEQ_LEN,
            micro_batch=MICRO_BATCH,
            timed_batches=batches,
            documents_per_epoch=len(documents),
            mean_document_tokens=round(float(np.mean([len(d) for d in documents])), 1),
            same_documents_as_shards=same[system.split("/")[0]],
        )  # fmt: skip
        for system in SYSTEMS
    ]
