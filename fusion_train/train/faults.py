"""Faults injected on purpose, to test the divergence guard end to end (config `faults`, empty in
normal runs). Each fires at most once per process at the steps listed, so that the steps a rollback
repeats run clean, as they would after a real transient fault.

- nan_gradient_at: the last block's output passes its gradient back as NaN (a finite loss).
- loss_spike_at: the step's loss is multiplied by 10 (its gradient too, which clipping bounds).
- norm_blowup_at: the last block's output is scaled by 1000; the final RMSNorm absorbs the scale,
  so the loss barely moves while norms/final_out jumps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from fusion_train.model.loss import LossOutput
from fusion_train.monitor.observer import Observer

BLOWUP_SCALE = 1000.0
SPIKE_SCALE = 10.0


@dataclass
class FaultConfig:
    nan_gradient_at: list[int] = field(default_factory=list)
    loss_spike_at: list[int] = field(default_factory=list)
    norm_blowup_at: list[int] = field(default_factory=list)


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.nan)


class FaultInjector(Observer):
    """Armed as each optimizer step starts, disarmed as it ends; first among the observers, so that
    the monitors' hooks on the same modules see the faulty outputs."""

    def __init__(self, cfg: FaultConfig, last_block: nn.Module, output_layer: nn.Module):
        self.cfg, self.last_block, self.output_layer = cfg, last_block, output_layer
        self.fired: set[tuple[str, int]] = set()
        self.handles = []

    def _fires(self, kind: str, steps: list[int], step: int) -> bool:
        if step not in steps or (kind, step) in self.fired:
            return False
        self.fired.add((kind, step))
        return True

    def step_started(self, step: int, logged: bool) -> None:
        """Arm the faults listed for this (1-based) optimizer step."""
        # prepend: the monitors' hooks on the same block see the faulty output
        if self._fires("nan_gradient", self.cfg.nan_gradient_at, step):
            self._hook(self.last_block, lambda output: _NaNGradient.apply(output))
        if self._fires("norm_blowup", self.cfg.norm_blowup_at, step):
            self._hook(self.last_block, lambda output: output * BLOWUP_SCALE)
        if self._fires("loss_spike", self.cfg.loss_spike_at, step):
            self._hook(self.output_layer, lambda output: LossOutput({**output, "loss": output["loss"] * SPIKE_SCALE}))

    def _hook(self, module: nn.Module, change) -> None:
        self.handles.append(module.register_forward_hook(lambda m, inputs, output: change(output), prepend=True))

    def step_ended(self, step: int, sums: dict) -> bool:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return False
