"""Two ranks, side by side in one launch: fusion_train under ZeRO-3 against the same model sharded
with PyTorch's FSDP2 (`fully_shard` on every block and the root, the engine torchtitan uses), and
fusion_train under ZeRO-1 and ZeRO-2 against DistributedDataParallel, the peers in a plain loop.

Every system starts from the same weights (our model's initial values for the seed), each rank
reads its own synthetic batches (the same for every system), and all use the same AdamW settings,
LR schedule and clipping; fusion_train runs its real path (the Trainer, monitors off). So rank 0's
cross-entropies agree step by step between all five. The peers accumulate as their users do: DDP
under `no_sync` and FSDP2 with `set_requires_gradient_sync(False)` until the last micro-step, and
their AdamW runs as torchtitan's does (foreach).

    torchrun --nproc_per_node 2 bench/peer_sharded.py --scratch DIR [--size full|toy] [--rounds N]

rank 0 prints one JSON record: each system's step seconds per round and its CEs.
`bench/peers.py sharded` launches it and summarises.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import plain_loop
import torch
import torch.distributed as dist
from plain_loop import our_loss
from side_by_side import BENCH, run_json, summary
from train_throughput import SyntheticBatches, bench_overrides, synthetic_vocab

from fusion_train.model.chameleon import Chameleon
from fusion_train.train.config import load_config

SYSTEMS = ("ddp", "zero1", "zero2", "fsdp2", "zero3")
PEER_OF = {"ddp": "ddp", "zero1": "ddp", "zero2": "ddp", "fsdp2": "fsdp2", "zero3": "fsdp2"}
RANKS = 2
# full: the training-step comparison's model; toy: seconds, for the test that keeps this from rotting.
SHAPES = {
    "full": {"dim": 512, "n_layers": 4, "n_heads": 8, "ffn_dim": 1408, "vocab_size": 65536, "seq_len": 256},
    "toy": {"dim": 64, "n_layers": 2, "n_heads": 4, "ffn_dim": 176, "vocab_size": 4096, "seq_len": 64},
}
MICRO_BATCH, MICRO_STEPS = 2, 2  # per rank
STEPS = {"full": (2, 4), "toy": (1, 2)}  # warm-up, timed


def config(size: str, zero: int, run_dir: Path):
    shape = SHAPES[size]
    model = [f"model.{key}={value}" for key, value in shape.items() if key != "seq_len"]
    return load_config([
        *bench_overrides("tiny", zero, shape["seq_len"], MICRO_BATCH, MICRO_STEPS * RANKS, sum(STEPS[size]),
                         str(run_dir)),
        *model, f"model.n_kv_heads={shape['n_heads']}", "optim.warmup_steps=1", "monitor.enabled=false",
        "monitor.observers=[step_clock:StepClock]",
    ])  # fmt: skip


def synthetic_batches(cfg) -> SyntheticBatches:
    """This rank's batches, the same for every system."""
    seed = cfg.trainer.seed + dist.get_rank()
    return SyntheticBatches(synthetic_vocab(cfg), MICRO_BATCH, cfg.data.seq_len, seed, 0)


def run_trainer(cfg) -> tuple[list[float], list[float]]:
    from step_clock import StepClock

    from fusion_train.train.trainer import Trainer

    trainer = Trainer(cfg, loader=synthetic_batches(cfg))
    trainer.train()
    (clock,) = [o for o in trainer.observers if isinstance(o, StepClock)]
    trainer.close(keep_process_group=True)
    return clock.step_seconds(), clock.mean_ce()


def run_ddp(cfg) -> tuple[list[float], list[float]]:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(Chameleon(cfg.model, seed=cfg.trainer.seed).to(plain_loop.device()))

    def gradient_sync(last: bool):
        return contextlib.nullcontext() if last else model.no_sync()

    return plain_loop.train(cfg, model, our_loss, iter(synthetic_batches(cfg)), MICRO_STEPS, gradient_sync,
                            foreach=True)  # fmt: skip


def run_fsdp2(cfg) -> tuple[list[float], list[float]]:
    from torch.distributed.fsdp import fully_shard

    model = Chameleon(cfg.model, seed=cfg.trainer.seed).to(plain_loop.device())
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)

    @contextlib.contextmanager
    def gradient_sync(last: bool):
        model.set_requires_gradient_sync(last)
        yield

    return plain_loop.train(cfg, model, our_loss, iter(synthetic_batches(cfg)), MICRO_STEPS, gradient_sync,
                            foreach=True)  # fmt: skip


def measure(system: str, size: str, scratch: Path) -> tuple[list[float], list[float]]:
    zero = int(system[-1]) if system.startswith("zero") else 1
    with tempfile.TemporaryDirectory(dir=scratch) as run_dir:
        shared_run_dir = [run_dir]
        dist.broadcast_object_list(shared_run_dir)  # rank 0's folder for every rank
        cfg = config(size, zero, Path(shared_run_dir[0]))
        run = run_trainer if system.startswith("zero") else {"ddp": run_ddp, "fsdp2": run_fsdp2}[system]
        seconds, ces = run(cfg)
        dist.barrier()  # rank 0 removes the folder only when every rank is done with it
    gc.collect()
    return seconds[STEPS[size][0] :], ces


def launch(size: str, rounds: int, scratch: Path) -> dict:
    """This rank's part: every system once per round, in one process group."""
    seconds, ces = {s: [] for s in SYSTEMS}, {}
    for _ in range(rounds):
        for system in SYSTEMS:
            step_s, ces[system] = measure(system, size, scratch)
            seconds[system].append(step_s)
            if dist.get_rank() == 0:
                print(json.dumps({"run": system, "step_s": step_s}), file=sys.stderr, flush=True)
    tokens = MICRO_BATCH * MICRO_STEPS * RANKS * SHAPES[size]["seq_len"]
    return {"size": size, "ranks": RANKS, "tokens_per_step": tokens, "step_s": seconds, "ce": ces,
            "backend": dist.get_backend()}  # fmt: skip


def compare(size: str, rounds: int) -> list[dict]:
    """One launch of RANKS processes; one summary line per system, its ratio to its peer's."""
    with tempfile.TemporaryDirectory() as scratch:
        record = run_json([
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
            str(BENCH / "peer_sharded.py"), "--size", size, "--rounds", str(rounds), "--scratch", scratch,
        ], OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))  # fmt: skip
    figures = {s: [record["tokens_per_step"] / statistics.mean(run) for run in runs] for s, runs in
               record["step_s"].items()}  # fmt: skip
    lines = []
    for system in SYSTEMS:
        peer_ce, ce = record["ce"][PEER_OF[system]], record["ce"][system]
        more = {"size": size, "ranks": RANKS, "backend": record["backend"], "shape": SHAPES[size],
                "micro_batch_per_rank": MICRO_BATCH, "micro_steps": MICRO_STEPS, "timed_steps": STEPS[size][1],
                "ce_last": round(ce[-1], 5),
                "max_ce_difference": max(abs(a - b) for a, b in zip(ce, peer_ce, strict=True))}  # fmt: skip
        lines.append(summary("sharded", system, PEER_OF[system], "tokens/s", figures, **more))
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SHAPES, default="full")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--scratch", type=Path, required=True, help="a folder every rank can write")
    args = parser.parse_args()
    from fusion_train.train.run import single_process_environment

    single_process_environment()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    import deepspeed

    deepspeed.init_distributed()
    record = launch(args.size, args.rounds, args.scratch)
    if dist.get_rank() == 0:
        print(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()
