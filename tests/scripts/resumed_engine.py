"""Build a run's trainer as a new invocation would (resuming its latest checkpoint, or starting
from trainer.init_from) on however many ranks this is launched with, and write (rank 0) either
the loss it gives on its first batch, with the batch, or each parameter's whole fp32 weights and
Adam moments (None before Adam's first step), gathered from the ranks' partitions by DeepSpeed."""

import argparse
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from fusion_train.train.config import load_config
from fusion_train.train.run import single_process_environment
from fusion_train.train.trainer import Trainer


def first_batch_loss(trainer: Trainer) -> dict:
    batch = next(iter(trainer.loader))
    trainer.engine.eval()
    with torch.no_grad():
        loss = trainer.engine(batch["input_ids"], labels=batch["labels"]).loss
    return {"input_ids": batch["input_ids"], "labels": batch["labels"], "loss": loss}


def optimizer_state(trainer: Trainer) -> dict:
    # ZeRO-1/2 link each parameter to its slice of the optimizer state at the first step; a freshly
    # loaded engine has taken none. (ZeRO-3 reads the state from its partitions directly.)
    if hasattr(trainer.optimizer, "_lazy_init_hp_params_optimizer_state"):
        trainer.optimizer._lazy_init_hp_params_optimizer_state()
    # Adam has moments once it has taken a step.
    stepped = any("exp_avg" in s for s in trainer.optimizer.optimizer.state.values())
    state = {}
    for name, param in trainer.engine.module.named_parameters():
        name = name.replace("._checkpoint_wrapped_module", "")
        state[name] = {"fp32": safe_get_full_fp32_param(param)}
        for moment in ("exp_avg", "exp_avg_sq"):
            state[name][moment] = safe_get_full_optimizer_state(param, moment) if stepped else None
    return {"step": trainer.step, "state": state}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--write", choices=["loss", "optimizer_state"], default="loss")
    args, overrides = parser.parse_known_args()
    single_process_environment()
    trainer = Trainer(load_config(overrides))
    written = first_batch_loss(trainer) if args.write == "loss" else optimizer_state(trainer)
    if trainer.rank == 0:
        torch.save(written, args.out)
    trainer.close()


if __name__ == "__main__":
    sys.exit(main())
