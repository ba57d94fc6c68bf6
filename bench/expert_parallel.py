"""What modality-aware experts cost against the dense model at equal FLOPs per token, and what
spreading them over ranks changes, on 2 ranks through the DeepSpeed engine (ZeRO-2, fp32 on a
CPU): the `125m` preset cut to --layers blocks, with a 4,608-id vocabulary whose ids 4-515 are image
codes, random tokens (half text, half image) of --seq-len, --micro-batch rows per rank.

    torchrun --nproc_per_node 2 bench/expert_parallel.py --arm dense|experts|experts_ep2

One JSON line (rank 0) per arm, the slower rank's figures: the forward and backward of a
micro-step, the optimizer step, the micro-step's time in the experts' all-to-alls and in ZeRO-2's
gradient reductions (gloo, torch.profiler's collective events) and the parameters a rank holds. Run each arm in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import time

import deepspeed
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from fusion_train.train.config import load_config
from fusion_train.train.engine import build_engine, build_model

ARMS = {
    "dense": [],
    "experts": ["+experts=modality"],
    "experts_ep2": ["+experts=modality", "trainer.expert_parallel=2"],
}
VOCAB, IMAGE_IDS = 4608, (4, 516)


def batch(rows: int, seq_len: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(IMAGE_IDS[1], VOCAB, (rows, seq_len // 2), generator=generator)
    image = torch.randint(*IMAGE_IDS, (rows, seq_len - seq_len // 2), generator=generator)
    return torch.cat([text, image], dim=1)


def measure(engine, ids: torch.Tensor) -> dict:
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        engine.backward(engine(ids, labels=ids).loss)
        micro_step = time.perf_counter() - started
    started = time.perf_counter()
    engine.step()
    optimizer = time.perf_counter() - started
    return {"micro_step_s": micro_step, "optimizer_s": optimizer,
            "all_to_all_s": collective_seconds(profiler, ("all_to_all", "alltoall")),
            "gradient_reduce_s": collective_seconds(profiler, ("reduce_scatter", "allreduce", "all_reduce"))}  # fmt: skip


def collective_seconds(profiler, names: tuple[str, ...]) -> float:
    """CPU time of the profiled events whose names contain one of `names` (gloo's collectives)."""
    return sum(e.cpu_time_total for e in profiler.key_averages() if any(n in e.key.lower() for n in names)) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arm", choices=sorted(ARMS), required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    deepspeed.init_distributed()
    cfg = load_config(["model=125m", f"model.n_layers={args.layers}", f"model.vocab_size={VOCAB}",
                       f"model.image_token_ids=[{IMAGE_IDS[0]},{IMAGE_IDS[1]}]", "model.dropout=0.0",
                       "deepspeed=zero2", f"data.seq_len={args.seq_len}", f"data.micro_batch_size={args.micro_batch}",
                       f"trainer.global_batch_tokens={args.seq_len * args.micro_batch * 2}", *ARMS[args.arm]])  # fmt: skip
    engine, _, _ = build_engine(build_model(cfg, 1), cfg, 1)
    measure(engine, batch(args.micro_batch, args.seq_len, seed=dist.get_rank()))  # warm-up
    runs = [measure(engine, batch(args.micro_batch, args.seq_len, seed=100 * s + dist.get_rank()))
            for s in range(args.steps)]  # fmt: skip
    held = sum(p.numel() for p in engine.module.parameters())
    figures = torch.tensor([sum(r[k] for r in runs) / len(runs) for k in runs[0]] + [held], dtype=torch.float64)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX)  # the slower rank
    row = dict(zip([*runs[0], "parameters_held"], figures.tolist(), strict=True))
    if dist.get_rank() == 0:
        row = {k: round(v, 4) for k, v in row.items()}
        print(json.dumps({"bench": "expert_parallel", "arm": args.arm, "layers": args.layers, "seq_len": args.seq_len,
                          "micro_batch": args.micro_batch, "ranks": dist.get_world_size(),
                          "threads_per_rank": torch.get_num_threads(), **row,
                          "parameters_held": int(row["parameters_held"]),
                          "all_to_all_share": round(row["all_to_all_s"] / row["micro_step_s"], 3)}))  # fmt: skip
    engine.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
