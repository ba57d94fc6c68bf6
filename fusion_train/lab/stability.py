"""The stability lab's numbers, read from a sweep's run folders: the final loss of each learning rate
and model variant, the LR sensitivity of each variant (Wortsman et al. 2023, "Small-scale proxies
for large-scale Transformer training instabilities"), and which runs diverged and when.

LR sensitivity: the mean, over the sweep's learning rates, of min(final loss, initial loss) minus
the variant's best final loss. A run that diverges counts as its initial loss; a variant that
trains well at every rate scores near 0.

Divergence: the loss is not finite, or its moving mean over `window` logged steps has risen more
than `rise` nats above its lowest value so far. The moving mean keeps one batch of hard data (a
long prose page among captions) from counting as a divergence.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from fusion_train.lab.sweep import POINT_RECORD, SWEEP_RECORD
from fusion_train.monitor.config import GuardConfig
from fusion_train.monitor.guard import DivergenceGuard, GuardEvent

FINAL_FRACTION = 0.1  # the final loss is the mean of the losses logged in the last 10% of the steps


@dataclass
class History:
    """One sweep point: its variant, learning rate and logged metrics."""

    name: str
    variant: str
    lr: float
    metrics: list[dict]  # the logged training steps, in order

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [m for m in self.metrics if key in m]
        return np.array([m["step"] for m in rows]), np.array([m[key] for m in rows], dtype=np.float64)


def read_point(folder: Path) -> History:
    config = yaml.safe_load((folder / "config.yaml").read_text())
    record = json.loads((folder / POINT_RECORD).read_text())
    variant = next((o.split("=", 1)[1] for o in record["overrides"] if o.lstrip("+").startswith("variant=")), "")
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    metrics = [m for m in map(json.loads, lines) if "loss/total" in m]
    return History(folder.name, variant, float(config["optim"]["lr"]), metrics)


def read_sweep(root: Path) -> list[History]:
    """Every point of the sweep whose run ended, in the sweep's order."""
    points = json.loads((root / SWEEP_RECORD).read_text())["points"]
    return [read_point(root / p["name"]) for p in points if (root / p["name"] / POINT_RECORD).is_file()]


HISTORY_KEYS = ("loss/total", "grad/norm", "norms/final_out", "attn/qk_logit_max", "logits/logZ_mean_text")


def write_histories(histories: list[History], path: Path) -> None:
    """The series the lab's numbers use, one line per run: small enough to keep in a repository."""
    with open(path, "w") as f:
        for h in histories:
            rows = [{"step": m["step"], **{k: float(f"{m[k]:.5g}") for k in HISTORY_KEYS if k in m}} for m in h.metrics]
            f.write(json.dumps({"name": h.name, "variant": h.variant, "lr": h.lr, "metrics": rows}) + "\n")


def read_histories(path: Path) -> list[History]:
    return [History(**json.loads(line)) for line in path.read_text().splitlines()]


def final_loss(history: History) -> float:
    steps, loss = history.series("loss/total")
    tail = loss[steps >= steps[-1] * (1 - FINAL_FRACTION)]
    return float(tail.mean()) if np.isfinite(tail).all() else math.inf


def initial_loss(history: History) -> float:
    return float(history.series("loss/total")[1][0])


def lr_sensitivity(histories: list[History]) -> float:
    """Of one variant's runs at the sweep's learning rates."""
    finals = [min(final_loss(h), initial_loss(h)) for h in histories]
    return float(np.mean(finals) - min(finals))


def divergence_step(history: History, window: int = 10, rise: float = 1.0) -> int | None:
    """The first logged step at which the run counts as diverged, or None."""
    steps, loss = history.series("loss/total")
    for i, (step, value) in enumerate(zip(steps, loss, strict=True)):
        if not math.isfinite(value):
            return int(step)
        if i + 1 >= window:
            means = np.convolve(loss[: i + 1], np.ones(window) / window, mode="valid")
            if means[-1] > means.min() + rise:
                return int(step)
    return None


def replay_guard(history: History, cfg: GuardConfig) -> list[GuardEvent]:
    """What the divergence guard with `cfg` says of the run's logged steps, in order."""
    guard, events = DivergenceGuard(cfg), []
    for m in history.metrics:
        event = guard.check(m["step"], m["loss/total"], m.get("grad/norm", 0.0), m.get("norms/final_out"))
        events += [event] if event else []
    return events


@dataclass
class RunOutcome:
    """A run's divergence, if any, against the guard's first word on it."""

    name: str
    diverged_at: int | None
    first_event: GuardEvent | None

    @property
    def lead_steps(self) -> int | None:
        """Steps from the guard's first event to the divergence (None: no divergence or no event before it)."""
        if self.diverged_at is None or self.first_event is None or self.first_event.step > self.diverged_at:
            return None
        return self.diverged_at - self.first_event.step


def outcomes(histories: list[History], cfg: GuardConfig) -> list[RunOutcome]:
    return [RunOutcome(h.name, divergence_step(h), next(iter(replay_guard(h, cfg)), None)) for h in histories]


def calibration(histories: list[History], candidates: list[GuardConfig]) -> list[dict]:
    """For each guard setting: how many diverging runs it warned before they diverged, its median
    lead in steps, and its alarms in the runs that did not diverge."""
    rows = []
    for cfg in candidates:
        results = outcomes(histories, cfg)
        diverged = [r for r in results if r.diverged_at is not None]
        leads = [r.lead_steps for r in diverged if r.lead_steps is not None]
        rows.append({"guard": cfg, "warned": len(leads), "diverged": len(diverged),
                     "median_lead": float(np.median(leads)) if leads else None,
                     "false_alarms": sum(r.diverged_at is None and r.first_event is not None for r in results)})  # fmt: skip
    return rows
