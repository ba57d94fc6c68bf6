"""`fusion-data verify SOURCE_DIR`: every shard of a source checked against its manifest, shards
in parallel. A shard is hashed whole (XXH3-128, against the manifest) and each of its samples read
as the loader reads it (its checksum, ids and image blocks), so a report names both the damaged
shard and the samples in it that training would skip. Shards from before hashes and checksums
existed are read all the same, and the report says what could not be checked."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from fusion_train.data.manifest import Manifest, ShardInfo, Skip, file_hash
from fusion_train.data.shards import ShardReader
from fusion_train.vocab import VocabLayout


@dataclass
class ShardReport:
    name: str
    problems: list[str] = field(default_factory=list)  # the shard's own: missing, hash, sample count
    bad_samples: list[dict] = field(default_factory=list)  # {"index", "key", "reason"}
    hashed: bool = False


def verify_shard(folder: Path, shard: ShardInfo, vocab: VocabLayout, checksums: bool) -> ShardReport:
    report = ShardReport(shard.name)
    path = folder / shard.name
    if not path.is_file():
        report.problems.append("missing")
        return report
    if shard.content_hash:
        report.hashed = True
        actual = file_hash(path)
        if actual != shard.content_hash:
            report.problems.append(f"hash mismatch: {actual}, manifest {shard.content_hash}")
    reader = ShardReader(path, vocab, verify_checksums=checksums)
    for index in range(len(reader)):
        try:
            reader.read(index)
        except Skip as skip:
            report.bad_samples.append({"index": index, "key": reader.key(index), "reason": skip.reason})
    if len(reader) != shard.samples:
        report.problems.append(f"{len(reader)} readable samples, manifest says {shard.samples}")
    reader.close()
    return report


def _verify(job: tuple) -> ShardReport:
    return verify_shard(*job)


def verify_source(folder: str | Path, workers: int = 2) -> tuple[dict, list[str]]:
    """A summary, and one line per problem found."""
    folder = Path(folder)
    manifest = Manifest.read(folder)
    checksums = manifest.sample_checksums is not None
    jobs = [(folder, shard, manifest.vocab, checksums) for shard in manifest.shards]
    with multiprocessing.get_context("fork").Pool(max(1, workers)) as pool:
        reports = list(
            tqdm(pool.imap(_verify, jobs), total=len(jobs), desc=f"verifying {folder}", unit=" shards", disable=None)
        )
    lines = [f"{r.name}: {problem}" for r in reports for problem in r.problems]
    lines += [f"{r.name}: sample {s['index']} (key {s['key']}): {s['reason']}" for r in reports for s in r.bad_samples]
    summary = {
        "source": str(folder),
        "shards": len(reports),
        "shards_ok": sum(not r.problems and not r.bad_samples for r in reports),
        "samples": manifest.samples,
        "bad_samples": sum(len(r.bad_samples) for r in reports),
        "shards_without_hash": sum(not r.hashed for r in reports if "missing" not in r.problems),
        "sample_checksums": manifest.sample_checksums,
    }
    return summary, lines
