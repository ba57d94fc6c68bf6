"""The router-collapse calibration (docs/experts.md), read from a sweep of the experts model with and
without the load-balancing loss at several learning rates (`+experiment=router_collapse`), every
step logged: the guard's router test replayed on each run's moe/load_max with each setting of a
grid, against what became of the run's routers.

A run's routers collapsed when moe/load_max (the busiest expert's share of its group's routes, over
every block and modality) averages at least COLLAPSED over the run's last 10% of steps: one expert
takes 9 routes in 10, and its group works as one expert. A setting warns a collapsed run when its
test fires in it at all, and false-alarms when it fires in a run whose routers did not collapse
(a fresh router is often lopsided for a few steps, then spreads its tokens out again).
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fusion_train.lab.stability import FINAL_FRACTION, History, ended_points, read_point  # noqa: E402
from fusion_train.monitor.config import GuardConfig  # noqa: E402
from fusion_train.monitor.guard import DivergenceGuard  # noqa: E402

COLLAPSED = 0.9
LOAD_KEY = "moe/load_max"
GRID = {"router_collapse_max": (0.7, 0.8, 0.9, 0.95), "router_collapse_steps": (1, 5, 10, 20, 40)}


class RouterReportError(ValueError):
    pass


def final_load(history: History) -> float:
    steps, load = history.series(LOAD_KEY)
    return float(load[steps >= steps[-1] * (1 - FINAL_FRACTION)].mean())


def first_collapse_warning(history: History, cfg: GuardConfig) -> int | None:
    """The first step at which the guard with `cfg` says router collapse, replayed on the run."""
    guard = DivergenceGuard(cfg)
    for m in history.metrics:
        event = guard.check(m["step"], m["loss/total"], m.get("grad/norm", 0.0), None, m.get(LOAD_KEY))
        if event is not None and event.kind == "router_collapse":
            return m["step"]
    return None


def calibration(histories: list[History], base: GuardConfig) -> list[dict]:
    """For each setting of GRID: of the collapsed runs, how many it warned and at which step at the
    median; of the others, in how many it fired (false alarms)."""
    collapsed = {h.name: final_load(h) >= COLLAPSED for h in histories}
    rows = []
    for values in itertools.product(*GRID.values()):
        cfg = replace(base, **dict(zip(GRID, values, strict=True)))
        warnings = {h.name: first_collapse_warning(h, cfg) for h in histories}
        caught = [step for name, step in warnings.items() if collapsed[name] and step is not None]
        rows.append({**dict(zip(GRID, values, strict=True)), "warned": len(caught), "collapsed": sum(collapsed.values()),
                     "median_step": float(np.median(caught)) if caught else None,
                     "false_alarms": sum(step is not None and not collapsed[name] for name, step in warnings.items())})  # fmt: skip
    return rows


def run_table(histories: list[History]) -> str:
    lines = ["| run | final loss | final moe/load_max | routers |", "|---|---:|---:|---|"]
    for h in histories:
        steps, loss = h.series("loss/total")
        final = loss[steps >= steps[-1] * (1 - FINAL_FRACTION)].mean()
        state = "collapsed" if final_load(h) >= COLLAPSED else "spread"
        lines.append(f"| {h.name} | {final:.3f} | {final_load(h):.2f} | {state} |")
    return "\n".join(lines) + "\n"


def calibration_table(rows: list[dict]) -> str:
    lines = ["| router_collapse_max | router_collapse_steps | collapsed runs warned | median step of the warning "
             "| false alarms |", "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        median = "" if r["median_step"] is None else f"{r['median_step']:.0f}"
        lines.append(f"| {r['router_collapse_max']:g} | {r['router_collapse_steps']} | {r['warned']} of "
                     f"{r['collapsed']} | {median} | {r['false_alarms']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def load_plot(histories: list[History], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for h in histories:
        ax.plot(*h.series(LOAD_KEY), label=h.name, linewidth=1)
    ax.axhline(COLLAPSED, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="step", ylabel=LOAD_KEY, title="the busiest expert's share of its group's routes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_router_report(root: str | Path, out_dir: str | Path | None = None) -> tuple[Path, str]:
    """routers.md (returned) and routers.png in `out_dir` (default ROOT/report)."""
    root = Path(root)
    try:
        points = ended_points(root)
    except FileNotFoundError:
        raise RouterReportError(
            f"{root} is not a sweep's folder: run fusion-train -m +experiment=router_collapse"
        ) from None
    histories = [h for h in map(read_point, points) if h.series(LOAD_KEY)[0].size]
    if not histories:
        raise RouterReportError(f"{root}: no ended run logged {LOAD_KEY} (is it a sweep of a model with experts?)")
    out = Path(out_dir) if out_dir else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    load_plot(histories, out / "routers.png")
    text = run_table(histories) + "\n" + calibration_table(calibration(histories, GuardConfig()))
    (out / "routers.md").write_text(text)
    return out, text
