"""Random access to the samples of one tar shard, with every way a sample can be bad caught.

A shard is opened once: tarfile reads the member headers (seeking past the data), which gives
each sample's members by key in write order, so sample i is read without reading the others.
A truncated or unreadable tar loses only the samples it cannot give; those come back as skips.
"""

from __future__ import annotations

import io
import json
import logging
import os
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
    """Random access to one shard's samples. Opening scans the tar headers once into a compact
    index (each sample's key, and where its members' bytes lie); a read is then one `pread` per
    member, so many shards can stay open at little cost."""

    MEMBERS = ("tokens.npy", "mask.npy", "json")

    def __init__(self, path: Path, vocab: VocabLayout, verify_checksums: bool = True):
        """`verify_checksums`: each sample's arrays must match the CRC-32 in its json member."""
        self.path, self.vocab, self.verify_checksums = path, vocab, verify_checksums
        self.fd: int | None = None
        try:
            with tarfile.open(path, mode="r:") as tar:
                members = self._members(tar)
            self.fd = os.open(path, os.O_RDONLY)
        except (OSError, tarfile.TarError) as err:
            log.warning("shard %s cannot be read (%s): its samples are skipped", path, err)
            members = []
        keys: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in members:
            key, _, field = member.name.partition(".")
            keys.setdefault(key, {})[field] = member
        self.keys = list(keys)
        # [sample, member, (offset, size)]; -1 where a sample lacks the member
        self.extents = np.full((len(keys), len(self.MEMBERS), 2), -1, dtype=np.int64)
        for i, fields in enumerate(keys.values()):
            for j, name in enumerate(self.MEMBERS):
                if name in fields:
                    self.extents[i, j] = fields[name].offset_data, fields[name].size

    def _members(self, tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
        """Headers up to the first damage; a truncated tar keeps the samples before it."""
        members = []
        try:
            for member in tar:
                members.append(member)
        except (OSError, tarfile.TarError) as err:
            log.warning("shard %s is damaged after %d members (%s): the rest is skipped", self.path, len(members), err)
        return [m for m in members if m.isfile()]

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, index: int) -> str:
        return self.keys[index]

    def _read(self, index: int, member: int) -> bytes | None:
        offset, size = self.extents[index, member]
        if size < 0:
            return None
        data = os.pread(self.fd, int(size), int(offset))
        if len(data) != size:
            raise Skip("corrupt_shard")
        return data

    def read(self, index: int) -> Document:
        if index >= len(self.keys):
            raise Skip("corrupt_shard")
        try:
            tokens_bytes, mask_bytes = self._read(index, 0), self._read(index, 1)
            if tokens_bytes is None:
                raise Skip("corrupt_sample")
            arrays = [tokens_bytes] if mask_bytes is None else [tokens_bytes, mask_bytes]
            if self.verify_checksums:
                self._verify(index, arrays)
            tokens = np.load(io.BytesIO(tokens_bytes), allow_pickle=False)
            mask = None if mask_bytes is None else np.load(io.BytesIO(mask_bytes), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            raise Skip("corrupt_sample") from None
        if tokens.ndim != 1 or (mask is not None and mask.shape != tokens.shape):
            raise Skip("corrupt_sample")
        tokens = tokens.astype(np.int64)
        validate(tokens, self.vocab)
        return Document(tokens, mask)

    def _verify(self, index: int, arrays: list[bytes]) -> None:
        metadata = self._read(index, 2)
        if metadata is None:
            raise Skip("corrupt_sample")
        metadata = json.loads(metadata)
        if not isinstance(metadata, dict) or metadata.get(SAMPLE_CHECKSUM) != sample_checksum(*arrays):
            raise Skip("checksum_mismatch")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = close  # a raw descriptor is not closed by the garbage collector otherwise
