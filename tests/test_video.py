"""Reading video (fusion_train/tokenizers/video.py) on clips made here with PyAV: a red square moving
left to right on white for 3 s at 10 frames a second, with a 440 Hz tone."""

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import webdataset as wds

from data_pipelines.build import BuildSettings, build_shards
from data_pipelines.parts import merge_manifests
from data_pipelines.synthetic_video import Motion, shape_centre
from data_pipelines.verify import verify_source
from fusion_train.data.manifest import DataError, Manifest
from fusion_train.data.packing import Packer, video_mask
from fusion_train.data.shards import Document
from fusion_train.tokenizers.audio import AudioTokenizer, read_audio
from fusion_train.tokenizers.image import ImageTokenizer
from fusion_train.tokenizers.multimodal import DocumentTokenizer
from fusion_train.tokenizers.text import TextTokenizer
from fusion_train.tokenizers.video import (
    VideoError,
    VideoSampling,
    parse_video_block,
    read_video,
    tokenize_video,
)
from helpers import shard_documents

FPS, SECONDS, WIDTH, HEIGHT, TONE, RATE = 10, 3, 96, 64, 440.0, 16000


def square_x(time: float) -> float:
    """Where the square's centre is at `time`, as a fraction of the width."""
    return 0.2 + 0.6 * time / SECONDS


def make_clip(path, sound: bool = True, codec: str = "libx264") -> None:
    with av.open(str(path), "w") as container:
        video = container.add_stream(codec, rate=FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        audio = container.add_stream("aac", rate=RATE, layout="mono") if sound else None
        for index in range(FPS * SECONDS):
            pixels = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
            centre = int(square_x(index / FPS) * WIDTH)
            pixels[24:40, centre - 8 : centre + 8] = (220, 30, 30)
            for packet in video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        container.mux(video.encode())
        if audio is not None:
            samples = (0.5 * np.sin(2 * np.pi * TONE * np.arange(RATE * SECONDS) / RATE)).astype(np.float32)
            for start in range(0, len(samples), 1024):
                frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="flt", layout="mono")
                frame.sample_rate = RATE
                for packet in audio.encode(frame):
                    container.mux(packet)
            container.mux(audio.encode())


def red_centre(frame: np.ndarray) -> float:
    red = (frame[..., 0] > 150) & (frame[..., 1] < 100)
    return float(np.nonzero(red)[1].mean()) / frame.shape[1]


def test_frames_are_sampled_at_the_rate_cropped_and_in_time_with_the_sound(tmp_path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip)
    video = read_video(clip, VideoSampling(frames_per_second=2, max_frames=16, resolution=64, audio_rate=8000))
    assert video.frames.shape == (6, 64, 64, 3) and video.frames.dtype == np.uint8
    assert video.times == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5])
    assert (video.frame_rate, video.width, video.height) == (FPS, WIDTH, HEIGHT)
    assert video.duration == pytest.approx(SECONDS, abs=0.1)
    # The 96x64 frame keeps its height (64 px) and its middle 64 columns: the square's place in the
    # crop follows from its place in the frame.
    for frame, time in zip(video.frames, video.times, strict=True):
        expected = (square_x(time) * WIDTH - (WIDTH - HEIGHT) / 2) / HEIGHT
        assert red_centre(frame) == pytest.approx(expected, abs=0.03)
    # The sound: 3 s at the audio tokenizer's rate (AAC's priming may add a frame), a 440 Hz tone.
    assert video.sound == "read" and abs(len(video.audio) - 8000 * SECONDS) <= 1024
    spectrum = np.abs(np.fft.rfft(video.audio[2000:10000]))
    assert np.fft.rfftfreq(8000, 1 / 8000)[spectrum.argmax()] == pytest.approx(TONE, abs=2)


def test_max_frames_a_slow_source_and_a_silent_film(tmp_path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip)
    assert len(read_video(clip, VideoSampling(frames_per_second=4, max_frames=3, resolution=32)).times) == 3
    # Asked for more frames a second than the source has: each source frame once.
    faster = read_video(clip, VideoSampling(frames_per_second=25, max_frames=100, resolution=32))
    assert len(faster.times) == FPS * SECONDS and faster.sound == "not asked" and faster.audio is None
    silent = tmp_path / "silent.mp4"
    make_clip(silent, sound=False, codec="mpeg4")
    video = read_video(silent, VideoSampling(resolution=32, audio_rate=8000))
    assert video.audio is None and video.sound == "no audio stream" and len(video.times) == SECONDS


def test_files_that_cannot_be_used_are_errors_with_a_reason(tmp_path):
    sampling = VideoSampling(resolution=32)
    with pytest.raises(VideoError, match=f"missing video: {tmp_path}/none.mp4 does not exist") as missing:
        read_video(tmp_path / "none.mp4", sampling)
    assert missing.value.reason == "missing video"
    clip = tmp_path / "clip.mp4"
    make_clip(clip)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip.read_bytes()[:2000])
    with pytest.raises(VideoError) as broken:
        read_video(truncated, sampling)
    # An MP4 cut short loses its index (written at the end): nothing of it can be read.
    assert broken.value.reason == "unreadable video" and f"{truncated} cannot be decoded" in str(broken.value)
    sound_only = tmp_path / "tone.wav"
    soundfile.write(sound_only, np.zeros(800, np.float32), 8000)
    with pytest.raises(VideoError, match="no video stream"):
        read_video(sound_only, sampling)
    with pytest.raises(ValueError, match="frames_per_second"):
        VideoSampling(frames_per_second=0)


def test_a_video_tokenizes_to_its_layout_and_reads_back(tmp_path, image_tokenizer_path, audio_tokenizers):
    """`<begin-video>`, the header, per frame its image and the sound of its half second, `<end-video>`;
    read back, the same codes, so the frames and sound decode as the tokenizers decode them."""
    clip = tmp_path / "clip.mp4"
    make_clip(clip)
    sampling = VideoSampling(frames_per_second=2, max_frames=16, resolution=32, audio_rate=8000)
    video = read_video(clip, sampling)
    images, audio = ImageTokenizer.load(image_tokenizer_path), AudioTokenizer.load(audio_tokenizers[0])
    text = TextTokenizer(audio_tokenizers[1])
    vocab = text.vocab
    codes = tokenize_video(video, sampling, images, audio)
    ids = DocumentTokenizer(text, vocab).video_block(codes)
    header_ids, frames, clips = parse_video_block(ids, vocab)
    assert text.decode([header_ids])[0] == "2 fps, 3.0 s, 32 px"
    # 50 audio frames a second: 25 a half-second chunk, the last one's too (AAC's padding left out).
    assert [c.shape for c in clips] == [(2, 25)] * 6
    image_block, audio_block = 2 + vocab.image_tokens, [2 + 2 * c.shape[1] for c in clips]
    assert len(ids) == 2 + len(header_ids) + 6 * image_block + sum(audio_block)
    first = 1 + len(header_ids)
    assert ids[first] == vocab.begin_of_image and ids[first + image_block] == vocab.begin_of_audio
    assert np.array_equal(np.stack(frames), codes.frames)
    assert all(np.array_equal(a, b) for a, b in zip(clips, codes.sound, strict=True))
    assert np.array_equal(images.decode(np.stack(frames)), images.decode(images.encode(video.frames)))
    whole = audio.encode([video.audio])[0]
    assert np.array_equal(np.concatenate(clips, axis=1), whole[:, :150])
    # A video without sound: frames alone, each image block followed by the next.
    silent = DocumentTokenizer(text, vocab).video_block(tokenize_video(video, sampling, images, None))
    assert parse_video_block(silent, vocab)[2] == [] and vocab.begin_of_audio not in silent


def test_video_shards_verify_decode_back_and_pack_across_sequences_only_between_chunks(demo_videos, demo_data):
    """The demo's clips as built (2 frames a second, 64 px, 8 kHz sound): each sample's video block
    holds the VQ codes of the clip's frames sampled at its times (which show the shape where it
    was) and the codec's codes of its sound track cut at those times; packed into 128-token
    sequences, a video continues from one to the next, cut only before a frame or after its header;
    a chunk longer than data.seq_len is one error naming the source and the setting."""
    folder = Path(demo_videos["shards"]["video_text"])
    manifest = Manifest.read(folder)
    assert manifest.videos == {"videos": 12, "frames": 96, "without_sound": 0}
    summary, problems = verify_source(folder, workers=1)
    assert problems == [] and summary["shards_ok"] == summary["shards"]
    vocab = manifest.vocab
    images, audio = ImageTokenizer.load(demo_data["image_tokenizer"]), AudioTokenizer.load(demo_data["audio_tokenizer"])
    videos = Path(demo_videos["folder"]) / "train"
    records = [json.loads(line) for line in (videos / "videos.jsonl").read_text().splitlines()]
    documents, errors = [], []
    for shard in manifest.shards:
        for sample in wds.WebDataset(str(folder / shard.name), shardshuffle=False).decode():
            tokens, record = sample["tokens.npy"].astype(np.int64), records[sample["json"]["record"]]
            motion, path = Motion(**record["motion"]), record["video"]
            documents.append(Document(tokens, None))
            begin, end = list(tokens).index(vocab.begin_of_video), list(tokens).index(vocab.end_of_video)
            _, frames, clips = parse_video_block(tokens[begin : end + 1], vocab)
            assert len(frames) == len(clips) == 8 and all(c.shape == (2, 25) for c in clips)
            # The frames are the clip's, sampled at 0, 0.5, ... 3.5 s, as the VQ encodes them.
            sampled = read_video(videos / path, VideoSampling(2, 8, images.resolution))
            assert np.array_equal(np.stack(frames), images.encode(sampled.frames))
            assert sampled.times == pytest.approx(np.arange(8) / 2)
            for index, pixels in enumerate(sampled.frames):  # what the VQ was given shows the shape where it was
                errors.append(np.hypot(*np.subtract(shape_centre(pixels, motion.colour), motion.centre(index / 2))))
            # The clips are the clip's sound track, as the codec encodes it whole, cut at the frames.
            sound = audio.encode([read_audio(videos / path, audio.sampling_rate)])[0]
            assert np.array_equal(np.concatenate(clips, axis=1), sound[:, :200])
    assert max(errors) < 0.06, errors  # a triangle's centroid is a third of its radius below its centre

    packer, numbered = Packer(128, vocab, ["video_text"]), ((0, document) for document in documents)
    sequences = list(iter(lambda: packer.next_sequence(lambda: next(numbered, None)), None))
    going_on = 0
    for sequence in sequences:
        ids, in_video = sequence["input_ids"].numpy(), sequence["in_video"].numpy()
        assert in_video[np.isin(ids, [vocab.begin_of_video, vocab.end_of_video])].all()
        if in_video[0] and ids[0] != vocab.begin_of_video:  # a video going on from the sequence before: at a frame
            assert ids[0] == vocab.begin_of_image
            going_on += 1
    assert going_on >= 6 * len(documents)
    assert sum(int(s["in_video"].sum()) for s in sequences) == sum(
        int(video_mask(d.tokens, vocab).sum()) for d in documents
    )
    with pytest.raises(DataError, match=r"data source 'video_text': a video chunk \(a frame and the sound of its span\) "
                                        r"of 118 tokens does not fit data.seq_len=100"):  # fmt: skip
        Packer(100, vocab, ["video_text"]).next_sequence(lambda: (0, documents[0]))


def test_video_text_from_video2dataset_tars_with_unusable_videos_counted(image_tokenizer_path, audio_tokenizers,
                                                                         tmp_path):  # fmt: skip
    """video2dataset's layout (KEY.mp4 + KEY.json with its caption, KEY.txt too): good clips, a silent
    one (kept, and counted as without sound), a truncated MP4 and one without a caption (skipped,
    counted by reason); two parts merged, and frames encoded in the main process, equal the whole; a
    sampling rate of 0 is refused."""
    clip, silent = tmp_path / "clip.mp4", tmp_path / "silent.mp4"
    make_clip(clip)
    make_clip(silent, sound=False, codec="mpeg4")
    members = {
        "a.mp4": clip.read_bytes(), "a.json": json.dumps({"caption": "a red square moves right"}).encode(),
        "b.mp4": silent.read_bytes(), "b.txt": b"a silent red square",
        "c.mp4": clip.read_bytes()[:2000], "c.txt": b"cut short",
        "d.webm": clip.read_bytes(), "d.json": b'{"url": "no caption here"}',
        "e.mp4": clip.read_bytes(), "e.txt": b"the same clip again",
    }  # fmt: skip
    tars = []
    for number, names in enumerate((["a", "b", "c"], ["d", "e"])):
        tars.append(tmp_path / f"{number:05d}.tar")
        with tarfile.open(tars[-1], "w") as tar:
            for name, payload in members.items():
                if name.split(".")[0] in names:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    settings = BuildSettings("video-text", audio_tokenizers[1], image_tokenizer_path, audio_tokenizer=audio_tokenizers[0],
                             video_fps=2, max_video_frames=4)  # fmt: skip
    manifest = build_shards(settings, tars, tmp_path / "whole", workers=0)
    assert manifest.samples == 3 and manifest.skipped == {"missing_caption": 1, "unreadable_video": 1}
    assert manifest.videos == {"videos": 3, "frames": 12, "without_sound": 1}
    assert manifest.options == {"video_fps": 2, "max_video_frames": 4}
    for part in range(2):
        build_shards(settings, tars, tmp_path / "parts", part=part, parts=2, workers=0)
    merged = merge_manifests(tmp_path / "parts")
    whole = shard_documents(tmp_path / "whole")
    assert merged.videos == manifest.videos and shard_documents(tmp_path / "parts") == whole
    # Decoded in a worker, encoded in the main process in batches over chunks (a GPU's way): the same shards.
    build_shards(dataclasses.replace(settings, encode_in="main"), tars, tmp_path / "main", workers=1)
    assert shard_documents(tmp_path / "main") == whole
    with pytest.raises(DataError, match="--video-fps 0 --max-video-frames 4: both must be positive"):
        BuildSettings("video-text", audio_tokenizers[1], image_tokenizer_path, video_fps=0, max_video_frames=4)
