"""The peers' training loop: what a plain PyTorch training script does with a model that returns
its loss. Gradient accumulation, clipping, torch's AdamW and LambdaLR with the settings of a
fusion_train config, so that the peers and fusion_train optimise the same thing."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch

from fusion_train.train.schedule import build_schedule

# model, input_ids, labels -> (the loss to backpropagate, its cross-entropy part)
LossAndCE = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on everything but the norms' weights and biases, fusion_train's rule, by name:
    ours are RMSNorms and QK-norms (`*norm*`, `*normalization*`), HF's `*layernorm`, `q_norm`, `k_norm`."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for name, p in named if "norm" not in name], "weight_decay": weight_decay},
        {"params": [p for name, p in named if "norm" in name], "weight_decay": 0.0},
    ]


def train(
    cfg,
    model: torch.nn.Module,
    loss_and_ce: LossAndCE,
    batches: Iterator[dict],
    micro_steps: int,
    gradient_sync: Callable[[bool], contextlib.AbstractContextManager] = lambda last: contextlib.nullcontext(),
    **adamw,
) -> tuple[list[float], list[float]]:
    """cfg.trainer.steps optimizer steps; each step's seconds and mean cross-entropy.
    `gradient_sync(last)`: the context of a micro-step's backward, given whether it is the step's
    last (DDP's no_sync, FSDP2's set_requires_gradient_sync); `adamw`: the optimizer's own options."""
    groups = decay_groups(model, cfg.optim.weight_decay)
    params = [p for group in groups for p in group["params"]]
    optim = cfg.optim
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, **adamw)
    multiplier = build_schedule(optim.schedule, optim.warmup_steps, cfg.trainer.steps, optim.final_lr_ratio)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    seconds, ces = [], []
    model.train()
    for _ in range(cfg.trainer.steps):
        started, ce = time.perf_counter(), 0.0
        for micro in range(micro_steps):
            batch = next(batches)
            with gradient_sync(micro == micro_steps - 1):
                loss, micro_ce = loss_and_ce(model, batch["input_ids"], batch["labels"])
                (loss / micro_steps).backward()
            ce += micro_ce.detach() / micro_steps
        torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's work is done, not only queued
        seconds.append(time.perf_counter() - started)
        ces.append(ce)
    return seconds, [float(ce) for ce in ces]


def hf_loss(model, input_ids, labels):
    loss = model(input_ids=input_ids, labels=labels).loss
    return loss, loss


def our_loss(model, input_ids, labels):
    out = model(input_ids, labels=labels)
    return out.loss, out.ce
