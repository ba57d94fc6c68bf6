"""Video tokenization speed on the CPU (or a GPU): clips read (PyAV: frames sampled, centre-cropped,
the sound resampled) and tokenized (VQ frames, EnCodec sound cut per frame) per second, and what a
second of video costs in ids, for the video demo's settings (64-px frames at 2 a second, its small
VQ and 8 kHz codec) and Chameleon's (512-px frames at 1 a second, the 8,192-code VQGAN, the 24 kHz
EnCodec at 2 levels). Random weights: the speed does not depend on them. One JSON line each.

    python bench/video_tokenizer.py [--device cuda] [--clips 4] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from data_pipelines.synthetic_video import random_motion, write_video
from data_pipelines.train_audio_tokenizer import small_config as small_codec
from data_pipelines.train_image_tokenizer import small_config as small_vq
from fusion_train.tokenizers.audio import AudioTokenizer
from fusion_train.tokenizers.encodec import Encodec, EncodecConfig
from fusion_train.tokenizers.image import ImageTokenizer
from fusion_train.tokenizers.video import VideoSampling, read_video, tokenize_video
from fusion_train.tokenizers.vqgan import VQGAN, VQGANConfig

SETTINGS = {
    "video_demo": dict(vq=lambda: small_vq(64, 8, 512), codec=lambda: small_codec(8000, [8, 5, 4], 256, 2),
                       fps=2.0, source_px=64),
    "chameleon_1fps": dict(vq=VQGANConfig, codec=EncodecConfig, fps=1.0, source_px=512),
}  # fmt: skip


def ids_of(codes, grid: int, levels: int) -> int:
    """The ids of a video block (markers included; the header left out)."""
    frames = len(codes.frames) * (grid * grid + 2)
    sound = sum(2 + levels * clip.shape[1] for clip in codes.sound or [])
    return 2 + frames + sound


def run(name: str, setting: dict, clips: int, seconds: float, device: str) -> dict:
    torch.manual_seed(0)
    images = ImageTokenizer(VQGAN(setting["vq"]()), fingerprint="", device=device, bf16=device.startswith("cuda"))
    audio = AudioTokenizer(Encodec(setting["codec"]()), 2, fingerprint="", device=device)
    sampling = VideoSampling(setting["fps"], 1 << 20, images.resolution, audio.sampling_rate)
    with tempfile.TemporaryDirectory() as folder:
        rng = random.Random(0)
        paths = [Path(folder) / f"{i}.mp4" for i in range(clips)]
        for path in paths:
            write_video(path, random_motion(rng, seconds), setting["source_px"])
        tokenize_video(read_video(paths[0], sampling), sampling, images, audio)  # warm-up
        read_s = encode_s = 0.0
        ids = frames = 0
        for path in paths:
            started = time.perf_counter()
            video = read_video(path, sampling)
            read = time.perf_counter()
            codes = tokenize_video(video, sampling, images, audio)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            read_s, encode_s = read_s + read - started, encode_s + time.perf_counter() - read
            ids, frames = ids + ids_of(codes, images.grid, audio.levels), frames + len(codes.frames)
    total = read_s + encode_s
    return {"bench": "video_tokenizer", "setting": name, "device": device, "clips": clips, "seconds_each": seconds,
            "frame_px": images.resolution, "frames_per_second": setting["fps"], "grid": images.grid,
            "ids_per_second_of_video": round(ids / (clips * seconds), 1), "videos_per_s": round(clips / total, 3),
            "frames_per_s": round(frames / total, 2), "ids_per_s": round(ids / total),
            "read_share": round(read_s / total, 2), "threads": torch.get_num_threads()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    for name, setting in SETTINGS.items():
        print(json.dumps(run(name, setting, args.clips, args.seconds, args.device)), flush=True)


if __name__ == "__main__":
    main()
