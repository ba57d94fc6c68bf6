"""Audio tokenization speed: clips encoded (and decoded) per second by the EnCodec tokenizer, for the
demo's small codec and for the 24 kHz model's architecture (random weights: the speed does not
depend on them), on the CPU or a GPU. One JSON line per configuration and direction.

    python bench/audio_tokenizer.py [--device cuda] [--seconds 10] [--clips 32] [--batch 8]
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np
import torch

from data_pipelines.train_audio_tokenizer import small_config
from fusion_train.tokenizers.audio import AudioTokenizer
from fusion_train.tokenizers.encodec import Encodec, EncodecConfig

CONFIGS = {
    "demo_8khz": lambda: small_config(8000, [8, 5, 4], 256, 2),
    "encodec_24khz": EncodecConfig,
}


def timed(function, repeats: int = 2) -> float:
    function()  # warm-up: first calls allocate and pick kernels
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def decode_all(tokenizer: AudioTokenizer, codes: list[np.ndarray]) -> list[np.ndarray]:
    return [tokenizer.decode(c) for c in codes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--levels", type=int, default=2)
    args = parser.parse_args()
    for name, make in CONFIGS.items():
        cfg = make()
        tokenizer = AudioTokenizer(Encodec(cfg), args.levels, fingerprint="", device=args.device, batch_size=args.batch)
        rng = np.random.default_rng(0)
        clips = list(rng.uniform(-0.5, 0.5, (args.clips, int(args.seconds * cfg.sampling_rate))).astype(np.float32))
        codes = tokenizer.encode(clips)
        encode_s = timed(functools.partial(tokenizer.encode, clips))
        decode_s = timed(functools.partial(decode_all, tokenizer, codes[: args.batch]))
        common = {"config": name, "device": args.device, "threads": torch.get_num_threads(), "clip_s": args.seconds,
                  "sampling_rate": cfg.sampling_rate, "levels": args.levels,
                  "tokens_per_audio_s": tokenizer.tokens_per_second}  # fmt: skip
        print(json.dumps({**common, "direction": "encode", "batch": args.batch, "clips_per_s": args.clips / encode_s,
                          "audio_s_per_s": args.clips * args.seconds / encode_s}))  # fmt: skip
        print(json.dumps({**common, "direction": "decode", "batch": 1, "clips_per_s": args.batch / decode_s,
                          "audio_s_per_s": args.batch * args.seconds / decode_s}))  # fmt: skip


if __name__ == "__main__":
    main()
