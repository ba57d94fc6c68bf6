"""Tokens and documents per second the training loader delivers from real shards: in the main
process (workers 0: the readers' own rate), with 1 and 2 workers, with per-sample checksum
verification on and off; and the throughput of the integrity hashes themselves (XXH3-128 over
whole shards, CRC-32 over sample bytes) on the same files.

Builds text shards from CPython's bundled documentation (a real SentencePiece model trained on
it first), as whole documents ("long") and as their lines ("short", caption-sized), unless
--shards names an existing folder; then times packed batches after a warm-up. Prints one JSON
line per measurement.

    python bench/loader_throughput.py [--shards DIR] [--seq-len 4096] [--batches 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from itertools import islice
from pathlib import Path

from data_pipelines.build import BuildSettings, build_shards
from fusion_train.data.loader import DataConfig, SourceConfig, build_loader
from fusion_train.data.manifest import file_hash, sample_checksum
from fusion_train.tokenizers.text import train_text_tokenizer
from fusion_train.vocab import VocabLayout


def make_shards(folder: Path, copies: int) -> dict[str, Path]:
    from pydoc_data.topics import topics

    documents = {
        "long": [f"{copy} {text}" for copy in range(copies) for text in topics.values()],
        "short": [line for text in topics.values() for line in text.splitlines() if len(line.split()) >= 4],
    }
    for name, texts in documents.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    vocab = VocabLayout(image_codebook_size=512, image_grid=8, vocab_size=8192, n_reserved=513)
    train_text_tokenizer([folder / "long.jsonl"], folder / "text.model", vocab)
    for name in documents:
        settings = BuildSettings("text", str(folder / "text.model"))
        build_shards(settings, [folder / f"{name}.jsonl"], folder / name, max_samples_per_shard=500)
    return {name: folder / name for name in documents}


def measure(name: str, shards: Path, workers: int, verify: bool, seq_len: int, micro_batch: int, batches: int) -> dict:
    cfg = DataConfig(
        sources={"text": SourceConfig(str(shards))}, seq_len=seq_len, micro_batch_size=micro_batch,
        num_workers=workers, verify_checksums=verify,
    )  # fmt: skip
    iterator = iter(build_loader(cfg))
    for _ in islice(iterator, 10):  # warm-up: worker start, first shard opens
        pass
    started = time.perf_counter()
    tokens = documents = 0
    for batch in islice(iterator, batches):
        tokens += batch["input_ids"].numel()
        documents += int(batch["documents_per_source"].sum())
    seconds = time.perf_counter() - started
    return {"bench": "loader_throughput", "shards": name, "workers": workers, "verify_checksums": verify, "seq_len": seq_len,
            "micro_batch": micro_batch, "batches": batches, "tokens_per_s": round(tokens / seconds),
            "documents_per_s": round(documents / seconds),
            "seconds": round(seconds, 3)}  # fmt: skip


def hash_throughput(shards: Path, repeats: int = 5) -> list[dict]:
    """MB/s of each integrity hash over the shards' bytes (from the page cache: the hash's own cost)."""
    files = sorted(shards.glob("*.tar"))
    size = sum(f.stat().st_size for f in files) * repeats
    contents = [f.read_bytes() for f in files]
    results = []
    for name, run in (
        ("xxh3_128_shard_files", lambda: [file_hash(f) for f in files]),
        ("crc32_sample_bytes", lambda: [sample_checksum(c) for c in contents]),
    ):
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        seconds = time.perf_counter() - started
        results.append({"bench": "integrity_hash", "hash": name, "mb": round(size / 1e6, 1),
                        "mb_per_s": round(size / 1e6 / seconds)})  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        sources = {args.shards.name: args.shards} if args.shards else make_shards(Path(scratch), copies=20)
        for result in hash_throughput(next(iter(sources.values()))):
            print(json.dumps(result), flush=True)
        for name, shards in sources.items():
            for workers in (0, 1, 2):
                for verify in (True, False):
                    result = measure(name, shards, workers, verify, args.seq_len, args.micro_batch, args.batches)
                    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
