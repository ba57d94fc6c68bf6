"""Random access to the samples of one tar shard, with every way a sample can be bad caught.

A shard's member headers are read once (seeking past the data) into its index, which gives each
sample's members by key in write order, so sample i is read without reading the others.
A truncated or unreadable tar loses only the samples it cannot give; those come back as skips.
"""

from __future__ import annotations

import io
import logging
import os
import re
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
    image_starts: np.ndarray | None = None  # where its image blocks begin, when already known


def image_block_starts(tokens: np.ndarray, vocab: VocabLayout) -> np.ndarray:
    return np.flatnonzero(tokens == vocab.begin_of_image)


def validate(tokens: np.ndarray, vocab: VocabLayout) -> np.ndarray:
    """Ids in range, and every image a whole block: begin marker, grid^2 codes, end marker.
    Returns where the blocks begin."""
    if len(tokens) == 0:
        raise Skip("empty_document")
    if tokens.max() >= vocab.vocab_size or (tokens.dtype.kind == "i" and tokens.min() < 0):
        raise Skip("out_of_vocab")
    starts = image_block_starts(tokens, vocab)
    # Image codes and the end marker are one id range: text without images has none of it.
    codes_or_end = (tokens >= vocab.image_code_start) & (tokens <= vocab.end_of_image)
    if not len(starts):
        if codes_or_end.any():
            raise Skip("broken_image_block")
        return starts
    ends = starts + vocab.image_block_length - 1
    if ends[-1] >= len(tokens) or (tokens[ends] != vocab.end_of_image).any():
        raise Skip("broken_image_block")
    edges = np.zeros(len(tokens) + 1, dtype=np.int32)  # +1 where a block's codes begin, -1 past its end marker
    edges[starts + 1] += 1
    edges[ends + 1] -= 1
    inside_blocks = np.cumsum(edges[:-1]) > 0
    if (codes_or_end != inside_blocks).any() or np.count_nonzero(tokens == vocab.end_of_image) != len(starts):
        raise Skip("broken_image_block")
    return starts


BLOCK = 512
CHECKSUM_FIELD = re.compile(rb'"' + SAMPLE_CHECKSUM.encode() + rb'": (\d+)')
NPY_HEADER = re.compile(rb"\{'descr': '([<>|][a-z]\d+)', 'fortran_order': False, 'shape': \((\d+),\), \}\s*\n")


def _plain_members(fd: int, path: Path) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of a tar's regular files, reading only the 512-byte headers, up to
    the end marker or the first damaged header (a truncated shard keeps the samples before it);
    None when a header is of a kind this does not read (long names, pax, links)."""
    members, offset = [], 0
    while len(header := os.pread(fd, BLOCK, offset)) == BLOCK and header.count(0) != BLOCK:
        try:  # the checksum counts its own field as 8 spaces
            intact = _octal(header[148:156]) == sum(header[:148]) + 256 + sum(header[156:])
            size = _octal(header[124:136])
        except ValueError:
            intact = False
        if not intact:
            log.warning("shard %s: damaged tar header at byte %d: the rest is skipped", path, offset)
            break
        if header[156:157] not in (b"0", b"\0"):
            return None
        members.append((header[:100].split(b"\0", 1)[0].decode(errors="replace"), offset + BLOCK, size))
        offset += BLOCK + -(-size // BLOCK) * BLOCK
    return members


def _octal(field: bytes) -> int:
    return int(field.strip(b"\0 ") or b"0", 8)


def npy_array(data: bytes) -> np.ndarray:
    """A 1-D `.npy` array as the shard builder writes it, without numpy's general header parse;
    other layouts through np.load."""
    if data[:8] == b"\x93NUMPY\x01\x00":
        length = int.from_bytes(data[8:10], "little")
        match = NPY_HEADER.fullmatch(data[10 : 10 + length])
        if match:
            return np.frombuffer(data, np.dtype(match[1].decode()), int(match[2]), offset=10 + length)
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class ShardIndex:
    """Where each sample of a shard lies: what opening it reads. Compact (about 70 bytes a sample),
    so that a reader can keep the indices of many more shards than it keeps open, and open one of
    them again without reading its headers."""

    keys: np.ndarray  # UTF-8 bytes, in write order
    extents: np.ndarray  # int64 [samples, members, 2]: (offset, size) of each member, (-1, 0) where absent

    @classmethod
    def of(cls, members: list[tuple[str, int, int]]) -> ShardIndex:
        fields: dict[str, dict[str, tuple[int, int]]] = {}
        for name, offset, size in members:
            key, _, field = name.partition(".")
            fields.setdefault(key, {})[field] = (offset, size)
        extents = np.array(
            [[by_field.get(name, (-1, 0)) for name in ShardReader.MEMBERS] for by_field in fields.values()],
            dtype=np.int64,
        ).reshape(len(fields), len(ShardReader.MEMBERS), 2)
        return cls(np.array([key.encode() for key in fields], dtype=bytes), extents)

    def __len__(self) -> int:
        return len(self.keys)


class ShardReader:
    """Random access to one shard's samples. Opening scans the tar headers once into a compact
    index (each sample's key, and where its members' bytes lie), unless given the index of an
    earlier opening; a read is then one `pread` per member, so many shards can stay open at little
    cost."""

    MEMBERS = ("tokens.npy", "mask.npy", "json")

    def __init__(self, path: Path, vocab: VocabLayout, verify_checksums: bool = True, index: ShardIndex | None = None):
        """`verify_checksums`: each sample's arrays must match the CRC-32 in its json member."""
        self.path, self.vocab, self.verify_checksums = path, vocab, verify_checksums
        self.fd: int | None = None
        try:
            self.fd = os.open(path, os.O_RDONLY)
            self.index = index if index is not None else ShardIndex.of(self._scan())
        except (OSError, tarfile.TarError) as err:
            log.warning("shard %s cannot be read (%s): its samples are skipped", path, err)
            self.index = ShardIndex.of([])

    def _scan(self) -> list[tuple[str, int, int]]:
        members = _plain_members(self.fd, self.path)
        if members is None:  # headers this fast path does not read (long names, pax): tarfile's way
            with tarfile.open(self.path, mode="r:") as tar:
                members = [(m.name, m.offset_data, m.size) for m in self._members(tar)]
        return members

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
        return len(self.index)

    def key(self, index: int) -> str:
        return self.index.keys[index].decode()

    def _read(self, index: int, member: int) -> bytes | None:
        offset, size = self.index.extents[index, member].tolist()
        if offset < 0:
            return None
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise Skip("corrupt_shard")
        return data

    def read(self, index: int) -> Document:
        if index >= len(self.index):
            raise Skip("corrupt_shard")
        try:
            tokens_bytes, mask_bytes = self._read(index, 0), self._read(index, 1)
            if tokens_bytes is None:
                raise Skip("corrupt_sample")
            arrays = [tokens_bytes] if mask_bytes is None else [tokens_bytes, mask_bytes]
            if self.verify_checksums:
                self._verify(index, arrays)
            tokens = npy_array(tokens_bytes)
            mask = None if mask_bytes is None else npy_array(mask_bytes)
        except (OSError, ValueError, EOFError):
            raise Skip("corrupt_sample") from None
        if tokens.ndim != 1 or (mask is not None and mask.shape != tokens.shape):
            raise Skip("corrupt_sample")
        starts = validate(tokens, self.vocab)
        return Document(tokens.astype(np.int64), mask, starts)

    def _verify(self, index: int, arrays: list[bytes]) -> None:
        metadata = self._read(index, 2)
        if metadata is None:
            raise Skip("corrupt_sample")
        found = CHECKSUM_FIELD.search(metadata)  # the builder's json; a regular expression is 8x json.loads
        if found is None or int(found[1]) != sample_checksum(*arrays):
            raise Skip("checksum_mismatch")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = close  # a raw descriptor is not closed by the garbage collector otherwise
