"""Memory and time of the output layer + loss, forward and backward: chunked vs full logits.

Each variant runs in a fresh process so that its peak memory is its own (CPU: the rise of the
process's peak RSS over the inputs; GPU: torch's peak allocation over the inputs). Prints one JSON
line per variant.

    python bench/chunked_loss.py                       # CPU-sized defaults
    python bench/chunked_loss.py --positions 32768 --dim 2048 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from fusion_train.model.loss import chunked_lm_loss, reference_lm_loss

VARIANTS = ("full_logits", "chunked")


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(args: argparse.Namespace) -> dict:
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device=args.device).manual_seed(0)
    hidden = torch.randn(1, args.positions, args.dim, device=args.device, dtype=dtype, generator=generator)
    weight = torch.randn(args.vocab, args.dim, device=args.device, dtype=dtype, generator=generator) * 0.02
    labels = torch.randint(0, args.vocab, (1, args.positions), device=args.device, generator=generator)
    hidden.requires_grad_()
    weight.requires_grad_()
    baseline = peak_bytes(args.device)

    started = time.perf_counter()
    if args.variant == "chunked":
        loss = chunked_lm_loss(hidden, weight, labels, z_loss=1e-5, chunk_size=args.chunk_size).loss
    else:
        loss = reference_lm_loss(hidden, weight, labels, z_loss=1e-5)
    loss.backward()
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "bench": "chunked_loss",
        "variant": args.variant,
        "device": args.device,
        "dtype": args.dtype,
        "positions": args.positions,
        "dim": args.dim,
        "vocab": args.vocab,
        "chunk_size": args.chunk_size if args.variant == "chunked" else None,
        "full_logits_fp32_mib": round(args.positions * args.vocab * 4 / 2**20),
        "seconds_forward_backward": round(seconds, 3),
        "peak_extra_mib": round((peak_bytes(args.device) - baseline) / 2**20),
        "loss": round(loss.item(), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process")
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(run_variant(args)), flush=True)
        return
    for variant in VARIANTS:
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant], check=True)


if __name__ == "__main__":
    main()
