"""Where the training loop and everything that watches it meet.

An `Observer` sees the loop at these points, each a no-op unless it overrides it:

    step_started(step, logged)        before optimizer step `step` (1-based); logged: its metrics go out
    micro_batch(batch, out, sums)     after each micro-batch's forward, before its backward
    before_optimizer_step()           after the step's last backward, before the optimizer applies it
    step_ended(step, sums) -> bool    after the optimizer; True: log this step though not scheduled
    metrics(reduced, log) -> dict     on logged steps: this observer's metrics, from its reduced sums
    after_step(step) -> str | None    after the log: evaluate, or act (STOP, ROLLED_BACK end the step)

The maths of a step is never an observer's to change; only the guard's actions, through the
trainer, stop a run or take it back to a checkpoint.

Each observer declares its own sums (`sums()`: name -> `Sum`). The loop keeps them on the device
for a log window, and on logged steps only reduces every observer's over the ranks in one
collective per reduction: an observer adds device tensors (or Python scalars, kernel arguments) to
them and never waits for the device itself, so no micro-step has a host sync.

A metric of one's own is one observer, named in `monitor.observers` (docs/architecture.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fusion_train.vocab import VocabLayout

STOP, ROLLED_BACK = "stop", "rolled_back"  # what after_step may return


@dataclass(frozen=True)
class Sum:
    """`size` values on the device per log window, from `start`; the observer adds to them (or
    takes a maximum) within the window, and `reduce` ("sum" or "max") combines the ranks' values."""

    size: int = 1
    reduce: str = "sum"
    start: float = 0.0


@dataclass
class LogStep:
    """What a logged step's metrics are about."""

    step: int
    tokens_seen: int
    steps: int  # optimizer steps in the window
    micro_batches: int  # in the window, over all ranks
    seconds: float  # the window's training time (the observers' after_step work excluded)
    world_size: int


@dataclass
class RunInfo:
    """What an observer named in `monitor.observers` is made with."""

    cfg: Any  # the run's TrainConfig
    model: nn.Module  # the model being trained (under DeepSpeed: the engine's module)
    vocab: VocabLayout  # the shards' vocabulary: `vocab.modality_of(ids)` says each id's modality
    device: torch.device
    rank: int
    world_size: int


class Observer:
    # An observer whose state must survive a restart keeps it in the checkpoint's trainer state
    # under this key (the guard's windows and rollbacks); None: nothing to keep.
    state_key: str | None = None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def sums(self) -> dict[str, Sum]:
        return {}

    def step_started(self, step: int, logged: bool) -> None:
        pass

    def micro_batch(self, batch: dict, out, sums: dict[str, torch.Tensor]) -> None:
        pass

    def before_optimizer_step(self) -> None:
        pass

    def step_ended(self, step: int, sums: dict[str, torch.Tensor]) -> bool:
        return False

    def metrics(self, reduced: dict[str, torch.Tensor], log: LogStep) -> dict[str, float]:
        return {}

    def after_step(self, step: int) -> str | None:
        return None

    def close(self) -> None:
        pass


class Window:
    """Every observer's sums since the last logged step, and the training time they span."""

    def __init__(self, observers: list[Observer], device: torch.device, micro_batches_per_step: int):
        self.declared = [observer.sums() for observer in observers]
        self.device, self.micro_batches_per_step = device, micro_batches_per_step
        self.reset()

    def reset(self) -> None:
        def start(d: Sum) -> torch.Tensor:
            return torch.full((d.size,), d.start, dtype=torch.float64, device=self.device)

        self.sums = [{name: start(d) for name, d in declared.items()} for declared in self.declared]
        self.steps, self.started, self.excluded = 0, time.perf_counter(), 0.0

    def exclude(self, seconds: float) -> None:
        """Time spent on other work than training (validation, samples) is not the window's."""
        self.excluded += seconds

    def reduce(self, step: int, tokens_seen: int, world_size: int) -> tuple[list[dict], LogStep]:
        """Each observer's sums over all ranks: one collective for the sums, one for the maxima."""
        reduced = [{} for _ in self.sums]
        for op, kind in ((dist.ReduceOp.SUM, "sum"), (dist.ReduceOp.MAX, "max")):
            of_kind = {(i, name): t for i, (declared, sums) in enumerate(zip(self.declared, self.sums, strict=True))
                       for name, t in sums.items() if declared[name].reduce == kind}  # fmt: skip
            for (i, name), value in (reduce_sums(of_kind, op) if of_kind else {}).items():
                reduced[i][name] = value
        seconds = time.perf_counter() - self.started - self.excluded
        micro_batches = self.steps * self.micro_batches_per_step * world_size
        return reduced, LogStep(step, tokens_seen, self.steps, micro_batches, seconds, world_size)


def reduce_sums(sums: dict, op=dist.ReduceOp.SUM) -> dict:
    """Every tensor of `sums` reduced over the ranks in one collective."""
    flat = torch.cat([v.reshape(-1) for v in sums.values()])
    dist.all_reduce(flat, op=op)
    return dict(zip(sums, flat.split([v.numel() for v in sums.values()]), strict=True))
