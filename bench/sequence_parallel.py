"""What sequence parallelism buys and costs on this machine: for the `125m` preset on 2 ranks, one
training micro-step (forward and backward through the DeepSpeed engine, ZeRO-1, fp32 on a CPU) at
each sequence length, with each rank holding its own sequence (--sequence-parallel 1) or both
sharing one (2). Per rank (the larger of the two): the activations kept for backward (bytes of the
tensors autograd saves, each storage once, the parameters not counted), the process's peak
resident memory, the step's time and the share of it spent in the attention's all-to-all (gloo,
from torch.profiler's collective events). Run once per layout: a process's resident memory does
not shrink when tensors are freed, so two layouts in one process would mix their peaks.

    torchrun --nproc_per_node 2 bench/sequence_parallel.py --sequence-parallel 2 [--lengths 2048 4096]

One JSON line per length from rank 0; then, from the peaks measured (a constant part plus a part
per token each rank holds, fitted), the longest sequence that fits in --budget-gb per rank.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import deepspeed
import numpy as np
import psutil
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from fusion_train.train.config import load_config
from fusion_train.train.engine import build_engine, build_model
from fusion_train.train.sequence_parallel import SequenceParallel

VOCAB = 65536


class PeakMemory:
    """The process's peak resident memory while it is entered, sampled every millisecond."""

    def __enter__(self):
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def saved_bytes(parameters):
    """A saved-tensors hook pair that counts the bytes autograd keeps, each storage once, the
    parameters' own (which a matrix product saves for its backward) left out."""
    seen, total = {p.untyped_storage().data_ptr() for p in parameters}, [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), total


def micro_step(engine, sequence, seq_len: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, seq_len), generator=generator)
    inputs = sequence.model_inputs(ids, ids.clone(), None, None)
    hooks, kept = saved_bytes(engine.module.parameters())
    with PeakMemory() as memory, profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        with hooks:
            out = sequence.sequence_loss(engine(**inputs))
        engine.backward(out.loss)
        seconds = time.perf_counter() - started
    engine.step()  # the optimizer, untimed: it also clears the gradients for the next length
    all_to_all = sum(e.cpu_time_total for e in profiler.key_averages() if "all_to_all" in e.key.lower()
                     or "alltoall" in e.key.lower()) / 1e6  # fmt: skip
    return {"activations_gb": kept[0] / 1e9, "peak_rss_gb": memory.peak / 1e9, "step_s": seconds,
            "all_to_all_s": all_to_all}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequence-parallel", type=int, choices=[1, 2], required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--model", default="125m")
    parser.add_argument("--budget-gb", type=float, default=8.0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    torch.manual_seed(0)
    n = args.sequence_parallel
    sequence = SequenceParallel.start(n, load_config([f"model={args.model}"]).model, {"--lengths": max(args.lengths)})
    cfg = load_config([f"model={args.model}", "deepspeed=zero1", f"data.seq_len={max(args.lengths)}",
                       "data.micro_batch_size=1", f"trainer.global_batch_tokens={max(args.lengths) * 2 // n}",
                       f"model.max_seq_len={max(4096, max(args.lengths))}", "model.dropout=0.0"])  # fmt: skip
    engine, _, _ = build_engine(build_model(cfg, 1), cfg, 1, sequence=sequence)
    micro_step(engine, sequence, min(args.lengths), seed=1)  # warm-up: buffers, the first gloo exchange
    rows = []
    for seq_len in args.lengths:
        measured = micro_step(engine, sequence, seq_len, seed=seq_len)
        reduced = torch.tensor(list(measured.values()), dtype=torch.float64)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)  # the busier rank
        row = dict(zip(measured, reduced.tolist(), strict=True))
        row.update(bench="sequence_parallel", model=args.model, seq_len=seq_len, sequence_parallel=n,
                   tokens_per_rank=seq_len // n, all_to_all_share=row["all_to_all_s"] / row["step_s"])  # fmt: skip
        rows.append(row)
        if dist.get_rank() == 0:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    # Peak = constant + per token held, over the lengths measured: the longest within the budget.
    slope, constant = np.polyfit([r["tokens_per_rank"] for r in rows], [r["peak_rss_gb"] for r in rows], 1)
    if dist.get_rank() == 0:
        print(json.dumps({"bench": "sequence_parallel_fit", "model": args.model, "sequence_parallel": n,
                          "budget_gb_per_rank": args.budget_gb, "gb_per_token_held": round(slope, 6),
                          "longest_seq_len": int((args.budget_gb - constant) / slope) * n,
                          "fitted_on_lengths": args.lengths, "threads_per_rank": torch.get_num_threads()}))  # fmt: skip
    engine.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
