"""Throughput figures: achieved TFLOP/s and MFU by torchtitan's convention (model FLOPs per token,
attention and output layer included, against the dense bf16 peak), and peak memory."""

from __future__ import annotations

import resource

import torch


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
