"""Throughput of fusion_train's real training path: the Trainer itself (DeepSpeed engine, gradient
accumulation, chunked loss with z-loss and per-modality sums, monitors and guard) fed synthetic
token batches, so that no data has to exist. The figures are the trainer's own `perf/*` metrics
over the timed steps, after `--log-every` warm-up steps; logged steps (every `--log-every`) pay
the monitors' per-log costs as in training. Prints one JSON line.

    python bench/train_throughput.py --preset tiny --seq-len 256 --micro-batch 8 --micro-steps 4   # CPU
    torchrun --nproc_per_node 1 bench/train_throughput.py --preset 1b --seq-len 4096 --micro-batch 8 \\
        --micro-steps 32 --zero 1 --compile                                                        # H100

Anything after `--` is passed to the trainer as Hydra overrides (e.g. `-- monitor.enabled=false`).
`--profile DIR` records the first timed optimizer step with torch.profiler (a Chrome/Perfetto trace
in DIR; the top operators, and the time by operator and the code around it, in DIR/summary.txt);
the step's profiling overhead is then in the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import profile_by_frame
import torch

from fusion_train.model.size import parameter_counts
from fusion_train.train.config import load_config
from fusion_train.train.run import single_process_environment
from fusion_train.train.trainer import Trainer
from fusion_train.vocab import CHAMELEON_VOCAB, VocabLayout


class SyntheticBatches:
    """Uniform random ids over the whole vocabulary (so every modality has targets) in the shape
    of the training loader's micro-batches; a stand-in for TokenLoader with nothing to resume."""

    def __init__(self, vocab: VocabLayout, micro_batch: int, seq_len: int, seed: int, document_length: int):
        self.dataset = self  # the trainer reads .dataset.vocab, .names and .fingerprints
        self.vocab, self.names, self.fingerprints = vocab, ["synthetic"], {}
        self.shape, self.seed, self.document_length = (micro_batch, seq_len), seed, document_length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            ids = torch.randint(0, self.vocab.vocab_size, self.shape, generator=generator)
            yield {
                "input_ids": ids,
                "labels": ids,
                "doc_ids": self._doc_ids(generator),
                "in_video": torch.zeros(self.shape, dtype=torch.bool),
                "documents_per_source": torch.ones(self.shape[0], 1, dtype=torch.long),
                "skipped_samples": torch.zeros(self.shape[0], dtype=torch.long),
            }

    def _doc_ids(self, generator: torch.Generator) -> torch.Tensor:
        """Documents of lengths uniform in [L/2, 3L/2) (L: --document-length; 0: one per row),
        packed from each row's start."""
        if not self.document_length:
            return torch.zeros(self.shape, dtype=torch.long)
        low, count = self.document_length // 2, self.shape[1] // (self.document_length // 2) + 1
        lengths = torch.randint(low, low + self.document_length, (self.shape[0], count), generator=generator)
        starts = lengths.cumsum(1)  # document i ends before starts[:, i]
        positions = torch.arange(self.shape[1]).expand(self.shape[0], -1)
        return torch.searchsorted(starts, positions, right=True)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def stalled_read(self) -> str:
        return "synthetic batches, made in the training process"


def bench_overrides(
    preset: str, zero: int, seq_len: int, micro_batch: int, micro_batches: int, steps: int, run_dir: str
) -> list[str]:
    """A benchmark's trainer settings: `micro_batches` per optimizer step over all ranks, no
    checkpoints, W&B or progress bar."""
    return [
        f"model={preset}", f"deepspeed=zero{zero}", f"data.seq_len={seq_len}", f"data.micro_batch_size={micro_batch}",
        f"trainer.global_batch_tokens={micro_batch * seq_len * micro_batches}", f"trainer.steps={steps}",
        "trainer.checkpoint_every=0", f"trainer.run_dir={run_dir}", "logging.wandb=false", "trainer.progress_bar=false",
    ]  # fmt: skip


def synthetic_vocab(cfg) -> VocabLayout:
    """Chameleon's layout at its size; a small one of the same rule for a smaller vocabulary."""
    if cfg.model.vocab_size == CHAMELEON_VOCAB.vocab_size:
        return CHAMELEON_VOCAB
    return VocabLayout(image_codebook_size=512, image_grid=8, vocab_size=cfg.model.vocab_size, n_reserved=513)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="conf/model/<preset>.yaml")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--micro-steps", type=int, default=32, help="gradient accumulation per optimizer step")
    parser.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3))
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (a multiple of --log-every)")
    parser.add_argument("--log-every", type=int, default=5, help="also the number of warm-up steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--document-length", type=int, default=0,
                        help="mean length of the documents packed in each row (0: one per row); attention is "
                        "confined to them with `-- data.document_mask=true [model.attention=flex]`")  # fmt: skip
    parser.add_argument("--profile", metavar="DIR", help="trace the first timed optimizer step into DIR")
    args, overrides = parser.parse_known_args(argv)
    if args.steps % args.log_every:
        parser.error("--steps must be a multiple of --log-every")
    return args, [o for o in overrides if o != "--"]


def main(argv=None) -> None:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    single_process_environment()
    world = int(os.environ["WORLD_SIZE"])
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config([
            *bench_overrides(args.preset, args.zero, args.seq_len, args.micro_batch, args.micro_steps * world,
                             args.log_every + args.steps, run_dir),
            f"trainer.compile={args.compile}", f"trainer.activation_checkpointing={args.activation_checkpointing}",
            f"logging.log_every={args.log_every}", *extra,
        ])  # fmt: skip
        batches = SyntheticBatches(
            synthetic_vocab(cfg), args.micro_batch, args.seq_len, cfg.trainer.seed, args.document_length
        )
        trainer = Trainer(cfg, loader=batches)
        profiler = profile_one_step(trainer, args.profile, after=args.log_every) if args.profile else None
        trainer.train()
        host_syncs = summarise(profiler, Path(args.profile)) if profiler is not None else None
        rank = trainer.rank
        trainer.close()
        if rank != 0:
            return
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in records if "loss/total" in r]  # not the invocation's start mark
    timed = rows[1:]  # the first window is the warm-up (compilation, allocator, first shm build)
    step_time = statistics.mean(r["perf/step_time_s"] for r in timed)
    tokens_per_s = cfg.trainer.global_batch_tokens / step_time
    print(json.dumps({
        "bench": "train_throughput", "system": "fusion_train", "preset": args.preset,
        "parameters": parameter_counts(cfg.model).total, "device": device_name(), "devices": world,
        "dtype": "bf16" if torch.cuda.is_available() and cfg.deepspeed.bf16 else "fp32",
        "zero_stage": args.zero, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "grad_accum": args.micro_steps, "global_batch_tokens": cfg.trainer.global_batch_tokens,
        "compile": args.compile, "activation_checkpointing": args.activation_checkpointing,
        "document_length": args.document_length, "document_mask": cfg.data.document_mask,
        "attention": cfg.model.attention,
        "monitoring": cfg.monitor.enabled, "overrides": extra, "timed_steps": args.steps,
        "step_time_s": round(step_time, 4), "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_per_device": round(tokens_per_s / world, 1),
        "tflops_per_device": float(f"{statistics.mean(r['perf/tflops'] for r in timed):.4g}"),
        "mfu": float(f"{statistics.mean(r['perf/mfu'] for r in timed):.4g}"),
        "peak_mem_gb": round(max(r["perf/mem_gb"] for r in timed), 2),
        "loss_first": round(rows[0]["loss/total"], 4), "loss_last": round(rows[-1]["loss/total"], 4),
        "losses": [r["loss/total"] for r in rows], "profile": args.profile, "host_syncs_in_profiled_step": host_syncs,
    }))  # fmt: skip


def step_profiler(folder: str, after: int) -> torch.profiler.profile:
    """A profiler, with Python stacks (bench/profile_by_frame.py reads them), that records optimizer
    step `after + 1` (1-based) when `.step()` is called as each optimizer step begins."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=after + 1, warmup=0, active=1, repeat=1),  # + the set-up before step 1
        on_trace_ready=torch.profiler.tensorboard_trace_handler(folder),
        with_stack=True,
    )


def profile_one_step(trainer: Trainer, folder: str, after: int) -> torch.profiler.profile:
    """A started step_profiler of the trainer's step `after + 1`, from its first micro-step's forward
    to the next step's: forwards, backwards, the optimizer step and the step's logging."""
    profiler = step_profiler(folder, after)
    micro_steps = itertools.count()

    def at_each_optimizer_step(module, _inputs):
        if module.training and next(micro_steps) % trainer.grad_accum == 0:
            profiler.step()

    trainer.engine.module.register_forward_pre_hook(at_each_optimizer_step)
    profiler.start()
    return profiler


def summarise(profiler: torch.profiler.profile, folder: Path) -> dict[str, int]:
    """Writes the top operators to folder/summary.txt; returns the calls that made the host wait for
    the GPU (cuda*Synchronize, each `.item()` or device-to-host copy among them) in the traced step."""
    profiler.stop()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    events = profiler.key_averages()
    syncs = {event.key: event.count for event in events if "Synchronize" in event.key}
    table = events.table(sort_by=f"self_{device}_time_total", row_limit=30)
    (folder / "summary.txt").write_text(
        f"{table}\nhost waits for the GPU: {syncs}\n\n{profile_by_frame.table(folder)}\n"
    )
    print(table, file=sys.stderr)
    return syncs


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
