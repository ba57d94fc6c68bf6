"""Video files as what the image and audio tokenizers take (the start of Mirasol3B's time-aligned
chunks): frames sampled at a set rate, at most a set count, each resized and centre-cropped to the
image tokenizer's resolution as its pictures are; and the sound track as mono samples at the audio
tokenizer's rate. PyAV (FFmpeg's libraries) decodes, so whatever FFmpeg reads works: mp4, webm,
mkv, avi.

A frame is kept when its presentation time reaches the next sampling time (0, 1/rate, 2/rate, ...):
a source slower than the sampling rate gives each of its frames once, not repeated. A file that
cannot be used raises VideoError with a reason, the skip counter's key: missing video, unreadable
video, no video stream, empty video (no frame decodes), zero frame rate (frames without times in a
stream that declares no rate). A video without sound is allowed: `audio` is None, and `sound`
says why.

The frames' resolution sets what a frame costs: the VQ tokenizer downsamples by 16, so a 512-px
frame is a 32x32 grid (1,024 codes, Chameleon's), a 256-px frame a 16x16 grid (256 codes: a
quarter of the tokens, and a quarter of the detail).
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from fusion_train.tokenizers.audio import AudioError, AudioTokenizer, read_audio
from fusion_train.tokenizers.image import ImageTokenizer, preprocess
from fusion_train.tokenizers.multimodal import VideoCodes
from fusion_train.vocab import VocabLayout


class VideoError(ValueError):
    """A video that cannot be used; `reason` is the skip counter's key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class VideoSampling:
    frames_per_second: float = 1.0  # Gemini 1.5 reads video at one frame a second
    max_frames: int = 64
    resolution: int = 512  # the image tokenizer's: a frame is resized and centre-cropped to it
    audio_rate: int | None = None  # the audio tokenizer's; None: the sound track is not read

    def __post_init__(self) -> None:
        if self.frames_per_second <= 0 or self.max_frames < 1 or self.resolution < 1:
            raise ValueError(
                f"video sampling: frames_per_second ({self.frames_per_second}), max_frames ({self.max_frames}) "
                f"and resolution ({self.resolution}) must be positive"
            )


@dataclass
class Video:
    frames: np.ndarray  # uint8 [N, resolution, resolution, 3]
    times: np.ndarray  # float64 [N]: each kept frame's presentation time in seconds
    audio: np.ndarray | None  # float32 mono samples at the sampling's audio_rate, from time 0
    sound: str  # "read", or why there is no audio: "not asked", "no audio stream", "silent audio", ...
    frame_rate: float  # the source's frames per second
    duration: float  # seconds
    width: int  # the source's frame size
    height: int


def read_video(source: str | Path | bytes, sampling: VideoSampling) -> Video:
    """A video file (its path, or its bytes: a WebDataset member) sampled as `sampling` says."""
    import av  # FFmpeg's libraries load only when needed

    path = f"{len(source)} bytes of video" if isinstance(source, bytes) else source
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise VideoError("missing video", f"{path} does not exist")
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            if not container.streams.video:
                raise VideoError("no video stream", f"{path} has no video stream")
            stream = container.streams.video[0]
            frame_rate = float(stream.average_rate or stream.guessed_rate or 0)
            frames, times = _sampled_frames(container.decode(stream), frame_rate, sampling, path)
            duration = _duration(container, stream, times, frame_rate)
            width, height = stream.codec_context.width, stream.codec_context.height
    except av.error.FFmpegError as err:
        raise VideoError("unreadable video", f"{path} cannot be decoded ({err})") from None
    audio, sound = _sound(source, sampling.audio_rate)
    return Video(frames, times, audio, sound, frame_rate, duration, width, height)


def _sampled_frames(decoded, frame_rate: float, sampling: VideoSampling, path) -> tuple[np.ndarray, np.ndarray]:
    frames, times, next_time = [], [], 0.0
    step = 1.0 / sampling.frames_per_second
    tolerance = 0.5 / frame_rate if frame_rate else 0.0  # a frame half a source period early is on time
    for index, frame in enumerate(decoded):
        time = frame.time
        if time is None:
            if not frame_rate:
                raise VideoError("zero frame rate", f"{path}: its frames carry no times and it declares no rate")
            time = index / frame_rate
        if time + tolerance < next_time:
            continue
        frames.append(preprocess(frame.to_image(), sampling.resolution))
        times.append(time)
        if len(frames) == sampling.max_frames:
            break
        next_time = (np.floor((time + tolerance) / step) + 1) * step
    if not frames:
        raise VideoError("empty video", f"{path}: no frame decodes")
    return np.stack(frames), np.asarray(times)


def _duration(container, stream, times: np.ndarray, frame_rate: float) -> float:
    """The stream's declared length, else the container's, else the last frame read and its period."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # FFmpeg's AV_TIME_BASE: microseconds
    return float(times[-1]) + (1.0 / frame_rate if frame_rate else 0.0)


def _sound(source: str | Path | bytes, rate: int | None) -> tuple[np.ndarray | None, str]:
    if rate is None:
        return None, "not asked"
    try:
        return read_audio(source, rate), "read"
    except AudioError as error:  # a silent or soundless video is still a video
        return None, error.reason


def header(video: Video, sampling: VideoSampling) -> str:
    """What a video is, as the text after `<begin-video>`: its sampling rate, length and frame size."""
    return header_text(sampling.frames_per_second, video.duration, sampling.resolution)


def header_text(frames_per_second: float, seconds: float, resolution: int) -> str:
    """ "2 fps, 4.0 s, 64 px" """
    return f"{frames_per_second:g} fps, {seconds:.1f} s, {resolution} px"


def tokenize_video(video: Video, sampling: VideoSampling, images: ImageTokenizer,
                   audio: AudioTokenizer | None) -> VideoCodes:  # fmt: skip
    """The frames' image codes and, with an audio tokenizer and a sound track, the sound of each
    frame's span: from its time to the next frame's (the last to the end of the sound)."""
    frames = images.encode(video.frames)
    if audio is None or video.audio is None:
        return VideoCodes(header(video, sampling), frames)
    span = 1.0 / sampling.frames_per_second
    sound = sound_per_frame(audio.encode([video.audio])[0], video.times, span, audio.cfg.frame_rate)
    return VideoCodes(header(video, sampling), frames, sound)


def sound_per_frame(codes: np.ndarray, times: np.ndarray, span: float, code_rate: float) -> list[np.ndarray]:
    """A sound's codes [levels, code frames] (`code_rate` a second) cut at the frames' `times`:
    each frame's clip runs to the next frame's time, the last for `span` seconds (the sampling
    period) or to the end of the sound; the sound after it (a video cut at max_frames) is left
    out. A cut falls between two code frames, never inside one (an audio window is never split)."""
    ends = [round(time * code_rate) for time in [*times[1:], times[-1] + span]]
    bounds = [0, *(min(end, codes.shape[1]) for end in ends)]
    return [codes[:, a:b] for a, b in itertools.pairwise(bounds)]


def parse_video_block(
    ids: list[int] | np.ndarray, vocab: VocabLayout
) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """A video block's ids (from `<begin-video>` to `<end-video>`) back into its header's text ids,
    each frame's image codes [grid, grid] and each clip's audio codes [levels, frames]."""
    ids = [int(i) for i in ids]
    if not ids or ids[0] != vocab.begin_of_video or ids[-1] != vocab.end_of_video:
        raise ValueError("a video block starts with <begin-video> and ends with <end-video>")
    body = ids[1:-1]
    first = next(
        (i for i, token in enumerate(body) if token in (vocab.begin_of_image, vocab.begin_of_audio)), len(body)
    )
    header_ids, frames, clips, position = body[:first], [], [], first
    while position < len(body):
        opened = body[position]
        end = vocab.end_of_image if opened == vocab.begin_of_image else vocab.end_of_audio
        close = body.index(end, position + 1)
        codes = np.asarray(body[position + 1 : close], dtype=np.int64)
        if opened == vocab.begin_of_image:
            frames.append((codes - vocab.image_code_start).reshape(vocab.image_grid, vocab.image_grid))
        else:
            clips.append(vocab.ids_to_audio_codes(torch.from_numpy(codes)).numpy())
        position = close + 1
    return header_ids, frames, clips


def write_mp4(target, frames: np.ndarray, frames_per_second: float, sound: np.ndarray | None = None,
              rate: int | None = None) -> None:  # fmt: skip
    """Frames uint8 [N, H, W, 3] (H and W even) as H.264, each shown for 1/frames_per_second, and
    `sound` (float32 mono at `rate`) as AAC, into an MP4 file (a path or a writable binary file)."""
    import av

    with av.open(target if not isinstance(target, str | Path) else str(target), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=Fraction(frames_per_second).limit_denominator(1000),
                                     options={"crf": "18"})  # fmt: skip
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt = "yuv420p"
        audio = None if sound is None else container.add_stream("aac", rate=rate, layout="mono")
        for pixels in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")))
        container.mux(video.encode())
        if audio is not None:
            for start in range(0, len(sound), 1024):
                chunk = av.AudioFrame.from_ndarray(sound[None, start : start + 1024].astype(np.float32), format="flt",
                                                   layout="mono")  # fmt: skip
                chunk.sample_rate = rate
                container.mux(audio.encode(chunk))
            container.mux(audio.encode())
