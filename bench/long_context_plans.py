"""`fusion-train --plan` for long context: the 7b and 34b presets at 32K, 128K and 1M tokens per
sequence on 8 to 1,024 A100-80GB, ZeRO-3 with activation checkpointing and the long-context stage's
RoPE scaling, each with the fewest sequence-parallel GPUs per sequence that fits (`first_change`
when none does) and keeps Chameleon's tokens per step (more GPUs than 2^23 / seq_len data-parallel
ranks would take more sequences per step than that: they share sequences instead, up to one
attention head per GPU, Ulysses' limit). One JSON line
per plan; `--markdown` prints launch/README.md's table instead."""

import argparse
import dataclasses
import json
import math

from fusion_train.train.config import load_config
from fusion_train.train.plan import _fits, make_plan

MODELS = {"7b": 2**23, "34b": 3 * 2**22}  # tokens per step: Chameleon's
SEQUENCES = (32768, 131072, 1048576)
GPUS = (8, 64, 1024)


def plan(model: str, seq_len: int, gpus: int) -> dict:
    overrides = [f"model={model}", "deepspeed=zero3", "data=chameleon_stage1", "+stage=long_context",
                 f"data.seq_len={seq_len}", f"model.max_seq_len={seq_len}", "trainer.gpu=a100",
                 "trainer.activation_checkpointing=true"]  # fmt: skip
    cfg = load_config(overrides)
    tokens = MODELS[model]
    fewest = 1 << max(0, math.ceil(math.log2(gpus * seq_len / tokens)))  # GPUs per sequence that keep the tokens
    widest = min(gpus, cfg.model.n_heads)  # Ulysses splits the heads: at most one per GPU
    for n in (min(fewest * 2**k, widest) for k in range(11)):
        per_micro_step = seq_len * gpus // n
        cfg = with_trainer(
            cfg, sequence_parallel=n, global_batch_tokens=math.ceil(tokens / per_micro_step) * per_micro_step
        )
        if n == widest or _fits(cfg, gpus):
            break
    return {"model": model, **make_plan(cfg, gpus)}


def with_trainer(cfg, **settings):
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, **settings))


def markdown(plans: list[dict]) -> str:
    lines = ["| model | tokens per sequence | GPUs | GPUs per sequence | tokens per GPU | activations | total | "
             "fits | all-to-all per step | s per step |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in plans:
        fits = "fits" if p["fits"] else f"no: {p['first_change']}"
        lines.append(
            f"| {p['model']} | {p['seq_len']:,} | {p['gpus']:,} | {p['sequence_parallel']} | {p['tokens_per_gpu']:,} | "
            f"{p['memory_gb_per_gpu']['activations']:.1f} | {p['memory_gb_per_gpu_total']:.1f} | {fits} | "
            f"{p['all_to_all_gb_per_step']:,.0f} GB | {p['seconds_per_step']:,.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    plans = [plan(m, s, g) for m in MODELS for s in SEQUENCES for g in GPUS]
    if args.markdown:
        print(markdown(plans))
        return
    for p in plans:
        print(json.dumps({"bench": "long_context_plan", **{k: v for k, v in p.items() if k != "parameters_by_group"}}))


if __name__ == "__main__":
    main()
