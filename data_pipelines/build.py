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

import contextlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data_pipelines import interleaved, sft, text
from data_pipelines.captioned import CaptionedMedia
from data_pipelines.parts import (
    PartProgress,
    differing_settings,
    existing_outputs,
    progress_path,
    shard_prefix,
)
from data_pipelines.records import PendingAudio, PendingImage, Skip
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
from fusion_train.storage import WriteFailed, writing
from fusion_train.tokenizers.audio import AudioError, AudioTokenizer, audio_config, read_audio
from fusion_train.tokenizers.image import ImageTokenizer, image_config, preprocess
from fusion_train.tokenizers.multimodal import DocumentTokenizer, TokenizedDocument
from fusion_train.tokenizers.text import TextTokenizer
from fusion_train.vocab import Modality

log = logging.getLogger(__name__)

# Each kind's `parse(record, media)` and `assemble(draft, documents, index)`: a module, or an object.
KIND_MODULES: dict[str, ModuleType | CaptionedMedia] = {
    "text": text, "image-text": CaptionedMedia("image"), "audio-text": CaptionedMedia("audio"),
    "interleaved": interleaved, "sft": sft,
}  # fmt: skip
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus", "m4a")
CHUNK_RECORDS = 64
RecordId = tuple[int, int]  # (the input file's number in the list of inputs, the record's number in that file)


class MediaLoader:
    """Loads the images and clips that one chunk's records refer to (a path relative to the input
    file, or the bytes of a WebDataset sample), preprocessed for the tokenizers that will encode them."""

    def __init__(self, resolution: int | None, sampling_rate: int | None, max_audio_seconds: float):
        self.resolution, self.sampling_rate, self.max_audio_seconds = resolution, sampling_rate, max_audio_seconds
        self.base_dir = Path(".")
        self.pending: list[PendingImage | PendingAudio] = []

    def _bytes(self, source: str | bytes, kind: str) -> bytes:
        if isinstance(source, bytes):
            return source
        path = self.base_dir / source
        if not path.is_file():
            raise Skip(f"missing_{kind}_file")
        return path.read_bytes()

    def image(self, source: str | bytes, pad: bool = False) -> PendingImage:
        if self.resolution is None:
            raise DataError("records refer to images but no image tokenizer was given (--image-tokenizer)")
        try:
            with Image.open(io.BytesIO(self._bytes(source, "image"))) as image:
                image.load()
                pixels = preprocess(image, self.resolution, pad)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise Skip("undecodable_image") from None
        return self._waiting(PendingImage(pixels))

    def audio(self, source: str | bytes) -> PendingAudio:
        if self.sampling_rate is None:
            raise DataError("records refer to audio but no audio tokenizer was given (--audio-tokenizer)")
        try:
            samples = read_audio(self._bytes(source, "audio"), self.sampling_rate)
        except AudioError as err:
            raise Skip(err.reason.replace(" ", "_")) from None
        if len(samples) > self.max_audio_seconds * self.sampling_rate:
            raise Skip("audio_too_long")
        return self._waiting(PendingAudio(samples))

    def _waiting(self, media):
        self.pending.append(media)
        return media


def encode_media(encoders: dict, media: list[PendingImage | PendingAudio]) -> None:
    """Codes for every pending image and clip, each kind in batches of its tokenizer."""
    images = [m for m in media if isinstance(m, PendingImage)]
    clips = [m for m in media if isinstance(m, PendingAudio)]
    if images:
        for image, codes in zip(images, encoders["image"].encode(np.stack([i.pixels for i in images])), strict=True):
            image.codes = codes
    if clips:
        for clip, codes in zip(clips, encoders["audio"].encode([c.samples for c in clips]), strict=True):
            clip.codes = codes


@dataclass
class Unencoded:
    """A record parsed, its images decoded and preprocessed, their codes still to come."""

    draft: object
    media: list[PendingImage | PendingAudio]


@dataclass
class BuildSettings:
    kind: str
    text_tokenizer: str
    image_tokenizer: str | None = None
    seed: int = 0
    device: str = "cpu"
    # Where images and audio are encoded: "workers" (each with its own copy of the tokenizers), or
    # "main": workers decode and preprocess, and the main process, owning the device, encodes the
    # media of several chunks at once (one GPU's large batches). Default: main on CUDA.
    encode_in: str | None = None
    audio_tokenizer: str | None = None
    max_audio_seconds: float = 60.0  # a longer clip is skipped (audio_too_long)

    def __post_init__(self) -> None:
        if self.encode_in is None:
            self.encode_in = "main" if self.device.startswith("cuda") else "workers"
        if self.encode_in not in ("workers", "main"):
            raise DataError(f"--encode-in {self.encode_in}: choose workers or main")


# --- worker side: one set of tokenizers per process ---------------------------------------------

_worker: dict = {}


def _init_worker(settings: BuildSettings) -> None:
    torch.set_num_threads(1)  # the workers are the parallelism
    _set_up(settings, media_encoders(settings) if settings.encode_in == "workers" else None)


def media_encoders(settings: BuildSettings, batch: int | None = None) -> dict:
    """The image and audio tokenizers the settings name, on the settings' device."""
    on_gpu = settings.device.startswith("cuda")
    sizes = {"batch_size": batch} if batch else {}
    encoders = {}
    if settings.image_tokenizer:
        encoders["image"] = ImageTokenizer.load(settings.image_tokenizer, device=settings.device, bf16=on_gpu, **sizes)
    if settings.audio_tokenizer:
        encoders["audio"] = AudioTokenizer.load(settings.audio_tokenizer, device=settings.device, **sizes)
    return encoders


def _set_up(settings: BuildSettings, encoders: dict | None) -> None:
    """This process's tokenizers, for parsing and assembling records; `encoders` None: media are
    encoded elsewhere (the main process)."""
    text_tokenizer = TextTokenizer(settings.text_tokenizer)
    _worker.update(
        kind=KIND_MODULES[settings.kind],
        documents=DocumentTokenizer(text_tokenizer, text_tokenizer.vocab, settings.seed),
        encoders=encoders,
        resolution=image_config(settings.image_tokenizer).resolution if settings.image_tokenizer else None,
        sampling_rate=audio_config(settings.audio_tokenizer).sampling_rate if settings.audio_tokenizer else None,
        max_audio_seconds=settings.max_audio_seconds,
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


def _process_chunk(
    chunk: list[tuple[RecordId, Path, bytes | dict]],
) -> list[tuple[RecordId, TokenizedDocument | str | Unencoded]]:
    """Each record's document, or the reason it was skipped, in record order; without encoders
    here, records with images or audio are returned Unencoded."""
    kind, encoders = _worker["kind"], _worker["encoders"]
    outcomes: dict[int, TokenizedDocument | str | Unencoded] = {}
    media = MediaLoader(_worker["resolution"], _worker["sampling_rate"], _worker["max_audio_seconds"])
    for index, base_dir, payload in chunk:
        media.base_dir = base_dir  # media paths are relative to their record's input file
        loaded = len(media.pending)
        try:
            outcomes[index] = Unencoded(kind.parse(parse_record(payload), media), media.pending[loaded:])
        except Skip as skip:
            del media.pending[loaded:]  # a skipped record's media are not encoded
            outcomes[index] = skip.reason
    if encoders is not None:
        encode_media(encoders, media.pending)
    return [(index, _assembled(outcome, index, encoders is not None)) for index, outcome in sorted(outcomes.items())]


def _assembled(outcome, index: RecordId, encoded: bool):
    """The record's document once its media have codes (or it has none), or its skip reason."""
    if not isinstance(outcome, Unencoded) or (outcome.media and not encoded):
        return outcome
    try:
        return _worker["kind"].assemble(outcome.draft, _worker["documents"], index)
    except Skip as skip:
        return skip.reason


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
    """{"image": bytes, "audio": bytes, "caption_bytes": the txt member, else a json member's caption}."""
    for fields in grouped.values():
        image = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
        audio = next((fields[e] for e in AUDIO_EXTENSIONS if e in fields), None)
        yield {"image": image, "audio": audio, "caption_bytes": fields.get("txt") or _json_caption(fields.get("json"))}


def _json_caption(payload: bytes | None) -> bytes | None:
    """A json member's `caption` (or `text`), as video2dataset and img2dataset write them."""
    try:
        record = json.loads(payload) if payload else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    caption = next((record[k] for k in ("caption", "text") if isinstance(record, dict) and k in record), None)
    return caption.encode("utf-8") if isinstance(caption, str) else None


def read_input(path: Path) -> Iterator[bytes | dict]:
    reader = _read_webdataset if path.suffix == ".tar" else _read_jsonl
    try:
        yield from reader(path)
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"input {path} cannot be read: {err}") from err


def _part_chunks(paths: list[Path], part: int, parts: int, first: RecordId) -> Iterator[list]:
    """This part's chunks of a file's CHUNK_RECORDS consecutive records, from record `first` on.
    With at least as many input files as parts, part I takes files I, I + N, ... and reads no
    other; with fewer, every part reads every file and takes chunk c of file f when (f + c) % N is I."""
    by_file = len(paths) >= parts
    for file_number, path in enumerate(paths):
        if file_number < first[0] or (by_file and file_number % parts != part):
            continue
        numbered = enumerate(read_input(path))
        for chunk_number, group in itertools.groupby(numbered, key=lambda item: item[0] // CHUNK_RECORDS):
            if by_file or (file_number + chunk_number) % parts == part:
                chunk = [((file_number, number), path.parent, payload) for number, payload in group]
                if chunk[-1][0] >= first:
                    yield chunk


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardSink:
    """Writes samples into `shard-NNNNNN.tar` files, starting a new one past either bound; each
    sample carries the checksum of its arrays' bytes, each finished shard its hash in the manifest."""

    def __init__(
        self, folder: Path, manifest: Manifest, max_samples: int, max_bytes: int, prefix: str = "",
        on_shard_complete: Callable[[int], None] | None = None,
    ):  # fmt: skip
        """`on_shard_complete(next_record)` runs after each shard but the last is complete and named."""
        self.folder, self.manifest, self.prefix = folder, manifest, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.on_shard_complete = on_shard_complete
        self.dtype = token_dtype(manifest.vocab)
        self.writer: wds.TarWriter | None = None
        self.tokens_by_modality: Counter = Counter(manifest.tokens_by_modality)
        manifest.sample_checksums = SAMPLE_CHECKSUM
        self.pause_after = int(os.environ.get("FUSION_DATA_PAUSE_AFTER_SAMPLES", "0"))  # fault tests: a kill mid-shard
        self.written = 0

    def _open(self) -> None:
        name = f"{self.prefix}shard-{len(self.manifest.shards):06d}.tar"
        self.path = self.folder / name
        self.file = open(self.path.with_name(name + ".partial"), "wb")
        self.writer = wds.TarWriter(self.file, mtime=0)  # fixed mtime: identical inputs, identical bytes
        self.manifest.shards.append(ShardInfo(name, 0, 0))
        self.bytes = 0

    def write(self, index: RecordId, document: TokenizedDocument) -> None:
        current = self.manifest.shards[-1] if self.writer else None
        if current is not None and (current.samples >= self.max_samples or self.bytes >= self.max_bytes):
            self.close()
            if self.on_shard_complete:
                self.on_shard_complete(index)
        if self.writer is None:
            self._open()
        current = self.manifest.shards[-1]
        arrays = {"tokens.npy": _npy_bytes(document.tokens.astype(self.dtype))}
        if document.loss_mask is not None:
            arrays["mask.npy"] = _npy_bytes(document.loss_mask)
        input_number, record = index
        metadata = {"kind": self.manifest.kind, "input": input_number, "record": record,
                    SAMPLE_CHECKSUM: sample_checksum(*arrays.values())}  # fmt: skip
        sample = {"__key__": f"{input_number:05d}-{record:010d}", **arrays, "json": metadata}
        self.bytes += self.writer.write(sample)
        current.samples += 1
        current.tokens += len(document.tokens)
        modality = self.manifest.vocab.modality_of(torch.from_numpy(document.tokens))
        for m in Modality:
            self.tokens_by_modality[m.key] += int((modality == m).sum())
        self.written += 1
        if self.written == self.pause_after:
            time.sleep(3600)

    @contextlib.contextmanager
    def abandoned_on_error(self) -> Iterator[None]:
        """On an error, close the open shard's file as it is (still `.partial`: a resume removes it),
        ignoring that closing fails too on a full disk."""
        try:
            yield
        except BaseException:
            if self.writer is not None:
                for closing in (self.writer.close, self.file.close):
                    with contextlib.suppress(OSError, ValueError):
                        closing()
                self.writer = None
            raise

    def close(self) -> None:
        """Complete the open shard: its hash, then its final name."""
        if self.writer is not None:
            self.writer.close()
            self.file.close()
            self.writer = None
            self.manifest.shards[-1].content_hash = file_hash(Path(self.file.name))
            os.replace(self.file.name, self.path)
            self.manifest.tokens_by_modality = dict(self.tokens_by_modality)


def _resume_or_start(output: Path, fresh: Manifest, part: int, parts: int, overwrite: bool) -> PartProgress:
    """The part's progress so far (its complete shards kept, any other of its files removed), or
    a new start."""
    output.mkdir(parents=True, exist_ok=True)
    path = progress_path(output, part, parts)
    if overwrite:
        for old in existing_outputs(output, part, parts):
            old.unlink()
    elif path.is_file():
        progress = PartProgress.read(path)
        differing = differing_settings(progress.manifest, fresh)
        if differing:
            raise DataError(
                f"{output}: part {part} of {parts} was started with other {', '.join(differing)}: pass --overwrite "
                "to build it again from the start"
            )
        complete = {shard.name for shard in progress.manifest.shards}
        for old in existing_outputs(output, part, parts):
            if old != path and old.name not in complete:
                old.unlink()
        input_number, record = progress.next_record
        log.warning("part %d of %d: resuming at record %d of input %s, %d complete shards kept", part, parts,
                    record, fresh.inputs[input_number], len(complete))  # fmt: skip
        return progress
    elif existing_outputs(output, part, parts):
        raise DataError(f"{output} already holds shards; choose an empty folder or pass --overwrite")
    return PartProgress(part, parts, fresh)


def build_shards(
    settings: BuildSettings,
    inputs: list[str | Path],
    output: str | Path,
    *,
    workers: int = 2,
    max_samples_per_shard: int = 10_000,
    max_bytes_per_shard: int = 256 * 2**20,
    overwrite: bool = False,
    part: int = 0,
    parts: int = 1,
) -> Manifest:
    """Part `part` of `parts` of a build (see parts.py); a part that was stopped resumes unless
    `overwrite`. Returns the manifest of the source (one part) or of this part's shards."""
    if settings.kind not in KIND_MODULES:
        raise DataError(f"unknown kind {settings.kind!r}; choose one of {sorted(KIND_MODULES)}")
    if not 0 <= part < parts:
        raise DataError(f"--part {part} --parts {parts}: parts are numbered 0 to parts - 1")
    output = Path(output)
    missing = [str(p) for p in inputs if not Path(p).is_file()]
    if missing:
        raise DataError(f"input {', '.join(missing)} not found: check --input")
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
    audio_tokenizer = AudioTokenizer.load(settings.audio_tokenizer, device="cpu") if settings.audio_tokenizer else None
    if audio_tokenizer:
        check_audio_layout(audio_tokenizer, vocab, settings)
    manifest = Manifest(
        kind=settings.kind,
        vocab=vocab,
        fingerprints={
            "text": text_tokenizer.fingerprint,
            "image": image_tokenizer.fingerprint if image_tokenizer else None,
            "audio": audio_tokenizer.fingerprint if audio_tokenizer else None,
        },
        seed=settings.seed,
        inputs=[str(p) for p in inputs],
        tokenizer_paths={
            "text": str(Path(settings.text_tokenizer).resolve()),
            "image": str(Path(settings.image_tokenizer).resolve()) if settings.image_tokenizer else None,
            "audio": str(Path(settings.audio_tokenizer).resolve()) if settings.audio_tokenizer else None,
        },
    )
    progress = _resume_or_start(output, manifest, part, parts, overwrite)
    if not progress.complete:
        try:
            with writing(output, "the shards", setting="--output"):
                _build_part(settings, inputs, output, progress, workers, max_samples_per_shard, max_bytes_per_shard)
        except WriteFailed as failed:
            raise WriteFailed(f"{failed}. {_complete_shards(output, part, parts)}") from None
    manifest = progress.manifest
    if manifest.skipped:
        log.warning("skipped %d records: %s", sum(manifest.skipped.values()), manifest.skipped)
    if parts > 1:
        log.info(
            "part %d of %d done; once every part is, join them: fusion-data merge-manifests %s", part, parts, output
        )
        return manifest
    if not manifest.shards:
        raise DataError(f"no usable record in {', '.join(map(str, inputs))}: skipped {manifest.skipped}")
    with writing(output, MANIFEST, setting="--output"):
        manifest.write(output)
    progress_path(output, part, parts).unlink()
    return manifest


def check_audio_layout(tokenizer: AudioTokenizer, vocab, settings: BuildSettings) -> None:
    """The text tokenizer's layout must have the audio tokenizer's codes: as many levels of as many codes."""
    wanted = tokenizer.layout()
    have = {name: getattr(vocab, name) for name in wanted}
    if have != wanted:
        room = "has no room for audio codes" if not vocab.audio_ids else f"was made for {have}"
        raise DataError(
            f"audio tokenizer {settings.audio_tokenizer} makes {wanted['audio_levels']} levels of "
            f"{wanted['audio_codebook_size']} codes, but the vocabulary of text tokenizer {settings.text_tokenizer} "
            f"{room}: train the text tokenizer with `--audio-tokenizer {settings.audio_tokenizer}` (its vocab_size "
            f"grows by {tokenizer.levels * tokenizer.cfg.codebook_size}: audio codes come after every other id)"
        )


def _complete_shards(output: Path, part: int, parts: int) -> str:
    """What a build stopped by a failed write keeps, and how it goes on."""
    path = progress_path(output, part, parts)
    kept = len(PartProgress.read(path).manifest.shards) if path.is_file() else 0
    return f"The {kept} complete shards are kept: the same command resumes after them"


def _build_part(
    settings: BuildSettings, inputs: list, output: Path, progress: PartProgress, workers: int, max_samples: int,
    max_bytes: int,
) -> None:  # fmt: skip
    """Records from progress.next_record on into shards, saving the progress after each shard."""
    manifest = progress.manifest
    skipped = Counter(manifest.skipped)

    def shard_complete(next_record: RecordId) -> None:
        progress.next_record, manifest.skipped = next_record, dict(sorted(skipped.items()))
        progress.save(output)

    prefix = shard_prefix(progress.part, progress.parts)
    sink = ShardSink(output, manifest, max_samples, max_bytes, prefix, shard_complete)
    chunks = _part_chunks([Path(p) for p in inputs], progress.part, progress.parts, progress.next_record)
    with tqdm(desc=f"building {settings.kind} shards", unit=" records", disable=None) as bar, sink.abandoned_on_error():
        for outcomes in _map_chunks(settings, chunks, workers):
            for index, outcome in outcomes:
                if index < progress.next_record:
                    continue  # in a complete shard already
                if isinstance(outcome, str):
                    skipped[outcome] += 1
                else:
                    sink.write(index, outcome)
            bar.update(len(outcomes))
    sink.close()
    manifest.skipped = dict(sorted(skipped.items()))
    progress.complete = True
    progress.save(output)


def _map_chunks(settings: BuildSettings, chunks: Iterator[list], workers: int):
    """Each chunk's outcomes, in chunk order."""
    outcomes = _worker_outcomes(settings, chunks, workers)
    if settings.encode_in == "main" and (settings.image_tokenizer or settings.audio_tokenizer):
        outcomes = _encode_here(settings, outcomes)
    yield from outcomes


def _encode_here(settings: BuildSettings, outcomes: Iterator[list], batch: int = 256) -> Iterator[list]:
    """The workers' unencoded records, encoded here in batches of about `batch` images and clips
    gathered over chunks (the workers go on decoding meanwhile), then assembled."""
    encoders = media_encoders(settings, batch if settings.device != "cpu" else 32)
    _set_up(settings, encoders)
    waiting: list[list] = []
    for chunk in itertools.chain(outcomes, [None]):
        if chunk is not None:
            waiting.append(chunk)
        media = [m for c in waiting for _, o in c if isinstance(o, Unencoded) for m in o.media]
        if chunk is None or len(media) >= batch:
            encode_media(encoders, media)
            yield from ([(index, _assembled(o, index, encoded=True)) for index, o in c] for c in waiting)
            waiting = []


def _worker_outcomes(settings: BuildSettings, chunks: Iterator[list], workers: int):
    if workers <= 0:
        _init_worker(settings)
        yield from map(_process_chunk, chunks)
        return
    # CUDA cannot be used in forked children; on the CPU a fork starts faster.
    context = multiprocessing.get_context("spawn" if settings.device.startswith("cuda") else "fork")
    with context.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
        yield from pool.imap(_process_chunk, chunks)
