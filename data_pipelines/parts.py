"""A shard build split into parts (one per SLURM array task, say) that survive being killed.

A record is numbered by its input file and its place in that file, so a part need not read the
other parts' files: with at least as many input files as parts, part I of N takes files I, I + N,
I + 2N, ... and reads no other; with fewer (one big file), every part reads every file and takes
chunk c (of 64 records) of file f when (f + c) mod N = I. Either way the parts together build
exactly the one-process build's documents, with the same record numbers, and one file's records
stay in one part whenever they can (a tar read once, not N times).

Each part writes `part-IIIII-shard-NNNNNN.tar` files (a one-part build keeps `shard-NNNNNN.tar`),
each under `.partial` until complete, and after every complete shard its progress file
`part-IIIII-of-NNNNN.json`: the shards done, the first record not in them, and the counts so far.
A rerun of the part keeps those shards and goes on from that record, skipping the files before it
unread; `merge-manifests` joins the finished parts into the source's `manifest.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fusion_train.data.manifest import MANIFEST, DataError, Manifest

SETTINGS = ("kind", "vocab", "fingerprints", "seed", "inputs", "options")  # what every part must share


def shard_prefix(part: int, parts: int) -> str:
    return "" if parts == 1 else f"part-{part:05d}-"


def progress_path(folder: Path, part: int, parts: int) -> Path:
    return folder / f"part-{part:05d}-of-{parts:05d}.json"


@dataclass
class PartProgress:
    part: int
    parts: int
    manifest: Manifest  # the complete shards so far, their tokens and the records skipped before next_record
    next_record: tuple[int, int] = (0, 0)  # (input file number, record number in it)
    complete: bool = False

    def save(self, folder: Path) -> None:
        """Atomically: a part killed while saving keeps its previous progress."""
        record = {"part": self.part, "parts": self.parts, "next_record": self.next_record,
                  "complete": self.complete, "manifest": self.manifest.to_json()}  # fmt: skip
        path = progress_path(folder, self.part, self.parts)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(temporary, path)

    @classmethod
    def read(cls, path: Path) -> PartProgress:
        try:
            record = json.loads(path.read_text())
            manifest = Manifest.from_json(record.pop("manifest"), path)
            return cls(manifest=manifest, **{**record, "next_record": tuple(record["next_record"])})
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise DataError(f"{path} is not a shard-build progress file ({err})") from err


def differing_settings(a: Manifest, b: Manifest) -> list[str]:
    return [name for name in SETTINGS if getattr(a, name) != getattr(b, name)]


def merge_manifests(folder: str | Path) -> Manifest:
    """The finished parts of a build in `folder`, joined into its manifest.json."""
    folder = Path(folder)
    found = sorted(folder.glob("part-*-of-*.json"))
    if not found:
        raise DataError(f"no part progress files (part-IIIII-of-NNNNN.json) in {folder}: build the parts first")
    progress = [PartProgress.read(path) for path in found]
    splits = sorted({p.parts for p in progress})
    if len(splits) > 1:
        raise DataError(f"{folder} holds parts of different splits (into {splits} parts): keep one split's")
    parts = splits[0]
    missing = sorted(set(range(parts)) - {p.part for p in progress})
    if missing:
        raise DataError(f"{folder}: parts {missing} of {parts} are missing: build them with --part I --parts {parts}")
    unfinished = [p.part for p in progress if not p.complete]
    if unfinished:
        raise DataError(f"{folder}: parts {unfinished} are unfinished: run them again (they resume)")
    first = progress[0].manifest
    for p in progress[1:]:
        differing = differing_settings(first, p.manifest)
        if differing:
            raise DataError(
                f"{folder}: part {p.part} was built with other {', '.join(differing)} than part 0: rebuild it with "
                "the same inputs, tokenizers and seed (--overwrite)"
            )
    merged = Manifest(first.kind, first.vocab, first.fingerprints, seed=first.seed, inputs=first.inputs,
                      sample_checksums=first.sample_checksums, tokenizer_paths=first.tokenizer_paths,
                      options=first.options)  # fmt: skip
    for p in progress:
        merged.shards += p.manifest.shards
        merged.add_counts(p.manifest)
    if not merged.shards:
        raise DataError(f"{folder}: the parts hold no samples (skipped: {merged.skipped})")
    merged.write(folder)
    return merged


def existing_outputs(folder: Path, part: int, parts: int) -> list[Path]:
    """What a build of this part would replace: its shards, finished or not, its progress file, and
    a one-part build's manifest."""
    found = list(folder.glob(f"{shard_prefix(part, parts)}shard-*.tar*"))
    candidates = [progress_path(folder, part, parts)] + ([folder / MANIFEST] if parts == 1 else [])
    return found + [p for p in candidates if p.exists()]
