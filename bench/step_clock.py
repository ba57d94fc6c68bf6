"""An observer for the benchmarks: each optimizer step's wall time, whether it was logged, and its
mean cross-entropy, read from the real training loop through the public `monitor.observers` setting
(`monitor.observers=[step_clock:StepClock]`, with bench/ on PYTHONPATH).

A step's time runs from its start to the next step's start (the last: to the end of training), so
the loop's logging, reductions and observers' work on logged steps fall inside the step that pays
for them, as they do in a real run. The losses stay on the device until training ends: the clock
adds no host sync, so on a GPU only the mean over steps is meaningful, not each step's time."""

from __future__ import annotations

import time

import torch

from fusion_train.monitor.observer import Observer, RunInfo


class StepClock(Observer):
    def __init__(self, run: RunInfo):
        self.starts: list[float] = []
        self.logged: list[bool] = []
        self.ce_sums: list[torch.Tensor | float] = []
        self.micro_batches: list[int] = []
        self.ended: float | None = None

    def step_started(self, step: int, logged: bool) -> None:
        self.starts.append(time.perf_counter())
        self.logged.append(logged)
        self.ce_sums.append(0.0)
        self.micro_batches.append(0)

    def micro_batch(self, batch: dict, out, sums: dict) -> None:
        self.ce_sums[-1] = self.ce_sums[-1] + out.ce.detach().double()  # a device tensor
        self.micro_batches[-1] += 1

    def close(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the last step's work is done, not only queued
        self.ended = time.perf_counter()

    def step_seconds(self) -> list[float]:
        ends = self.starts[1:] + [self.ended]
        return [end - start for start, end in zip(self.starts, ends, strict=True)]

    def mean_ce(self) -> list[float]:
        """Each step's cross-entropy, the mean of its micro-batches' (as a plain loop's `loss / accumulation`)."""
        return [float(total) / count for total, count in zip(self.ce_sums, self.micro_batches, strict=True)]
