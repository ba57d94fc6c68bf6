"""What every comparison of `bench/peers.py` shares: running one measurement in a fresh process,
alternating the systems round by round (so that a drift in the machine's speed hits all of them
alike), and the summary line of each system: the median of its runs and its ratio to the peer's."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


class MeasurementFailed(RuntimeError):
    pass


def environment(**extra: str) -> dict[str, str]:
    """The benchmark's processes: bench/ and the repository importable, DeepSpeed on its CPU
    accelerator when there is no GPU, W&B offline."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH), str(REPO), os.environ.get("PYTHONPATH", "")])}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("WANDB_MODE", "offline")
    return {**env, **extra}


def run_json(command: list[str], timeout: float = 3600, **env: str) -> dict:
    """Run `command` in a fresh process; its last stdout line that is a JSON object."""
    result = subprocess.run(command, cwd=REPO, env=environment(**env), capture_output=True, text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise MeasurementFailed(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def alternate(systems: tuple[str, ...], measure: Callable[[str], dict], rounds: int) -> dict[str, list[dict]]:
    """Every system measured once per round, the order reversed every other round: what running
    after another system costs (the memory it left, a warmer or cooler machine) falls on each alike."""
    records: dict[str, list[dict]] = {system: [] for system in systems}
    for round_ in range(rounds):
        for system in systems if round_ % 2 == 0 else reversed(systems):
            records[system].append(measure(system))
            print(json.dumps({"run": records[system][-1]}), file=sys.stderr, flush=True)
    return records


def summary(comparison: str, system: str, peer: str, unit: str, figures: dict[str, list[float]], **more) -> dict:
    """One system's line: the median of its runs (higher is better) and its ratio to the peer's median."""
    median = statistics.median(figures[system])
    return {
        "comparison": comparison, "system": system, "peer": peer, "unit": unit, "median": round(median, 2),
        "runs": [round(value, 2) for value in figures[system]],
        "ratio_to_peer": round(median / statistics.median(figures[peer]), 3),
        **more, "device": device_name(), "date": datetime.date.today().isoformat(),
    }  # fmt: skip


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
