"""Random access to the samples of one tar shard, with every way a sample can be bad caught.

A shard is opened once: tarfile reads the member headers (seeking past the data), which gives
each sample's members by key in write order, so sample i is read without reading the others.
A truncated or unreadable tar loses only the samples it cannot give; those come back as skips.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion_train.data.manifest import SAMPLE_CHECKSUM, Skip, sample_checksum
from fusion_train.vocab import VocabLayout

log = logging.getLogger(__name__)


@dataclass
class Document:
    tokens: np.ndarray  # int64
    loss_mask: np.ndarray | None  # uint8 or None (all trained on)


def image_block_starts(tokens: np.ndarray, vocab: VocabLayout) -> np.ndarray:
    return np.flatnonzero(tokens == vocab.begin_of_image)


def validate(tokens: np.ndarray, vocab: VocabLayout) -> None:
    """Ids in range, and every image a whole block: begin marker, grid^2 codes, end marker."""
    if len(tokens) == 0:
        raise Skip("empty_document")
    if tokens.min() < 0 or tokens.max() >= vocab.vocab_size:
        raise Skip("out_of_vocab")
    inside_blocks = np.zeros(len(tokens), dtype=bool)
    starts = image_block_starts(tokens, vocab)
    for start in starts:
        end = start + vocab.image_block_length - 1
        if end >= len(tokens) or tokens[end] != vocab.end_of_image:
            raise Skip("broken_image_block")
        inside_blocks[start + 1 : end] = True
    is_code = (tokens >= vocab.image_code_start) & (tokens < vocab.image_code_end)
    if (is_code != inside_blocks).any() or (tokens == vocab.end_of_image).sum() != len(starts):
        raise Skip("broken_image_block")


class ShardReader:
    def __init__(self, path: Path, vocab: VocabLayout, verify_checksums: bool = False):
        """`verify_checksums`: each sample's arrays must match the CRC-32 in its json member."""
        self.path, self.vocab, self.verify_checksums = path, vocab, verify_checksums
        self.samples: list[dict[str, tarfile.TarInfo]] = []
        try:
            self.tar = tarfile.open(path, mode="r:")
            members = self._members()
        except (OSError, tarfile.TarError) as err:
            log.warning("shard %s cannot be read (%s): its samples are skipped", path, err)
            self.tar, members = None, []
        keys: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in members:
            key, _, field = member.name.partition(".")
            keys.setdefault(key, {})[field] = member
        self.samples = list(keys.values())

    def _members(self) -> list[tarfile.TarInfo]:
        """Headers up to the first damage; a truncated tar keeps the samples before it."""
        members = []
        try:
            for member in self.tar:
                members.append(member)
        except (OSError, tarfile.TarError) as err:
            log.warning("shard %s is damaged after %d members (%s): the rest is skipped", self.path, len(members), err)
        return [m for m in members if m.isfile()]

    def key(self, index: int) -> str:
        return next(iter(self.samples[index].values())).name.partition(".")[0]

    def _read(self, member: tarfile.TarInfo) -> bytes:
        data = self.tar.extractfile(member).read()
        if len(data) != member.size:
            raise Skip("corrupt_shard")
        return data

    def read(self, index: int) -> Document:
        if index >= len(self.samples):
            raise Skip("corrupt_shard")
        members = self.samples[index]
        if "tokens.npy" not in members:
            raise Skip("corrupt_sample")
        try:
            arrays = [self._read(members[name]) for name in ("tokens.npy", "mask.npy") if name in members]
            if self.verify_checksums:
                self._verify(members, arrays)
            tokens = np.load(io.BytesIO(arrays[0]), allow_pickle=False)
            mask = np.load(io.BytesIO(arrays[1]), allow_pickle=False) if len(arrays) == 2 else None
        except (OSError, ValueError, EOFError, tarfile.TarError):
            raise Skip("corrupt_sample") from None
        if tokens.ndim != 1 or (mask is not None and mask.shape != tokens.shape):
            raise Skip("corrupt_sample")
        tokens = tokens.astype(np.int64)
        validate(tokens, self.vocab)
        return Document(tokens, mask)

    def _verify(self, members: dict[str, tarfile.TarInfo], arrays: list[bytes]) -> None:
        if "json" not in members:
            raise Skip("corrupt_sample")
        metadata = json.loads(self._read(members["json"]))
        if not isinstance(metadata, dict) or metadata.get(SAMPLE_CHECKSUM) != sample_checksum(*arrays):
            raise Skip("checksum_mismatch")

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
