"""The peers' training loop: what a plain PyTorch training script does with a model that returns
its loss. Gradient accumulation, clipping, torch's AdamW and LambdaLR with the settings of a
fusion_train config, so that the peers and fusion_train optimise the same thing. On a GPU the
forward runs under bf16 autocast (fusion_train trains in bf16 there, with fp32 master weights)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch

from fusion_train.train.schedule import build_schedule

# model, input_ids, labels -> (the loss to backpropagate, its cross-entropy part)
LossAndCE = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def device() -> torch.device:
    """Where the peers' models train: this rank's GPU, if there is one."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


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
    profiler: torch.profiler.profile | None = None,
    **adamw,
) -> tuple[list[float], list[float]]:
    """cfg.trainer.steps optimizer steps; each step's seconds and mean cross-entropy.
    `gradient_sync(last)`: the context of a micro-step's backward, given whether it is the step's
    last (DDP's no_sync, FSDP2's set_requires_gradient_sync); `profiler`: told as each step begins;
    `adamw`: the optimizer's own options."""
    groups = decay_groups(model, cfg.optim.weight_decay)
    params = [p for group in groups for p in group["params"]]
    optim = cfg.optim
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, **adamw)
    multiplier = build_schedule(optim.schedule, optim.warmup_steps, cfg.trainer.steps, optim.final_lr_ratio)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    seconds, ces = [], []
    device = params[0].device
    model.train()
    for _ in range(cfg.trainer.steps):
        if profiler is not None:
            profiler.step()
        started, ce = time.perf_counter(), 0.0
        for micro in range(micro_steps):
            batch = next(batches)
            input_ids, labels = (batch[key].to(device, non_blocking=True) for key in ("input_ids", "labels"))
            with gradient_sync(micro == micro_steps - 1):
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    loss, micro_ce = loss_and_ce(model, input_ids, labels)
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
