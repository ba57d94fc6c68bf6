"""The stability lab's numbers, read from a sweep's run folders: the final loss of each learning rate
and model variant, the LR sensitivity of each variant (Wortsman et al. 2023, "Small-scale proxies
for large-scale Transformer training instabilities"), what became of each run, and how the
divergence guard would have called it.

LR sensitivity: the mean, over the sweep's learning rates, of min(final loss, initial loss) minus
the variant's best final loss. A run that diverges counts as its initial loss; a variant that
trains well at every rate scores near 0.

What became of a run:
- diverged: its loss was not finite, or its mean over 10 logged steps was more than 0.5 nats above
  the initial loss: clearly worse, for a while, than a model that has learnt nothing. One batch above
  it is a spike, not a divergence: it happens on one hard batch in runs that then go on training;
- degraded: it did not diverge, but at a learning rate above its variant's best it ended more than
  `DEGRADED_NATS` above the variant's best final loss (Wortsman's instability: ruined, not blown up);
- healthy: the rest, including the slow runs at low learning rates. A guard event here is a false alarm.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from fusion_train.lab.sweep import POINT_RECORD, SWEEP_RECORD
from fusion_train.monitor.config import GuardConfig
from fusion_train.monitor.guard import DivergenceGuard, GuardEvent

FINAL_FRACTION = 0.1  # the final loss is the mean of the losses logged in the last 10% of the steps
DEGRADED_NATS = 1.0
DIVERGENCE_WINDOW = 10
DIVERGENCE_MARGIN = 0.5  # nats: the first steps' losses scatter around the initial one


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


def ended_points(root: Path) -> list[Path]:
    """The run folders of the sweep's points that ended, in the sweep's order."""
    points = json.loads((root / SWEEP_RECORD).read_text())["points"]
    return [root / p["name"] for p in points if (root / p["name"] / POINT_RECORD).is_file()]


def read_sweep(root: Path) -> list[History]:
    return [read_point(folder) for folder in ended_points(root)]


def guard_config(folder: Path) -> GuardConfig:
    """The guard a run was configured with."""
    return GuardConfig(**yaml.safe_load((folder / "config.yaml").read_text())["monitor"]["guard"])


HISTORY_KEYS = ("loss/total", "grad/norm", "norms/final_out", "attn/qk_logit_max")  # what the numbers use


def write_histories(histories: list[History], path: Path, keys: tuple[str, ...] = HISTORY_KEYS) -> None:
    """The series the lab's numbers use (`keys`), one line per run, a column per key (null where a
    step lacks it), to 5 significant digits: small enough to keep in a repository."""
    with open(path, "w") as f:
        for h in histories:
            columns = {"step": [m["step"] for m in h.metrics]}
            columns |= {k: [float(f"{m[k]:.5g}") if k in m else None for m in h.metrics] for k in keys}
            f.write(json.dumps({"name": h.name, "variant": h.variant, "lr": h.lr, "columns": columns}) + "\n")


def read_histories(path: Path) -> list[History]:
    histories = []
    for line in path.read_text().splitlines():
        run = json.loads(line)
        columns = run.pop("columns")
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        histories.append(History(**run, metrics=[{k: v for k, v in r.items() if v is not None} for r in rows]))
    return histories


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


def divergence_step(history: History) -> int | None:
    """The first logged step at which the loss is not finite, or its mean over the last
    DIVERGENCE_WINDOW logged steps is more than DIVERGENCE_MARGIN above the initial loss, or None."""
    steps, loss = history.series("loss/total")
    sums = np.cumsum(loss)
    window_sums = sums - np.concatenate([np.zeros(DIVERGENCE_WINDOW), sums[:-DIVERGENCE_WINDOW]])[: len(sums)]
    trailing_mean = window_sums / np.minimum(np.arange(1, len(loss) + 1), DIVERGENCE_WINDOW)
    bad = ~np.isfinite(loss) | (trailing_mean > loss[0] + DIVERGENCE_MARGIN)
    return int(steps[bad.argmax()]) if bad.any() else None


ATTENTION_LOGIT_LIMIT = 100.0  # Kimi K2's QK-Clip cap (arXiv 2507.20534): past it, softmax is one-hot


def first_step_above(history: History, key: str, limit: float) -> int | None:
    steps, values = history.series(key)
    above = values > limit
    return int(steps[above.argmax()]) if above.any() else None


def replay_guard(history: History, cfg: GuardConfig) -> list[GuardEvent]:
    """What the divergence guard with `cfg` says of the run's logged steps, in order: the guard that
    ran when every step was logged."""
    guard, events = DivergenceGuard(cfg), []
    for m in history.metrics:
        event = guard.check(m["step"], m["loss/total"], m.get("grad/norm", 0.0), m.get("norms/final_out"),
                            m.get("moe/load_max"))  # fmt: skip
        events += [event] if event else []
    return events


@dataclass
class RunOutcome:
    """What became of a run, against the guard's first word on it."""

    name: str
    status: str  # diverged | degraded | healthy
    diverged_at: int | None
    first_event: tuple[int, str] | None  # the guard's (step, kind)

    @property
    def lead_steps(self) -> int | None:
        """Steps from the guard's first event to the divergence (None: no divergence or no event before it)."""
        if self.diverged_at is None or self.first_event is None or self.first_event[0] >= self.diverged_at:
            return None
        return self.diverged_at - self.first_event[0]


def outcomes(histories: list[History], first_events: dict[str, tuple[int, str] | None]) -> list[RunOutcome]:
    """Each run's outcome; `first_events`: the guard's first (step, kind) in each run, by name."""
    best: dict[str, History] = {}
    for h in histories:
        if h.variant not in best or final_loss(h) < final_loss(best[h.variant]):
            best[h.variant] = h
    results = []
    for h in histories:
        diverged_at, top = divergence_step(h), best[h.variant]
        degraded = h.lr > top.lr and final_loss(h) > final_loss(top) + DEGRADED_NATS
        status = "diverged" if diverged_at is not None else "degraded" if degraded else "healthy"
        results.append(RunOutcome(h.name, status, diverged_at, first_events[h.name]))
    return results


def replayed_outcomes(histories: list[History], cfg: GuardConfig) -> list[RunOutcome]:
    first = {h.name: next(((e.step, e.kind) for e in replay_guard(h, cfg)), None) for h in histories}
    return outcomes(histories, first)


CALIBRATION_GRID = {
    "norm_jump_max": (10.0, 20.0, 30.0, 100.0, 300.0),
    "spike_zscore": (6.0, 7.0, 8.0, 10.0),
}


def candidate_guards(base: GuardConfig) -> list[GuardConfig]:
    """`base` with each combination of CALIBRATION_GRID's values."""
    keys = list(CALIBRATION_GRID)
    return [
        replace(base, **dict(zip(keys, values, strict=True)))
        for values in itertools.product(*CALIBRATION_GRID.values())
    ]


def calibration(histories: list[History], candidates: list[GuardConfig]) -> list[dict]:
    """For each guard setting: of the diverged runs, how many it warned before the divergence and
    its least and median lead in steps; of the degraded runs, how many it warned at all; and how many
    healthy runs it alarmed in (false alarms)."""
    rows = []
    for cfg in candidates:
        results = replayed_outcomes(histories, cfg)
        diverged = [r for r in results if r.status == "diverged"]
        degraded = [r for r in results if r.status == "degraded"]
        leads = [r.lead_steps for r in diverged if r.lead_steps is not None]
        rows.append({"guard": cfg, "warned": len(leads), "diverged": len(diverged),
                     "least_lead": min(leads, default=None),
                     "median_lead": float(np.median(leads)) if leads else None,
                     "degraded_warned": sum(r.first_event is not None for r in degraded), "degraded": len(degraded),
                     "false_alarms": sum(r.status == "healthy" and r.first_event is not None for r in results)})  # fmt: skip
    return rows
