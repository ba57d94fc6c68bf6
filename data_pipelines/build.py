"""Build token shards from raw records, the machinery every source kind shares.

The main process reads records (jsonl lines, or samples of an input WebDataset) and hands them
out in chunks; worker processes parse each record with its kind's module, load and preprocess its
images, encode them in one VQ batch per chunk, and assemble token sequences; the main process
writes them in record order into tar shards of bounded size and, last, `manifest.json`. So the
output depends only on the inputs, the tokenizers and the seed, not on the number of workers.

A bad record (invalid UTF-8 or JSON, a missing field, empty text, a missing or undecodable image)
is skipped and counted by reason; an input file that cannot be read at all stops the build.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data_pipelines import image_text, interleaved, sft, text
from data_pipelines.records import PendingImage, Skip
from fusion_train.data.manifest import (
    MANIFEST,
    SAMPLE_CHECKSUM,
    DataError,
    Manifest,
    ShardInfo,
    file_hash,
    sample_checksum,
    token_dtype,
)
from fusion_train.tokenizers.image import ImageTokenizer
from fusion_train.tokenizers.multimodal import DocumentTokenizer, TokenizedDocument
from fusion_train.tokenizers.text import TextTokenizer
from fusion_train.vocab import Modality

log = logging.getLogger(__name__)

KIND_MODULES: dict[str, ModuleType] = {"text": text, "image-text": image_text, "interleaved": interleaved, "sft": sft}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CHUNK_RECORDS = 64


class ImageLoader:
    """Loads the images that one chunk's records refer to (a path relative to the input file, or
    the bytes of a WebDataset sample)."""

    def __init__(self, tokenizer: ImageTokenizer | None):
        self.tokenizer = tokenizer
        self.base_dir = Path(".")
        self.pending: list[PendingImage] = []

    def __call__(self, source: str | bytes, pad: bool = False) -> PendingImage:
        if self.tokenizer is None:
            raise DataError("records refer to images but no image tokenizer was given (--image-tokenizer)")
        if isinstance(source, str):
            path = self.base_dir / source
            if not path.is_file():
                raise Skip("missing_image_file")
            source = path.read_bytes()
        try:
            with Image.open(io.BytesIO(source)) as image:
                image.load()
                pixels = self.tokenizer.preprocess(image, pad=pad)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise Skip("undecodable_image") from None
        pending = PendingImage(pixels)
        self.pending.append(pending)
        return pending

    def encode_pending(self) -> None:
        if self.pending:
            codes = self.tokenizer.encode(np.stack([p.pixels for p in self.pending]))
            for pending, image_codes in zip(self.pending, codes, strict=True):
                pending.codes = image_codes


@dataclass
class BuildSettings:
    kind: str
    text_tokenizer: str
    image_tokenizer: str | None = None
    seed: int = 0
    device: str = "cpu"


# --- worker side: one set of tokenizers per process ---------------------------------------------

_worker: dict = {}


def _init_worker(settings: BuildSettings) -> None:
    torch.set_num_threads(1)  # the workers are the parallelism
    text_tokenizer = TextTokenizer(settings.text_tokenizer)
    images = ImageTokenizer.load(settings.image_tokenizer, device=settings.device) if settings.image_tokenizer else None
    _worker.update(
        kind=KIND_MODULES[settings.kind],
        documents=DocumentTokenizer(text_tokenizer, text_tokenizer.vocab, settings.seed),
        images=images,
    )


def parse_record(payload: bytes | dict) -> dict:
    """A jsonl line or WebDataset sample as a record; Skip when it is not one."""
    if isinstance(payload, dict):  # a WebDataset sample, already split into fields
        return payload
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


def _process_chunk(chunk: list[tuple[int, Path, bytes | dict]]) -> tuple[list[tuple[int, TokenizedDocument]], Counter]:
    kind, documents = _worker["kind"], _worker["documents"]
    skipped: Counter = Counter()
    drafts = []
    images = ImageLoader(_worker["images"])
    for index, base_dir, payload in chunk:
        images.base_dir = base_dir  # image paths are relative to their record's input file
        try:
            drafts.append((index, kind.parse(parse_record(payload), images)))
        except Skip as skip:
            skipped[skip.reason] += 1
    images.encode_pending()
    built = []
    for index, draft in drafts:
        try:
            built.append((index, kind.assemble(draft, documents, index)))
        except Skip as skip:
            skipped[skip.reason] += 1
    return built, skipped


# --- main side ---------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from (line.rstrip(b"\r\n") for line in f if line.strip())


def _read_webdataset(path: Path) -> Iterator[dict]:
    """Samples of an image-caption WebDataset: {"image": bytes, "caption": str}."""
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
    for fields in grouped.values():
        image = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
        yield {"image": image, "caption_bytes": fields.get("txt")}


def read_records(paths: list[Path]) -> Iterator[tuple[Path, bytes | dict]]:
    for path in paths:
        if not path.is_file():
            raise DataError(f"input {path} not found")
        reader = _read_webdataset if path.suffix == ".tar" else _read_jsonl
        try:
            for payload in reader(path):
                yield path.parent, payload
        except (OSError, tarfile.TarError) as err:
            raise DataError(f"input {path} cannot be read: {err}") from err


def _chunks(records: Iterator[tuple[Path, bytes | dict]]) -> Iterator[list]:
    chunk = []
    for index, (base_dir, payload) in enumerate(records):
        chunk.append((index, base_dir, payload))
        if len(chunk) == CHUNK_RECORDS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardSink:
    """Writes samples into `shard-NNNNNN.tar` files, starting a new one past either bound; each
    sample carries the checksum of its arrays' bytes, each finished shard its hash in the manifest."""

    def __init__(self, folder: Path, manifest: Manifest, max_samples: int, max_bytes: int):
        self.folder, self.manifest = folder, manifest
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.dtype = token_dtype(manifest.vocab)
        self.writer: wds.TarWriter | None = None
        self.tokens_by_modality: Counter = Counter()
        manifest.sample_checksums = SAMPLE_CHECKSUM

    def _roll(self) -> None:
        self.close()
        name = f"shard-{len(self.manifest.shards):06d}.tar"
        self.file = open(self.folder / name, "wb")
        self.writer = wds.TarWriter(self.file, mtime=0)  # fixed mtime: identical inputs, identical bytes
        self.manifest.shards.append(ShardInfo(name, 0, 0))
        self.bytes = 0

    def write(self, index: int, document: TokenizedDocument) -> None:
        current = self.manifest.shards[-1] if self.writer else None
        if current is None or current.samples >= self.max_samples or self.bytes >= self.max_bytes:
            self._roll()
            current = self.manifest.shards[-1]
        arrays = {"tokens.npy": _npy_bytes(document.tokens.astype(self.dtype))}
        if document.loss_mask is not None:
            arrays["mask.npy"] = _npy_bytes(document.loss_mask)
        metadata = {"kind": self.manifest.kind, "record": index, SAMPLE_CHECKSUM: sample_checksum(*arrays.values())}
        sample = {"__key__": f"{index:010d}", **arrays, "json": metadata}
        self.bytes += self.writer.write(sample)
        current.samples += 1
        current.tokens += len(document.tokens)
        modality = self.manifest.vocab.modality_of(torch.from_numpy(document.tokens))
        for m in Modality:
            self.tokens_by_modality[m.name.lower()] += int((modality == m).sum())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.file.close()
            self.writer = None
            self.manifest.shards[-1].content_hash = file_hash(Path(self.file.name))


def _prepare_output(folder: Path, overwrite: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    old = list(folder.glob("shard-*.tar")) + [p for p in [folder / MANIFEST] if p.exists()]
    if old and not overwrite:
        raise DataError(f"{folder} already holds shards; choose an empty folder or pass --overwrite")
    for path in old:
        path.unlink()


def build_shards(
    settings: BuildSettings,
    inputs: list[str | Path],
    output: str | Path,
    *,
    workers: int = 2,
    max_samples_per_shard: int = 10_000,
    max_bytes_per_shard: int = 256 * 2**20,
    overwrite: bool = False,
) -> Manifest:
    if settings.kind not in KIND_MODULES:
        raise DataError(f"unknown kind {settings.kind!r}; choose one of {sorted(KIND_MODULES)}")
    output = Path(output)
    _prepare_output(output, overwrite)
    text_tokenizer = TextTokenizer(settings.text_tokenizer)
    image_tokenizer = ImageTokenizer.load(settings.image_tokenizer, device="cpu") if settings.image_tokenizer else None
    vocab = text_tokenizer.vocab
    if image_tokenizer and (image_tokenizer.grid, image_tokenizer.model.cfg.n_embed) != (
        vocab.image_grid,
        vocab.image_codebook_size,
    ):
        raise DataError(
            f"image tokenizer {settings.image_tokenizer} makes a {image_tokenizer.grid}x{image_tokenizer.grid} grid of "
            f"{image_tokenizer.model.cfg.n_embed} codes, but text tokenizer {settings.text_tokenizer} was trained for "
            f"{vocab.image_grid}x{vocab.image_grid} of {vocab.image_codebook_size}: train the text tokenizer again "
            f"with `fusion-data train-text-tokenizer ... --image-tokenizer {settings.image_tokenizer}`, or build "
            "with the image tokenizer it was trained for (--image-tokenizer)"
        )
    manifest = Manifest(
        kind=settings.kind,
        vocab=vocab,
        fingerprints={
            "text": text_tokenizer.fingerprint,
            "image": image_tokenizer.fingerprint if image_tokenizer else None,
        },
        seed=settings.seed,
        inputs=[str(p) for p in inputs],
    )
    sink = ShardSink(output, manifest, max_samples_per_shard, max_bytes_per_shard)
    skipped: Counter = Counter()
    chunks = _chunks(read_records([Path(p) for p in inputs]))
    with tqdm(desc=f"building {settings.kind} shards", unit=" records", disable=None) as progress:
        for built, chunk_skips in _map_chunks(settings, chunks, workers):
            for index, document in built:
                sink.write(index, document)
            skipped.update(chunk_skips)
            progress.update(len(built) + sum(chunk_skips.values()))
    sink.close()
    if not manifest.shards:
        raise DataError(f"no usable record in {', '.join(map(str, inputs))}: skipped {dict(skipped)}")
    manifest.tokens_by_modality = dict(sink.tokens_by_modality)
    manifest.skipped = dict(sorted(skipped.items()))
    if skipped:
        log.warning("skipped %d records: %s", sum(skipped.values()), manifest.skipped)
    manifest.write(output)
    return manifest


def _map_chunks(settings: BuildSettings, chunks: Iterator[list], workers: int):
    if workers <= 0:
        _init_worker(settings)
        yield from map(_process_chunk, chunks)
        return
    # CUDA cannot be used in forked children; on the CPU a fork starts faster.
    context = multiprocessing.get_context("spawn" if settings.device.startswith("cuda") else "fork")
    with context.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
        yield from pool.imap(_process_chunk, chunks)
