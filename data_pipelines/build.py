"""Build token shards from raw records, the machinery every source kind shares.

The main process reads records (inputs.py: jsonl lines, JSON arrays, parquet rows, samples of a
WebDataset) and hands them out in chunks; worker processes parse each record with its kind's module, load and preprocess its
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
import logging
import multiprocessing
import os
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
from xxhash import xxh3_128_hexdigest

from data_pipelines import interleaved, text
from data_pipelines.captioned import CaptionedMedia
from data_pipelines.chat_formats import FORMATS
from data_pipelines.exclusion import Exclusions, load_exclusions
from data_pipelines.inputs import parse_record, read_blocks
from data_pipelines.parts import (
    PartProgress,
    differing_settings,
    existing_outputs,
    progress_path,
    shard_prefix,
)
from data_pipelines.records import PendingAudio, PendingImage, PendingVideo, Skip, media_bytes
from data_pipelines.sft import OVER_LENGTH, Chats
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
from fusion_train.tokenizers.video import VideoError, VideoSampling, header, read_video
from fusion_train.vocab import Modality

log = logging.getLogger(__name__)

# Each kind's `parse(record, media)` and `assemble(draft, documents, index)` (a document, or a list
# of them): a module, or an object; the SFT kind's, sft.Chats, is made from the settings.
KIND_MODULES: dict[str, ModuleType | CaptionedMedia] = {
    "text": text, "image-text": CaptionedMedia("image"), "audio-text": CaptionedMedia("audio"),
    "video-text": CaptionedMedia("video"), "interleaved": interleaved,
}  # fmt: skip
KINDS = (*KIND_MODULES, "sft")
CHUNK_RECORDS = 64
VIDEO_CHUNK_RECORDS = 4  # a video is up to max_video_frames pictures: a chunk of 64 would hold thousands
RecordId = tuple[int, int]  # (the input file's number in the list of inputs, the record's number in that file)


class MediaLoader:
    """Loads the images, clips and videos that one chunk's records refer to (a path relative to the
    input file or to the media root, the bytes of a WebDataset sample, an HF image struct),
    preprocessed for the tokenizers that will encode them."""

    def __init__(self, settings: BuildSettings, resolution: int | None, sampling_rate: int | None,
                 code_rate: float | None = None, excluded_images: frozenset = frozenset()):  # fmt: skip
        self.resolution, self.sampling_rate, self.excluded_images = resolution, sampling_rate, excluded_images
        self.code_rate = code_rate  # the audio tokenizer's code frames a second
        self.max_audio_seconds, self.split_images = settings.max_audio_seconds, settings.split_images
        self.video_fps, self.max_video_frames = settings.video_fps, settings.max_video_frames
        self.media_root = Path(settings.media_root) if settings.media_root else None
        self.input = Path(".")  # the input file of the record being parsed
        self.pending: list[PendingImage | PendingAudio] = []

    def _bytes(self, source, kind: str) -> bytes:
        encoded = media_bytes(source, self.media_root or self.input.parent, kind)
        if kind == "image" and self.excluded_images and xxh3_128_hexdigest(encoded) in self.excluded_images:
            raise Skip("excluded_image")
        return encoded

    def image(self, source, pad: bool = False) -> PendingImage:
        return self._images(source, pad, split=False)[0]

    def prompt_images(self, source) -> list[PendingImage]:
        """A prompt's image, padded to a square; with --split-images its four quarters before it (Idefics2)."""
        return self._images(source, pad=True, split=self.split_images)

    def _images(self, source, pad: bool, split: bool) -> list[PendingImage]:
        if self.resolution is None:
            raise DataError("records refer to images but no image tokenizer was given (--image-tokenizer)")
        try:
            with Image.open(io.BytesIO(self._bytes(source, "image"))) as image:
                image.load()
                views = [*_quarters(image), image] if split else [image]
                pixels = [preprocess(view, self.resolution, pad) for view in views]
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise Skip("undecodable_image") from None
        return [self._waiting(PendingImage(p)) for p in pixels]

    def audio(self, source) -> PendingAudio:
        if self.sampling_rate is None:
            raise DataError("records refer to audio but no audio tokenizer was given (--audio-tokenizer)")
        try:
            samples = read_audio(self._bytes(source, "audio"), self.sampling_rate)
        except AudioError as err:
            raise Skip(err.reason.replace(" ", "_")) from None
        if len(samples) > self.max_audio_seconds * self.sampling_rate:
            raise Skip("audio_too_long")
        return self._waiting(PendingAudio(samples))

    def video(self, source) -> PendingVideo:
        """Frames at --video-fps (at most --max-video-frames) at the image tokenizer's resolution,
        and the sound track when there is an audio tokenizer (a video without one is kept silent)."""
        if self.resolution is None:
            raise DataError("records refer to videos but no image tokenizer was given (--image-tokenizer)")
        sampling = VideoSampling(self.video_fps, self.max_video_frames, self.resolution, self.sampling_rate)
        try:
            video = read_video(self._bytes(source, "video"), sampling)
        except VideoError as err:
            raise Skip(err.reason.replace(" ", "_")) from None
        frames = [self._waiting(PendingImage(pixels)) for pixels in video.frames]
        sound = None if video.audio is None else self._waiting(PendingAudio(video.audio))
        return PendingVideo(header(video, sampling), frames, video.times, 1.0 / self.video_fps, sound, self.code_rate)

    def _waiting(self, media):
        self.pending.append(media)
        return media


def _quarters(image: Image.Image) -> list[Image.Image]:
    """Top left, top right, bottom left, bottom right."""
    w, h = image.size
    return [image.crop((x, y, x + w // 2, y + h // 2)) for y in (0, h // 2) for x in (0, w // 2)]


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
    video_fps: float = 1.0  # frames a second sampled from a video (Gemini 1.5's rate)
    max_video_frames: int = 64  # at most this many: a longer video is cut at its max_video_frames-th
    # Chats (kind sft): the records' format (chat_formats.py), the length limit (the training's
    # data.seq_len; None: none) and what happens to a longer chat (sft.py).
    format: str = "messages"
    max_tokens: int | None = None
    over_length: str = "split"
    split_images: bool = False  # a prompt image as its four quarters and itself (Idefics2)
    exclude: tuple[str, ...] = ()  # evaluation sets to leave out (exclusion.py)
    media_root: str | None = None  # what image and audio paths are relative to (default: their input file's folder)

    def __post_init__(self) -> None:
        if self.encode_in is None:
            self.encode_in = "main" if self.device.startswith("cuda") else "workers"
        if self.encode_in not in ("workers", "main"):
            raise DataError(f"--encode-in {self.encode_in}: choose workers or main")
        if self.format not in FORMATS or (self.format != "messages" and self.kind != "sft"):
            raise DataError(f"--format {self.format}: chats (--kind sft) come as one of {sorted(FORMATS)}; other kinds "
                            "as their own records")  # fmt: skip
        if self.over_length not in OVER_LENGTH:
            raise DataError(f"--over-length {self.over_length}: choose one of {OVER_LENGTH}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise DataError(f"--max-tokens {self.max_tokens}: give the training's data.seq_len")
        if self.video_fps <= 0 or self.max_video_frames < 1:
            raise DataError(
                f"--video-fps {self.video_fps} --max-video-frames {self.max_video_frames}: both must be positive"
            )

    def options(self) -> dict:
        """The settings beyond kind, tokenizers and seed that change what is built, where not the default."""
        names = ("format", "max_tokens", "over_length", "split_images", "exclude", "media_root", "max_audio_seconds",
                 "video_fps", "max_video_frames")  # fmt: skip
        defaults = BuildSettings(self.kind, self.text_tokenizer)
        return {name: getattr(self, name) for name in names if getattr(self, name) != getattr(defaults, name)}


# --- worker side: one set of tokenizers per process ---------------------------------------------

_worker: dict = {}


def _init_worker(settings: BuildSettings, exclusions: Exclusions) -> None:
    torch.set_num_threads(1)  # the workers are the parallelism
    _set_up(settings, exclusions, media_encoders(settings) if settings.encode_in == "workers" else None)


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


def _set_up(settings: BuildSettings, exclusions: Exclusions, encoders: dict | None) -> None:
    """This process's tokenizers, for parsing and assembling records; `encoders` None: media are
    encoded elsewhere (the main process)."""
    text_tokenizer = TextTokenizer(settings.text_tokenizer)
    if settings.kind == "sft":
        kind = Chats(settings.format, settings.max_tokens, settings.over_length, exclusions.questions)
    else:
        kind = KIND_MODULES[settings.kind]
    _worker.update(
        kind=kind,
        documents=DocumentTokenizer(text_tokenizer, text_tokenizer.vocab, settings.seed),
        encoders=encoders,
        media=lambda: MediaLoader(
            settings,
            image_config(settings.image_tokenizer).resolution if settings.image_tokenizer else None,
            audio_config(settings.audio_tokenizer).sampling_rate if settings.audio_tokenizer else None,
            audio_config(settings.audio_tokenizer).frame_rate if settings.audio_tokenizer else None,
            exclusions.image_hashes,
        ),
    )


def _process_chunk(
    chunk: list[tuple[RecordId, Path, bytes | dict]],
) -> list[tuple[RecordId, list[TokenizedDocument] | str | Unencoded]]:
    """Each record's documents, or the reason it was skipped, in record order; without encoders
    here, records with images or audio are returned Unencoded."""
    kind, encoders = _worker["kind"], _worker["encoders"]
    outcomes: dict[int, list[TokenizedDocument] | str | Unencoded] = {}
    media = _worker["media"]()
    for index, path, payload in chunk:
        media.input = path
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
    """The record's documents once its media have codes (or it has none), or its skip reason."""
    if not isinstance(outcome, Unencoded) or (outcome.media and not encoded):
        return outcome
    try:
        documents = _worker["kind"].assemble(outcome.draft, _worker["documents"], index)
    except Skip as skip:
        return skip.reason
    return documents if isinstance(documents, list) else [documents]


# --- main side ---------------------------------------------------------------------------------


def _part_chunks(
    paths: list[Path], part: int, parts: int, first: RecordId, chunk_records: int = CHUNK_RECORDS
) -> Iterator[list]:
    """This part's chunks of at most `chunk_records` consecutive records, from record `first` on.
    With at least as many input files as parts, part I takes files I, I + N, ... and reads no
    other; with fewer, every part reads every file and takes block b of file f when (f + b) % N
    is I (inputs.py: 64 records, or a parquet row group)."""
    by_file = len(paths) >= parts
    for file_number, path in enumerate(paths):
        if file_number < first[0] or (by_file and file_number % parts != part):
            continue
        wanted = lambda block, f=file_number: by_file or (f + block) % parts == part  # noqa: E731
        from_record = first[1] if file_number == first[0] else 0
        for start, records in read_blocks(path, wanted, from_record):
            numbered = enumerate(records, start)
            for _, group in itertools.groupby(numbered, key=lambda item: item[0] // chunk_records):
                chunk = [((file_number, number), path, payload) for number, payload in group]
                if chunk[-1][0] >= first:
                    yield chunk


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardSink:
    """Writes samples into `shard-NNNNNN.tar` files, starting a new one past either bound; each
    sample carries the checksum of its arrays' bytes, each finished shard its hash in the manifest,
    and the manifest the counts (tokens by modality, SFT answers) of the finished shards."""

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
        self.open_counts = Manifest(
            manifest.kind, manifest.vocab, {}
        )  # the open shard's, added to the manifest's when it completes
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
        piece = document.metadata.get("piece", 0)  # a chat split to fit: its pieces are samples of one record
        metadata = {"kind": self.manifest.kind, "input": input_number, "record": record, **document.metadata,
                    SAMPLE_CHECKSUM: sample_checksum(*arrays.values())}  # fmt: skip
        key = f"{input_number:05d}-{record:010d}" + (f"-{piece}" if piece else "")
        self.bytes += self.writer.write({"__key__": key, **arrays, "json": metadata})
        current.samples += 1
        current.tokens += len(document.tokens)
        counts = self.open_counts
        _add_by_modality(counts.tokens_by_modality, document.tokens, self.manifest.vocab)
        _count_videos(counts.videos, document.tokens, self.manifest.vocab)
        if document.loss_mask is not None:
            inputs = self.manifest.inputs
            self._count_answers(
                document, inputs[input_number] if input_number < len(inputs) else f"input-{input_number}"
            )
        self.written += 1
        if self.written == self.pause_after:
            time.sleep(3600)

    def _count_answers(self, document: TokenizedDocument, input_path: str) -> None:
        """The tokens an SFT sample trains on, by modality, in all and for its source; and the chats cut to fit."""
        counts, metadata = self.open_counts, document.metadata
        answers = document.tokens[document.loss_mask.astype(bool)]
        source = metadata.get("subset") or metadata.get("source") or Path(input_path).stem
        for by_modality in (counts.answer_tokens_by_modality, counts.answer_tokens_by_source.setdefault(source, {})):
            _add_by_modality(by_modality, answers, self.manifest.vocab)
        if metadata.get("piece") == 0:
            for name, added in (
                ("records", 1),
                ("samples", metadata["pieces"]),
                ("turns_dropped", metadata["turns_dropped"]),
            ):
                counts.over_length[name] = counts.over_length.get(name, 0) + added

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
            self.manifest.add_counts(self.open_counts)
            self.open_counts = Manifest(self.manifest.kind, self.manifest.vocab, {})


def _add_by_modality(counts: dict, tokens: np.ndarray, vocab) -> None:
    modality = vocab.modality_of(torch.from_numpy(tokens.astype(np.int64)))
    for m in Modality:
        counts[m.key] = counts.get(m.key, 0) + int((modality == m).sum())


def _count_videos(counts: dict, tokens: np.ndarray, vocab) -> None:
    """Each video block's frames, and whether it has sound."""
    begins, ends = np.flatnonzero(tokens == vocab.begin_of_video), np.flatnonzero(tokens == vocab.end_of_video)
    for begin, end in zip(begins, ends, strict=True):
        block = tokens[begin:end]
        for name, added in (("videos", 1), ("frames", int((block == vocab.begin_of_image).sum())),
                            ("without_sound", int(vocab.begin_of_audio not in block))):  # fmt: skip
            counts[name] = counts.get(name, 0) + added


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
    if settings.kind not in KINDS:
        raise DataError(f"unknown kind {settings.kind!r}; choose one of {sorted(KINDS)}")
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
        options=settings.options(),
    )
    progress = _resume_or_start(output, manifest, part, parts, overwrite)
    if not progress.complete:
        exclusions = load_exclusions(list(settings.exclude)) if settings.exclude else Exclusions()
        try:
            with writing(output, "the shards", setting="--output"):
                _build_part(settings, exclusions, inputs, output, progress, workers, max_samples_per_shard,
                            max_bytes_per_shard)  # fmt: skip
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
    settings: BuildSettings, exclusions: Exclusions, inputs: list, output: Path, progress: PartProgress, workers: int,
    max_samples: int, max_bytes: int,
) -> None:  # fmt: skip
    """Records from progress.next_record on into shards, saving the progress after each shard."""
    manifest = progress.manifest
    skipped = Counter(manifest.skipped)

    def shard_complete(next_record: RecordId) -> None:
        progress.next_record, manifest.skipped = next_record, dict(sorted(skipped.items()))
        progress.save(output)

    prefix = shard_prefix(progress.part, progress.parts)
    sink = ShardSink(output, manifest, max_samples, max_bytes, prefix, shard_complete)
    chunk_records = VIDEO_CHUNK_RECORDS if settings.kind == "video-text" else CHUNK_RECORDS
    chunks = _part_chunks([Path(p) for p in inputs], progress.part, progress.parts, progress.next_record, chunk_records)
    with tqdm(desc=f"building {settings.kind} shards", unit=" records", disable=None) as bar, sink.abandoned_on_error():
        for outcomes in _map_chunks(settings, exclusions, chunks, workers):
            for index, outcome in outcomes:
                if index < progress.next_record:
                    continue  # in a complete shard already
                if isinstance(outcome, str):
                    skipped[outcome] += 1
                else:
                    for document in outcome:
                        sink.write(index, document)
            bar.update(len(outcomes))
    sink.close()
    manifest.skipped = dict(sorted(skipped.items()))
    progress.complete = True
    progress.save(output)


def _map_chunks(settings: BuildSettings, exclusions: Exclusions, chunks: Iterator[list], workers: int):
    """Each chunk's outcomes, in chunk order."""
    outcomes = _worker_outcomes(settings, exclusions, chunks, workers)
    if settings.encode_in == "main" and (settings.image_tokenizer or settings.audio_tokenizer):
        outcomes = _encode_here(settings, exclusions, outcomes)
    yield from outcomes


def _encode_here(
    settings: BuildSettings, exclusions: Exclusions, outcomes: Iterator[list], batch: int = 256
) -> Iterator[list]:
    """The workers' unencoded records, encoded here in batches of about `batch` images and clips
    gathered over chunks (the workers go on decoding meanwhile), then assembled."""
    encoders = media_encoders(settings, batch if settings.device != "cpu" else 32)
    _set_up(settings, exclusions, encoders)
    waiting: list[list] = []
    for chunk in itertools.chain(outcomes, [None]):
        if chunk is not None:
            waiting.append(chunk)
        media = [m for c in waiting for _, o in c if isinstance(o, Unencoded) for m in o.media]
        if chunk is None or len(media) >= batch:
            encode_media(encoders, media)
            yield from ([(index, _assembled(o, index, encoded=True)) for index, o in c] for c in waiting)
            waiting = []


def _worker_outcomes(settings: BuildSettings, exclusions: Exclusions, chunks: Iterator[list], workers: int):
    if workers <= 0:
        _init_worker(settings, exclusions)
        yield from map(_process_chunk, chunks)
        return
    # CUDA cannot be used in forked children; on the CPU a fork starts faster.
    context = multiprocessing.get_context("spawn" if settings.device.startswith("cuda") else "fork")
    with context.Pool(workers, initializer=_init_worker, initargs=(settings, exclusions)) as pool:
        yield from pool.imap(_process_chunk, chunks)
