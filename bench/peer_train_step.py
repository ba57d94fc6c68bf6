"""The training step on one process, side by side: HF transformers' Chameleon in a plain PyTorch
loop (the peer), fusion_train's model in the same loop (what DeepSpeed and the trainer cost is its
difference to the next), and fusion_train's real path (the Trainer: DeepSpeed ZeRO-1, chunked loss
with z-loss, observers) with monitors off and at the default log_every; HF's loop and the real path
also with the C allocator keeping freed memory (KEPT_MEMORY: on a CPU both systems spend much of a
step in page faults on memory freed and allocated again every step).

Every system starts from the same weights (ours, converted to HF's layout by the HF export's own
functions), reads the same synthetic batches and uses the same AdamW settings, weight-decay groups,
LR schedule and clipping, so their cross-entropies agree step by step: our z-loss (1e-5 log²Z) is
added to what we optimise, not to the CE compared. HF's logits are not masked: its vocabulary map
here names no image codes, as our model predicts them too.

    python bench/peer_train_step.py --system SYSTEM [--shape issue26|tiny|toy] \
        [--steps WARMUP TIMED] [--profile DIR] [-- fusion_train overrides]

prints one JSON record: the seconds of every step after the warm-up and every step's mean CE.
`bench/peers.py train` alternates the systems and summarises.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import plain_loop
import torch
from plain_loop import hf_loss, our_loss
from side_by_side import BENCH, alternate, run_json, summary
from train_throughput import (
    SyntheticBatches,
    bench_overrides,
    profile_one_step,
    step_profiler,
    summarise,
    synthetic_vocab,
)

from fusion_train.model.chameleon import Chameleon
from fusion_train.model.formats.hf import hf_config, to_hf_state_dict
from fusion_train.train.config import load_config
from fusion_train.train.run import single_process_environment
from fusion_train.vocab import SPECIAL_NAMES

SYSTEMS = ("hf", "hf+kept_memory", "plain", "fusion_train", "fusion_train+kept_memory", "fusion_train+monitors")
# glibc's allocator keeping freed memory (no block served by mmap, the heap never trimmed): the
# "+kept_memory" systems run with it, read by glibc as the process starts. On a CPU the large
# tensors a step allocates afresh otherwise come back as new pages, a fault per 4 KiB.
KEPT_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}
PEER = "hf"
# issue26: the shape of issue 26's comparison; tiny: the tiny preset (GQA, the output layer nearly
# all of it); toy: seconds, for the test that keeps this script from rotting.
SHAPES = {
    "issue26": {"dim": 512, "n_layers": 4, "n_heads": 8, "n_kv_heads": 8, "ffn_dim": 1408, "vocab_size": 65536,
                "seq_len": 256},
    "tiny": {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 384, "vocab_size": 65536,
             "seq_len": 256},
    "toy": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "ffn_dim": 176, "vocab_size": 4096,
            "seq_len": 64},
}  # fmt: skip
SIZES = {"full": ("issue26", "tiny"), "toy": ("toy",)}
MICRO_BATCH, MICRO_STEPS = 2, 2
# Warm-up and timed steps: at the default log_every (10) the timed window holds one logged step, as
# a run's does; the toy shape only checks the losses.
STEPS = {"issue26": (10, 10), "tiny": (10, 10), "toy": (1, 3)}


def config(shape_name: str, run_dir: str, monitors: bool, steps: tuple[int, int], overrides: tuple[str, ...] = ()):
    shape = SHAPES[shape_name]
    model = [f"model.{key}={value}" for key, value in shape.items() if key != "seq_len"]
    return load_config([
        *bench_overrides("tiny", 1, shape["seq_len"], MICRO_BATCH, MICRO_STEPS, sum(steps), run_dir),
        *model, "optim.warmup_steps=1",
        f"monitor.enabled={str(monitors).lower()}", "monitor.observers=[step_clock:StepClock]", *overrides,
    ])  # fmt: skip


def synthetic_batches(cfg) -> SyntheticBatches:
    """The same batches for every system: uniform ids over the whole vocabulary, seeded."""
    return SyntheticBatches(synthetic_vocab(cfg), MICRO_BATCH, cfg.data.seq_len, cfg.trainer.seed, 0)


# --- the peer: HF's model in a plain loop ---------------------------------------------------------


def hf_model(cfg, ours: Chameleon):
    """HF's ChameleonForConditionalGeneration holding our model's weights."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    settings = hf_config(cfg.model, synthetic_vocab(cfg), torch.float32)
    settings["vocabulary_map"] = {name: i for i, name in SPECIAL_NAMES.items()}  # no image names: no masking
    hf_cfg = ChameleonConfig(**settings)
    hf_cfg._attn_implementation = "sdpa"
    model = ChameleonForConditionalGeneration(hf_cfg)
    missing, unexpected = model.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg.model), strict=False)
    assert not unexpected and all(name.startswith("model.vqmodel.") for name in missing), (missing, unexpected)
    model.model.vqmodel.requires_grad_(False)  # the image tokenizer is not trained
    return model


# --- fusion_train's real path ----------------------------------------------------------------------


def trainer_run(cfg, profile: Path | None, warmup: int) -> tuple[list[float], list[float], list[bool]]:
    from step_clock import StepClock

    from fusion_train.train.trainer import Trainer

    single_process_environment()
    trainer = Trainer(cfg, loader=synthetic_batches(cfg))
    profiler = profile_one_step(trainer, str(profile), after=warmup) if profile else None
    trainer.train()
    if profiler is not None:
        summarise(profiler, profile)
    (clock,) = [o for o in trainer.observers if isinstance(o, StepClock)]
    trainer.close()
    return clock.step_seconds(), clock.mean_ce(), clock.logged


def plain_run(cfg, system: str, profile: Path | None, warmup: int) -> tuple[list[float], list[float]]:
    ours = Chameleon(cfg.model, seed=cfg.trainer.seed)
    model, loss_and_ce = (hf_model(cfg, ours), hf_loss) if system.startswith("hf") else (ours, our_loss)
    model.to(plain_loop.device())
    profiler = step_profiler(str(profile), after=warmup) if profile else None
    if profiler is not None:
        profiler.start()
    seconds, ces = plain_loop.train(cfg, model, loss_and_ce, iter(synthetic_batches(cfg)), MICRO_STEPS,
                                    profiler=profiler)  # fmt: skip
    if profiler is not None:
        summarise(profiler, profile)
    return seconds, ces


def run(
    system: str,
    shape: str,
    steps: tuple[int, int] | None = None,
    overrides: tuple[str, ...] = (),
    profile: Path | None = None,
) -> dict:
    """`overrides`: Hydra overrides of fusion_train's settings (the peers use the optimizer's alone);
    `profile`: a folder for the trace of the first timed step."""
    steps = steps or STEPS[shape]
    warmup = steps[0]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = config(shape, run_dir, system == "fusion_train+monitors", steps, overrides)
        if system.startswith("fusion_train"):
            seconds, ces, logged = trainer_run(cfg, profile, warmup)
        else:
            seconds, ces = plain_run(cfg, system, profile, warmup)
            logged = [False] * len(seconds)
    return {
        "system": system, "shape": shape, "tokens_per_step": MICRO_BATCH * MICRO_STEPS * cfg.data.seq_len,
        "log_every": cfg.logging.log_every, "warmup_steps": warmup, "step_s": seconds[warmup:],
        "logged": logged[warmup:], "ce": ces,
        "threads": torch.get_num_threads(), "overrides": list(overrides), "profile": str(profile) if profile else None,
    }  # fmt: skip


def compare_at(shape: str, size: str, rounds: int) -> list[dict]:
    """Every system once per round, each in a fresh process; one summary line per system."""

    def measure(system: str) -> dict:
        command = [sys.executable, str(BENCH / "peer_train_step.py"), "--system", system, "--shape", shape]
        return run_json(command, **(KEPT_MEMORY if system.endswith("+kept_memory") else {}))

    # The allocator variants only change the speed: the toy size, which checks the work, leaves them out.
    systems = SYSTEMS if size == "full" else tuple(s for s in SYSTEMS if not s.endswith("+kept_memory"))
    records = alternate(systems, measure, rounds)
    figures = {s: [r["tokens_per_step"] / statistics.mean(r["step_s"]) for r in runs] for s, runs in records.items()}
    peer_ce = records[PEER][0]["ce"]
    lines = []
    for system in systems:
        ce = records[system][0]["ce"]  # every round trains the same thing
        more = {"size": size, "shape": shape, "model": SHAPES[shape], "micro_batch": MICRO_BATCH,
                "micro_steps": MICRO_STEPS, "timed_steps": STEPS[shape][1], "ce_last": round(ce[-1], 5),
                "max_ce_difference": max(abs(a - b) for a, b in zip(ce, peer_ce, strict=True))}  # fmt: skip
        if system == "fusion_train+monitors":
            more["monitor_cost"] = monitor_cost(records[system], records["fusion_train"])
        lines.append(summary("train_step", system, PEER, "tokens/s", figures, **more))
    return lines


def monitor_cost(on: list[dict], off: list[dict]) -> float | None:
    """What the monitors add to a run at its log_every, as a fraction of its time, the median over
    rounds. Each process's speed differs from the next one's by more than the monitors cost (up to
    30% here), so the cost is read inside each run: what a logged step takes beyond the run's usual
    step, with monitors less without. On steps not logged the monitors do next to nothing (the
    guard's one small all-reduce)."""

    def logged_extra(record: dict) -> tuple[float, float] | None:
        usual = [s for s, logged in zip(record["step_s"], record["logged"], strict=True) if not logged]
        extra = [s for s, logged in zip(record["step_s"], record["logged"], strict=True) if logged]
        if not usual or not extra:
            return None
        return statistics.mean(extra) - statistics.median(usual), statistics.median(usual)

    costs = []
    for with_monitors, without in zip(on, off, strict=True):
        measured = logged_extra(with_monitors), logged_extra(without)
        if None not in measured:
            (extra_on, usual), (extra_off, _) = measured
            costs.append((extra_on - extra_off) / (with_monitors["log_every"] * usual))
    return round(statistics.median(costs), 4) if costs else None


def compare(size: str, rounds: int) -> list[dict]:
    return [line for shape in SIZES[size] for line in compare_at(shape, size, rounds)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=SYSTEMS, required=True)
    parser.add_argument("--shape", choices=SHAPES, default="issue26")
    parser.add_argument("--steps", type=int, nargs=2, metavar=("WARMUP", "TIMED"), help="default: the shape's")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="trace the first timed step into DIR")
    args, overrides = parser.parse_known_args()
    overrides = tuple(o for o in overrides if o != "--")
    print(json.dumps(run(args.system, args.shape, args.steps, overrides, args.profile)))
