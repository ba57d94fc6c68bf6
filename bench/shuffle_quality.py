"""How well the loader's epoch order mixes a source written from sorted input: 16 domains, each
filling its own shards, read by 8 ranks x 2 workers through the real loader. For each global batch
(one micro-batch from every rank) it counts the domains among the documents that start in it and
the KL divergence of their histogram from the uniform one (0: perfectly mixed; ln 16 = 2.77: one
domain). Prints one JSON line per shuffle block size: one shard's samples (the order before block
shuffling: whole shards, shuffled within), 2^14, and the default 2^18.

    python bench/shuffle_quality.py [--domains 16] [--shards-per-domain 4] [--per-shard 4096]
        [--ranks 8] [--workers 2] [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from data_pipelines.build import ShardSink
from fusion_train.data.loader import DataConfig, SourceConfig, build_loader
from fusion_train.data.manifest import Manifest
from fusion_train.tokenizers.multimodal import TokenizedDocument
from fusion_train.vocab import VocabLayout

VOCAB = VocabLayout(image_codebook_size=64, image_grid=4, vocab_size=2048, n_reserved=513)


def write_sorted_source(folder: Path, domains: int, per_domain: int, per_shard: int) -> Path:
    """Documents of domain d carry text id text_start + d after <s>; domain after domain."""
    rng = np.random.default_rng(0)
    manifest = Manifest(kind="text", vocab=VOCAB, fingerprints={"text": "bench", "image": None})
    sink = ShardSink(folder, manifest, per_shard, 2**31)
    for domain in range(domains):
        for i in range(per_domain):
            body = rng.integers(VOCAB.text_start, VOCAB.vocab_size, rng.integers(4, 16))
            tokens = np.concatenate([[VOCAB.bos, VOCAB.text_start + domain], body, [VOCAB.eos]]).astype(np.int64)
            sink.write((domain, i), TokenizedDocument(tokens))
    sink.close()
    manifest.write(folder)
    return folder


def batch_domains(batches: list) -> list[int]:
    """The domain of every document that starts in the batches."""
    found = []
    for batch in batches:
        ids = batch["input_ids"].reshape(-1).numpy()
        starts = np.flatnonzero(ids[:-1] == VOCAB.bos)
        found += (ids[starts + 1] - VOCAB.text_start).tolist()
    return found


def measure(source: Path, block: int, args: argparse.Namespace) -> dict:
    cfg = DataConfig(sources={"sorted": SourceConfig(str(source))}, seq_len=256, micro_batch_size=4,
                     num_workers=args.workers, shuffle_block_size=block, seed=1)  # fmt: skip
    loaders = [iter(build_loader(cfg, rank, args.ranks)) for rank in range(args.ranks)]
    counts, divergences = [], []
    for _ in range(args.batches):
        histogram = Counter(batch_domains([next(loader) for loader in loaders]))
        total = sum(histogram.values())
        counts.append(len(histogram))
        divergences.append(sum(n / total * math.log(n / total * args.domains) for n in histogram.values()))
    return {"bench": "shuffle_quality", "shuffle_block_size": block, "domains": args.domains,
            "readers": args.ranks * max(args.workers, 1), "documents_per_batch": total,
            "domains_per_batch_mean": round(float(np.mean(counts)), 2), "domains_per_batch_min": min(counts),
            "kl_from_uniform_mean": round(float(np.mean(divergences)), 3),
            "kl_from_uniform_max": round(max(divergences), 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=int, default=16)
    parser.add_argument("--shards-per-domain", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=4096)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        per_domain = args.shards_per_domain * args.per_shard
        source = write_sorted_source(Path(scratch), args.domains, per_domain, args.per_shard)
        for block in (args.per_shard, 2**14, 2**18):
            print(json.dumps(measure(source, block, args)), flush=True)


if __name__ == "__main__":
    main()
