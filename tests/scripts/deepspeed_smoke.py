"""Train the tiny Chameleon through deepspeed.initialize and write rank 0's record as JSON.

Run under torchrun; on CPU DeepSpeed picks its CPU accelerator and gloo.
"""

import argparse
import gc
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fusion_train.model.chameleon import Chameleon  # noqa: E402
from helpers import preset  # noqa: E402

VOCAB_SIZE = 512  # the tiny preset with a demo-sized vocabulary, to keep CPU steps short
SEQ_LEN = 64


def learnable_batch(step: int, micro_step: int, rank: int, batch_size: int) -> torch.Tensor:
    """Arithmetic progressions modulo the vocabulary: each sequence is predictable from its start."""
    generator = torch.Generator().manual_seed(step * 1000 + micro_step * 10 + rank)
    start = torch.randint(0, VOCAB_SIZE, (batch_size, 1), generator=generator)
    stride = torch.randint(1, 8, (batch_size, 1), generator=generator)
    return (start + stride * torch.arange(SEQ_LEN)) % VOCAB_SIZE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = Chameleon(preset("tiny", vocab_size=VOCAB_SIZE, max_seq_len=SEQ_LEN))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.zero_stage},
        "steps_per_print": 10**9,
    }
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    losses = []
    for step in range(args.steps):
        step_loss = torch.zeros(())
        for micro_step in range(args.grad_accum):
            ids = learnable_batch(step, micro_step, rank, args.micro_batch)
            out = engine(ids, labels=ids)
            engine.backward(out.loss)
            engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
            step_loss += out.loss.detach() / args.grad_accum
        dist.all_reduce(step_loss)
        losses.append(step_loss.item() / world)

    # Data parallelism keeps replicas identical: gather a checksum of each rank's weights.
    checksum = torch.stack([p.detach().double().sum() for p in engine.module.parameters()]).sum().reshape(1)
    checksums = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(checksums, checksum)
    if rank == 0:
        record = {
            "losses": losses,
            "world_size": world,
            "zero_stage": engine.zero_optimization_stage(),
            "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
            "optimizer_steps": engine.global_steps,
            "optimizer": type(optimizer).__name__,
            "backend": dist.get_backend(),
            "weight_checksums": [c.item() for c in checksums],
        }
        with open(args.out, "w") as f:
            json.dump(record, f)

    # Tear down before exit: gloo worker threads otherwise abort the interpreter now and then.
    dist.barrier()
    engine.destroy()
    del engine, optimizer, model
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
