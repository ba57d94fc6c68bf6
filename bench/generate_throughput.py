"""Generation speed: text tokens/s and seconds per picture, with the KV cache and with full
recompute for every token. A model preset with random weights (speed does not depend on what it
learned) in Chameleon's vocabulary layout, so a picture is a real 1,024-code block. Prints one
JSON line per measurement.

    python bench/generate_throughput.py                                   # tiny on the CPU
    python bench/generate_throughput.py --preset 1b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from fusion_train.generate.constraints import Mode
from fusion_train.generate.generator import Generator, Request
from fusion_train.generate.guidance import Guidance
from fusion_train.generate.sampling import Sampling
from fusion_train.model.chameleon import Chameleon, ChameleonConfig
from fusion_train.vocab import CHAMELEON_VOCAB

PRESETS = Path(__file__).resolve().parent.parent / "conf" / "model"


def model_for(preset: str, device: str, dtype: torch.dtype) -> Chameleon:
    cfg = ChameleonConfig(**yaml.safe_load((PRESETS / f"{preset}.yaml").read_text()))
    return Chameleon(cfg, seed=0).to(device=device, dtype=dtype).eval()


def prompts(batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    vocab = CHAMELEON_VOCAB
    return [[vocab.bos, *torch.randint(vocab.text_start, vocab.vocab_size, (length,), generator=g).tolist()]
            for _ in range(batch)]  # fmt: skip


def timed(generator: Generator, requests, max_new_tokens: int, guidance, device: str) -> tuple[float, int]:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = generator.generate(requests, Sampling(0.7, 0.9, seed=0), max_new_tokens, guidance)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, sum(len(o.tokens) for o in outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--no-cache-text-tokens", type=int, default=64, help="full recompute is quadratic: fewer")
    args = parser.parse_args()
    model = model_for(args.preset, args.device, getattr(torch, args.dtype))
    vocab = CHAMELEON_VOCAB
    common = {"bench": "generate_throughput", "preset": args.preset, "device": args.device, "dtype": args.dtype}
    for use_cache in (True, False):
        generator = Generator(model, vocab, use_cache=use_cache)
        timed(generator, [Request(prompts(1, 8)[0])], 4, None, args.device)  # warm-up
        new_tokens = args.text_tokens if use_cache else args.no_cache_text_tokens
        for batch in args.batch:
            # Text mode on random weights rarely stops early; a stop would only lower the count.
            seconds, tokens = timed(generator, [Request(p) for p in prompts(batch, args.prompt_tokens)], new_tokens,
                                    None, args.device)  # fmt: skip
            print(json.dumps({**common, "what": "text", "kv_cache": use_cache, "batch": batch, "new_tokens": tokens,
                              "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}), flush=True)  # fmt: skip
        # Full recompute draws a picture in 1,025 forwards over up to 1,060 positions: without guidance only.
        for guidance in (None, Guidance()) if use_cache else (None,):
            image = Request([*prompts(1, args.prompt_tokens)[0], vocab.begin_of_image], Mode.IMAGE)
            seconds, tokens = timed(generator, [image], vocab.image_tokens + 1, guidance, args.device)
            print(json.dumps({**common, "what": "image", "kv_cache": use_cache, "guidance": guidance is not None,
                              "codes": tokens - 1, "seconds_per_image": round(seconds, 3)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
