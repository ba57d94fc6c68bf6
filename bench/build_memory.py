"""Peak host memory per rank while the trainer builds a model preset, under ZeRO-2 (every rank
builds the whole fp32 model) and ZeRO-3 (built inside deepspeed.zero.Init, partitioned as it is
made). Prints one JSON line per stage and rank.

    python bench/build_memory.py [--model 1b] [--ranks 2] [--stages 2 3]

Each stage runs under torchrun with --ranks CPU ranks; each rank reports its resident set before
construction and its peak (ru_maxrss, the highest it ever was) after, both in GB, and the model's
fp32 size for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys

GB = 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GB


def measure_one_rank(model: str, stage: int) -> None:
    import deepspeed
    import torch.distributed as dist

    from fusion_train.model.size import parameter_counts
    from fusion_train.train.config import load_config
    from fusion_train.train.engine import build_model

    deepspeed.init_distributed()
    cfg = load_config([f"model={model}", f"deepspeed=zero{stage}"])
    before, peak_before = current_rss_gb(), peak_rss_gb()
    build_model(cfg, gradient_accumulation_steps=1)
    print(json.dumps({
        "bench": "build_memory", "model": model, "zero_stage": stage, "rank": dist.get_rank(),
        "ranks": dist.get_world_size(), "model_fp32_gb": round(parameter_counts(cfg.model).total * 4 / GB, 2),
        "rss_before_gb": round(before, 2), "peak_rss_gb": round(peak_rss_gb(), 2),
        "peak_above_start_gb": round(peak_rss_gb() - max(before, peak_before), 2),
    }), flush=True)  # fmt: skip
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1b")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)  # set on the ranks
    args = parser.parse_args()
    if args.stage is not None:
        measure_one_rank(args.model, args.stage)
        return
    for stage in args.stages:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, "--model", args.model, "--stage", str(stage)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = sorted(line for line in result.stdout.splitlines() if line.startswith('{"bench"'))
        if result.returncode != 0 or len(lines) != args.ranks:
            sys.exit(f"stage {stage} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
