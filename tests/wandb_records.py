"""Reads the history rows out of an offline W&B run file (`run-<id>.wandb`): a 7-byte header, then
32 KiB blocks of LevelDB-log records (crc32, length, type: full/first/middle/last), each a
protobuf `Record`. wandb no longer ships a reader of its own that works offline."""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < 7:
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            position += left_in_block
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == FULL:
            yield wandb_internal_pb2.Record.FromString(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield wandb_internal_pb2.Record.FromString(pending + chunk)
            pending = b""


def history(run_dir: Path) -> list[dict]:
    """Every logged row of every offline run under RUN_DIR/wandb, oldest run first."""
    rows = []
    for run_file in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for record in records(run_file):
            if record.WhichOneof("record_type") == "history":
                # A key with a "/" is stored split, as nested_key parts; others as key.
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows
