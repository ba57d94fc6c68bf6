"""Learning-rate schedules as multipliers of the peak rate, for torch's LambdaLR.

- warmup_exponential (Chameleon pretraining, §2.3): linear warm-up, then exponential decay toward
  0, reaching `final_lr_ratio` of the peak at the last step.
- warmup_cosine (Chameleon SFT, §3): linear warm-up, then cosine from the peak to 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps


def warmup_exponential(warmup_steps: int, total_steps: int, final_lr_ratio: float) -> Callable[[int], float]:
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_lr_ratio ** min(progress, 1.0)

    return multiplier


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return multiplier


def build_schedule(name: str, warmup_steps: int, total_steps: int, final_lr_ratio: float) -> Callable[[int], float]:
    if name == "warmup_exponential":
        return warmup_exponential(warmup_steps, total_steps, final_lr_ratio)
    return warmup_cosine(warmup_steps, total_steps)
