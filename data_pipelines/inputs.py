"""Reading the records of an input file, whatever it holds them in.

- `.jsonl`: a JSON object per line;
- `.json`: one JSON array of objects (LLaVA's and ShareGPT's files), parsed as it is read, so a
  gigabyte array never sits in memory whole;
- `.tar`: the samples of a WebDataset (an image, clip or video and its caption: img2dataset's and
  video2dataset's layout, `KEY.jpg|mp4|... + KEY.txt|json`);
- `.parquet`: rows, one row group at a time (the Cauldron's files, HF datasets' parquet exports);
  a nested column comes as lists and dicts, an HF image as {"bytes", "path"}.

A file is read in blocks, the units a build's parts share out: 64 records of a line-, array- or
tar-file, which a part must read through to reach its own, or a parquet row group, which the
parts that do not take it never read.
"""

from __future__ import annotations

import itertools
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from fusion_train.data.manifest import DataError, Skip

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus", "m4a")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")  # video2dataset writes mp4 or webm
BLOCK_RECORDS = 64
JSON_READ = 1 << 20  # characters of a .json array read at a time


def parse_record(payload: bytes | dict) -> dict:
    """A jsonl line, a JSON array's element, a parquet row or a WebDataset sample as a record;
    Skip when it is not one."""
    if isinstance(payload, dict):  # already split into fields
        return payload
    if not isinstance(payload, bytes):  # a JSON array's element that is not an object
        raise Skip("invalid_json")
    try:
        line = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise Skip("invalid_utf8") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise Skip("invalid_json") from None
    if not isinstance(record, dict):
        raise Skip("invalid_json")
    return record


def read_input(path: Path) -> Iterator[bytes | dict]:
    """Every record of the file, in order."""
    for _, records in read_blocks(path, lambda block: True):
        yield from records


def read_blocks(path: Path, wanted: Callable[[int], bool], from_record: int = 0) -> Iterator[tuple[int, Iterator]]:
    """(the number of its first record, its records) of each block `wanted(block number)` takes
    that has records at or after `from_record`."""
    if path.suffix == ".parquet":
        yield from _parquet_blocks(path, wanted, from_record)
        return
    reader = {".tar": _read_webdataset, ".json": _read_json_array}.get(path.suffix, _read_jsonl)
    numbered = enumerate(_reading(path, reader))
    for block, group in itertools.groupby(numbered, key=lambda item: item[0] // BLOCK_RECORDS):
        if wanted(block) and (block + 1) * BLOCK_RECORDS > from_record:
            yield block * BLOCK_RECORDS, (payload for _, payload in group)


def _reading(path: Path, reader: Callable[[Path], Iterator]) -> Iterator:
    try:
        yield from reader(path)
    except (OSError, tarfile.TarError, UnicodeDecodeError) as err:
        raise DataError(f"input {path} cannot be read: {err}") from err


def _read_jsonl(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from (line.rstrip(b"\r\n") for line in f if line.strip())


def _read_json_array(path: Path) -> Iterator:
    """The elements of a file holding one JSON array, decoded one after the other."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        text, position, read_before, ended = f.read(JSON_READ), 0, 0, False  # read_before: characters dropped
        position = _past(text, position, " \t\r\n")
        if text[position : position + 1] != "[":
            raise DataError(
                f"input {path}: a .json input must hold one JSON array of records (use .jsonl for a record per line)"
            )
        position += 1
        while True:
            position = _past(text, position, " \t\r\n,")
            if text[position : position + 1] == "]":
                return
            try:
                element, position = decoder.raw_decode(text, position)
                complete = True
            except json.JSONDecodeError as err:  # cut off by the end of what was read, or broken
                if ended:
                    raise DataError(
                        f"input {path}: not a JSON array from character {read_before + err.pos} on: {err.msg}"
                    ) from None
                complete = False
            if complete:
                yield element
            if not complete or (len(text) - position < JSON_READ // 2 and not ended):
                more = f.read(JSON_READ)
                read_before += position
                text, position, ended = text[position:] + more, 0, not more


def _past(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position


def _read_webdataset(path: Path) -> Iterator[dict]:
    """Samples of a media-caption WebDataset."""
    grouped: dict[str, dict] = {}
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, extension = member.name.partition(".")
            if grouped and key not in grouped:
                yield from _webdataset_samples(grouped)
                grouped = {}
            grouped.setdefault(key, {})[extension.lower()] = tar.extractfile(member).read()
    yield from _webdataset_samples(grouped)


def _webdataset_samples(grouped: dict[str, dict]) -> Iterator[dict]:
    """{"image", "audio", "video": bytes, "caption_bytes": the txt member, else a json member's caption}."""
    for fields in grouped.values():
        media = {name: next((fields[e] for e in extensions if e in fields), None)
                 for name, extensions in (("image", IMAGE_EXTENSIONS), ("audio", AUDIO_EXTENSIONS),
                                          ("video", VIDEO_EXTENSIONS))}  # fmt: skip
        yield {**media, "caption_bytes": fields.get("txt") or _json_caption(fields.get("json"))}


def _json_caption(payload: bytes | None) -> bytes | None:
    """A json member's `caption` (or `text`), as video2dataset and img2dataset write them."""
    try:
        record = json.loads(payload) if payload else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    caption = next((record[k] for k in ("caption", "text") if isinstance(record, dict) and k in record), None)
    return caption.encode("utf-8") if isinstance(caption, str) else None


def _parquet_blocks(path: Path, wanted: Callable[[int], bool], from_record: int) -> Iterator[tuple[int, Iterator]]:
    """Each wanted row group's rows, read only when taken."""
    import pyarrow
    import pyarrow.parquet

    try:
        file = pyarrow.parquet.ParquetFile(path)
    except (OSError, pyarrow.ArrowException) as err:
        raise DataError(f"input {path} cannot be read as parquet: {err}") from err
    first = 0
    for group in range(file.num_row_groups):
        rows = file.metadata.row_group(group).num_rows
        if wanted(group) and first + rows > from_record:
            yield first, _row_group(file, path, group)
        first += rows


def _row_group(file, path: Path, group: int) -> Iterator[dict]:
    import pyarrow

    try:
        for batch in file.iter_batches(batch_size=BLOCK_RECORDS, row_groups=[group]):
            yield from batch.to_pylist()
    except (OSError, pyarrow.ArrowException) as err:
        raise DataError(f"input {path}: row group {group} cannot be read: {err}") from err
