"""Throughput figures: achieved TFLOP/s and MFU by torchtitan's convention (model FLOPs per token,
attention and output layer included, against the dense bf16 peak), and peak memory; the observer
that logs them."""

from __future__ import annotations

import resource

import torch

from fusion_train.monitor.observer import LogStep, Observer, Sum


def achieved_tflops(tokens_per_s: float, flops_per_token: int, devices: int) -> float:
    """Per device."""
    return tokens_per_s * flops_per_token / devices / 1e12


def peak_memory_gb(device: torch.device) -> float:
    """The accelerator's peak allocation since the last reset; on a CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class Throughput(Observer):
    """perf/step_time_s, perf/tokens_per_s (all ranks), perf/tflops and perf/mfu (per device, against
    `peak_tflops`), perf/mem_gb (the largest rank's peak since the last log)."""

    def __init__(self, device: torch.device, global_batch_tokens: int, flops_per_token: int, peak_tflops: float):
        self.device, self.global_batch_tokens = device, global_batch_tokens
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops

    def sums(self) -> dict[str, Sum]:
        return {"mem_gb": Sum(reduce="max")}

    def step_ended(self, step: int, sums: dict) -> bool:
        sums["mem_gb"].clamp_(min=peak_memory_gb(self.device))  # a kernel argument: no host sync
        return False

    def metrics(self, reduced: dict, log: LogStep) -> dict:
        tokens_per_s = log.steps * self.global_batch_tokens / log.seconds
        tflops = achieved_tflops(tokens_per_s, self.flops_per_token, log.world_size)
        reset_peak_memory(self.device)
        return {
            "perf/step_time_s": log.seconds / log.steps,
            "perf/tokens_per_s": tokens_per_s,
            "perf/tflops": tflops,
            "perf/mfu": tflops / self.peak_tflops,
            "perf/mem_gb": reduced["mem_gb"].item(),
        }
