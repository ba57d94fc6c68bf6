"""Prompts to ids and generated ids back to text and pictures, with the run's tokenizers.

A prompt is a list of segments: a string (or `{"text": ...}`) is text, `{"image": PATH}` an image
file, VQ-encoded after the SFT prompts' preprocessing (longest side resized, border padded),
`{"audio": PATH}` a sound file, read at the audio tokenizer's rate and encoded, `{"video": PATH}`
(optionally `"frames": N`, its first N frames) a video sampled at the video settings' rate and
tokenized as the shards hold videos. `<s>` starts it; a chat prompt (a model after SFT) ends with
the end-of-prompt id the SFT shards put between prompt and answer; an image-mode prompt then opens
the image with `<racm3:break>`, an audio-mode prompt the clip with `<begin-audio>`, a video-mode
prompt a video with `<begin-video>` and its header, unless it ends with a video, which it then
continues (the block is left open).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fusion_train.generate.constraints import Mode, VideoPlan
from fusion_train.generate.generator import Request
from fusion_train.tokenizers.audio import AudioError, AudioTokenizer
from fusion_train.tokenizers.image import ImageTokenizer
from fusion_train.tokenizers.multimodal import AudioCodes, DocumentTokenizer, VideoCodes
from fusion_train.tokenizers.text import TextTokenizer
from fusion_train.tokenizers.video import (
    VideoError,
    VideoSampling,
    header_text,
    parse_video_block,
    read_video,
    tokenize_video,
)


@dataclass
class Sound:
    """A decoded clip: float32 mono samples at `rate`, and the codes they came from [levels, frames]."""

    samples: np.ndarray
    rate: int
    codes: np.ndarray


@dataclass
class Clip:
    """A decoded video: frames uint8 [N, H, W, 3] at `frames_per_second`, its sound (None: silent)
    at `rate`, and how many of its first frames the prompt gave (a continued clip)."""

    frames: np.ndarray
    frames_per_second: float
    sound: np.ndarray | None
    rate: int | None
    given_frames: int = 0


@dataclass(frozen=True)
class VideoSettings:
    """How prompt videos are sampled and what a video-mode request makes: `frames` frames in all."""

    frames_per_second: float = 1.0
    frames: int = 8


# A decoded segment: text, an image as uint8 [H, W, 3], a sound or a video.
Segment = str | np.ndarray | Sound | Clip
MEDIA = {Mode.IMAGE: "image", Mode.AUDIO: "audio"}  # what each mode's output needs a tokenizer for


class PromptError(ValueError):
    """A prompt that cannot be generated from; the message names it."""


def read_prompt_records(path: Path) -> list[tuple[int, dict]]:
    """A prompts file's records with their line numbers: JSONL of {"prompt": [segments], "mode": ...,
    ...}, blank lines skipped; a line that is not one is an error naming it."""
    if not path.is_file():
        raise PromptError(f"prompts file {path} does not exist")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptError(f"{path}, line {number}: not JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), list):
            raise PromptError(f'{path}, line {number}: expected {{"prompt": [segments], "mode": ...}}')
        records.append((number, record))
    return records


class Codec:
    def __init__(self, text: TextTokenizer, images: ImageTokenizer | None, audio: AudioTokenizer | None = None,
                 video: VideoSettings = VideoSettings()):  # fmt: skip
        self.text, self.images, self.audio, self.vocab = text, images, audio, text.vocab
        self.documents = DocumentTokenizer(text, text.vocab)
        self.video = video

    def request(self, segments: list, mode: Mode | str, chat: bool, where: str, base: Path = Path(),
                frames: int | None = None) -> Request:  # fmt: skip
        """The generation request of a prompt; a video-mode one makes `frames` frames in all
        (default: the video settings'), the frames of a prompt video it continues included."""
        ids = self.prompt_ids(segments, mode, chat, where, base)
        if Mode(mode) != Mode.VIDEO:
            return Request(ids, Mode(mode))
        frames = frames or self.video.frames
        given = open_video_frames(ids, self.vocab)
        if given >= frames:
            raise PromptError(f"{where}: the prompt's video has {given} frames already; ask for more than that "
                              "(\"frames\" in the record, or --video-frames)")  # fmt: skip
        with_sound = self.audio is not None and (given == 0 or ids[-1] == self.vocab.end_of_audio)
        clip_codes = round(self.audio.cfg.frame_rate / self.video.frames_per_second) if with_sound else 0
        return Request(ids, Mode.VIDEO, VideoPlan(frames - given, clip_codes))

    def prompt_ids(self, segments: list, mode: Mode | str, chat: bool, where: str, base: Path = Path()) -> list[int]:
        """`where` names the prompt in errors; `base` is the folder relative image paths start from."""
        try:
            mode = Mode(mode)
        except ValueError:
            raise PromptError(f"{where}: mode {mode!r} is not one of {[m.value for m in Mode]}") from None
        if mode in (Mode.IMAGE, Mode.INTERLEAVED) and self.images is None:
            raise PromptError(
                f"{where}: {mode.value} mode draws images, which needs the run's image tokenizer (--image-tokenizer)"
            )
        if mode == Mode.AUDIO and self.audio is None:
            raise PromptError(f"{where}: audio mode makes sound, which needs the run's audio tokenizer "
                              "(--audio-tokenizer) and a model whose vocabulary has audio codes")  # fmt: skip
        if mode == Mode.VIDEO and self.images is None:
            raise PromptError(f"{where}: video mode makes frames, which needs the run's image tokenizer "
                              "(--image-tokenizer)")  # fmt: skip
        parsed = [self._segment(s, where, base) for s in segments]
        ids = [self.vocab.bos, *self.documents.segments(parsed).tolist()]
        continued = mode == Mode.VIDEO and parsed and isinstance(parsed[-1], VideoCodes) and not chat
        if continued:
            ids.pop()  # the video's <end-video>: the model goes on with it
        if chat:
            ids.append(self.vocab.sft_separator)
        if mode == Mode.IMAGE:
            ids.append(self.vocab.begin_of_image)
        if mode == Mode.AUDIO:
            ids.append(self.vocab.begin_of_audio)
        if mode == Mode.VIDEO and not continued:
            seconds = self.video.frames / self.video.frames_per_second
            header = header_text(self.video.frames_per_second, seconds, self.images.resolution)
            ids += [self.vocab.begin_of_video, *self.text.encode([header])[0]]
        return ids

    def _segment(self, segment, where: str, base: Path) -> str | np.ndarray | AudioCodes:
        if isinstance(segment, dict) and segment.keys() == {"text"}:
            segment = segment["text"]
        if isinstance(segment, str):
            return segment
        if isinstance(segment, dict) and segment.keys() == {"audio"} and isinstance(segment["audio"], str):
            return self._clip(base / segment["audio"], where)
        if (
            isinstance(segment, dict)
            and isinstance(segment.get("video"), str)
            and segment.keys() <= {"video", "frames"}
        ):
            return self._video(base / segment["video"], segment.get("frames"), where)
        if not (isinstance(segment, dict) and segment.keys() == {"image"} and isinstance(segment["image"], str)):
            raise PromptError(f'{where}: segment {segment!r} is neither text, {{"image": PATH}}, {{"audio": PATH}} '
                              'nor {"video": PATH}')  # fmt: skip
        if self.images is None:
            raise PromptError(f"{where}: has an image, which needs the run's image tokenizer (--image-tokenizer)")
        path = base / segment["image"]
        try:
            with Image.open(path) as image:
                pixels = self.images.preprocess(image, pad=True)
        except FileNotFoundError:
            raise PromptError(f"{where}: image file {path} does not exist") from None
        except (UnidentifiedImageError, OSError) as err:
            raise PromptError(f"{where}: image file {path} cannot be read as an image ({err})") from None
        return self.images.encode(pixels[None])[0]

    def _clip(self, path: Path, where: str) -> AudioCodes:
        if self.audio is None:
            raise PromptError(f"{where}: has audio, which needs the run's audio tokenizer (--audio-tokenizer)")
        try:
            return AudioCodes(self.audio.encode([self.audio.read(path)])[0])
        except AudioError as err:
            raise PromptError(f"{where}: audio file {path}: {err}") from None

    def _video(self, path: Path, frames, where: str) -> VideoCodes:
        if self.images is None:
            raise PromptError(f"{where}: has a video, which needs the run's image tokenizer (--image-tokenizer)")
        if frames is not None and (not isinstance(frames, int) or frames < 1):
            raise PromptError(f'{where}: video {path}: "frames" must be a positive whole number, not {frames!r}')
        sampling = VideoSampling(self.video.frames_per_second, frames or 1 << 20, self.images.resolution,
                                 self.audio.sampling_rate if self.audio else None)  # fmt: skip
        try:
            return tokenize_video(read_video(path, sampling), sampling, self.images, self.audio)
        except VideoError as err:
            raise PromptError(f"{where}: {err}") from None

    def decode_video(self, prompt: list[int], tokens: list[int]) -> Clip:
        """The video a video-mode request made: its prompt's open video and the generated chunks."""
        opened = len(prompt) - 1 - prompt[::-1].index(self.vocab.begin_of_video)
        _, frames, clips = parse_video_block(prompt[opened:] + tokens, self.vocab)
        pixels = self.images.decode(np.stack(frames))
        sound = self.audio.decode(np.concatenate(clips, axis=1)) if clips and self.audio else None
        return Clip(pixels, self.video.frames_per_second, sound, self.audio.sampling_rate if sound is not None else None,
                    open_video_frames(prompt, self.vocab))  # fmt: skip

    def decode(self, tokens: list[int], mode: Mode | str) -> list[Segment]:
        """Generated ids as text runs, pictures and sounds; control ids (stops, markers) are left
        out. In image and audio modes the ids start inside the block the prompt opened."""
        v = self.vocab
        ends = {v.begin_of_image: v.end_of_image, v.begin_of_audio: v.end_of_audio}
        opened = {Mode.IMAGE: v.begin_of_image, Mode.AUDIO: v.begin_of_audio}.get(Mode(mode))
        segments, text, block = [], [], [] if opened is not None else None
        for token in tokens:
            if block is not None:
                if token == ends[opened]:
                    segments.append(self._picture(block) if opened == v.begin_of_image else self._sound(block))
                    block = None
                else:
                    block.append(token)
            elif token in ends and (token == v.begin_of_image or self.audio is not None):
                segments.append(self._text(text))
                text, block, opened = [], [], token
            elif v.text_start <= token < v.text_end or token == v.unk:
                text.append(token)
        segments.append(self._text(text))
        return [s for s in segments if not isinstance(s, str) or s]

    def _sound(self, code_ids: list[int]) -> Sound:
        whole = len(code_ids) - len(code_ids) % self.vocab.audio_levels  # a clip cut short by the budget
        codes = self.vocab.ids_to_audio_codes(torch.tensor(code_ids[:whole], dtype=torch.long)).numpy()
        return Sound(self.audio.decode(codes) if codes.size else np.zeros(0, np.float32), self.audio.sampling_rate,
                     codes)  # fmt: skip

    def _text(self, ids: list[int]) -> str:
        known = self.text.sp.get_piece_size()
        return self.text.decode([[i if i < known else self.vocab.unk for i in ids]])[0]

    def _picture(self, code_ids: list[int]) -> np.ndarray:
        grid = self.vocab.image_grid
        codes = np.asarray(code_ids, dtype=np.int64) - self.vocab.image_code_start
        return self.images.decode(codes.reshape(1, grid, grid))[0]


def open_video_frames(ids: list[int], vocab) -> int:
    """The frames of the video block that `ids` end inside (0: none, or none open)."""
    if vocab.begin_of_video not in ids:
        return 0
    opened = len(ids) - 1 - ids[::-1].index(vocab.begin_of_video)
    block = ids[opened:]
    return 0 if vocab.end_of_video in block else block.count(vocab.begin_of_image)
