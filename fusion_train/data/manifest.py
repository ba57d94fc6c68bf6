"""`manifest.json`: what a folder of token shards holds, written by the shard builder and checked
by the loader before it reads a byte of the shards.

Integrity: each shard's entry has the XXH3-128 hash of the whole file, which `fusion-data verify`
checks (16x blake2b's speed here, so a check is bound by the disk), and each sample's `json` member
a CRC-32 of its raw `tokens.npy` and `mask.npy` bytes, which the loader checks on every read
(`sample_checksums: "crc32"`). Manifests written before either existed still load; they are read
without those checks."""

from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from fusion_train.vocab import VocabLayout

MANIFEST = "manifest.json"
FORMAT = "fusion_train.shards/1"


class DataError(ValueError):
    """Input that cannot be used as it is; the message names the file or setting to fix."""


class Skip(Exception):
    """One bad record or sample among many: left out and counted under `reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


SAMPLE_CHECKSUM = "crc32"
HASH_CHUNK = 4 * 2**20


@dataclass
class ShardInfo:
    name: str
    samples: int
    tokens: int
    content_hash: str | None = None  # "xxh3_128:<hex>" of the whole file; None in older manifests


def file_hash(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return f"xxh3_128:{digest.hexdigest()}"


def sample_checksum(*members: bytes) -> int:
    """CRC-32 over a sample's raw member bytes (tokens.npy, then mask.npy when present)."""
    crc = 0
    for member in members:
        crc = zlib.crc32(member, crc)
    return crc


@dataclass
class Manifest:
    kind: str
    vocab: VocabLayout
    fingerprints: dict[str, str | None]  # tokenizer -> fingerprint (None: not used by this kind)
    shards: list[ShardInfo] = field(default_factory=list)
    tokens_by_modality: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    inputs: list[str] = field(default_factory=list)
    sample_checksums: str | None = None  # SAMPLE_CHECKSUM when every sample carries one
    # Where the build found its tokenizers (absolute), for tools that decode a run's outputs; the
    # fingerprints say whether a file found there is still the same. Absent in older manifests.
    tokenizer_paths: dict[str, str | None] = field(default_factory=dict)
    # What the build was asked beyond the kind and tokenizers (an SFT input's format, its length
    # limit, the evaluation sets left out): every part of a build must share them.
    options: dict = field(default_factory=dict)
    # SFT: the tokens trained on (loss mask 1) by modality, in all and by source (a Cauldron
    # subset, else the record's `source`, else the input file's name); and the chats longer than
    # the length limit that were kept (`records`, as `samples` pieces; `turns_dropped`: turns too
    # long even alone); those dropped are in `skipped["over_length"]`.
    answer_tokens_by_modality: dict[str, int] = field(default_factory=dict)
    answer_tokens_by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    over_length: dict[str, int] = field(default_factory=dict)
    # Videos (in any kind): how many, their frames, and those without sound (kept, silent).
    videos: dict[str, int] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def add_counts(self, other: Manifest) -> None:
        """Adds another part's token, answer, over-length and skip counts to this one's."""
        for name in COUNTS:
            _add(getattr(self, name), getattr(other, name))

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        return {"format": FORMAT, **record, "samples": self.samples}

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise DataError(f"{path} not found: build the shards with `fusion-data build-shards`")
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not a fusion_train shard manifest ({err})") from err
        return cls.from_json(record, path)

    @classmethod
    def from_json(cls, record: dict, path: Path) -> Manifest:
        """`path`: where the record was read, for the error message."""
        try:
            record = dict(record)
            if record.pop("format") != FORMAT:
                raise DataError(f"{path}: unknown format, expected {FORMAT}")
            record.pop("samples")
            manifest = cls(**{**record, "vocab": VocabLayout(**record["vocab"])})
            manifest.shards = [ShardInfo(**s) for s in record["shards"]]
        except (KeyError, TypeError) as err:
            raise DataError(f"{path} is not a fusion_train shard manifest ({err})") from err
        return manifest


COUNTS = ("tokens_by_modality", "skipped", "answer_tokens_by_modality", "answer_tokens_by_source", "over_length",
          "videos")  # fmt: skip


def _add(into: dict, added: dict) -> None:
    """Adds counts, nested dicts of them too, key by key."""
    for key, value in added.items():
        if isinstance(value, dict):
            _add(into.setdefault(key, {}), value)
        else:
            into[key] = into.get(key, 0) + value


def token_dtype(vocab: VocabLayout) -> np.dtype:
    """Shards store ids as uint16 when the vocabulary fits (it does at 65,536), else int32."""
    return np.dtype(np.uint16) if vocab.vocab_size <= 2**16 else np.dtype(np.int32)
