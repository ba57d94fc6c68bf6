"""`fusion-report --sweep DIR`: the stability lab's page, from a sweep's run folders.

Plots: the final loss against the learning rate per variant (the LR-sensitivity curve), the largest
attention logit without and with QK-norm, the output logits' log Z without and with z-loss, and the
last block's output RMS per variant; each run's guard events are red crosses on its curves. Tables:
the LR sensitivity of each variant; for each run its final loss, what became of it (diverged,
degraded, healthy: `fusion_train.lab.stability`), the guard's first event and its lead time before
a divergence; and the guard calibration, the guard replayed on every run with each setting of
`CALIBRATION_GRID` around the sweep's own. The tables are also written as markdown (`tables.md`),
for documents, and the series behind them as `histories.jsonl`, a line per run.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fusion_train.lab.stability import (  # noqa: E402
    ATTENTION_LOGIT_LIMIT,
    CALIBRATION_GRID,
    History,
    calibration,
    candidate_guards,
    divergence_step,
    ended_points,
    final_loss,
    first_step_above,
    guard_config,
    initial_loss,
    lr_sensitivity,
    outcomes,
    read_point,
    write_histories,
)
from fusion_train.monitor.config import GuardConfig  # noqa: E402
from fusion_train.monitor.report import GUARD_KEY  # noqa: E402


class SweepReportError(ValueError):
    pass


def by_variant(histories: list[History]) -> dict[str, list[History]]:
    variants: dict[str, list[History]] = {}
    for h in sorted(histories, key=lambda h: h.lr):
        variants.setdefault(h.variant, []).append(h)
    return variants


def guard_events(history: History) -> list[tuple[int, str]]:
    """What the run's own guard said: (step, kind) for each logged event."""
    return [(m["step"], GUARD_KEY.match(k)[1]) for m in history.metrics for k in m if GUARD_KEY.match(k)]


def sensitivity_plot(variants: dict[str, list[History]]):
    figure, ax = plt.subplots(figsize=(9, 4))
    for variant, runs in variants.items():
        finals = [min(final_loss(h), initial_loss(h)) for h in runs]
        label = f"{variant} (LR sensitivity {lr_sensitivity(runs):.2f})"
        ax.plot([h.lr for h in runs], finals, "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final loss (capped at the initial loss)")
    ax.set_title("Final loss against the learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def curves_plot(variants: dict[str, list[History]], names: list[str], key: str, title: str, log_y: bool = True):
    """One panel per variant in `names` (those the sweep has), a curve per learning rate."""
    shown = [n for n in names if n in variants]
    figure, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.6), sharey=True, squeeze=False)
    for ax, variant in zip(axes[0], shown, strict=True):
        for h in variants[variant]:
            steps, values = h.series(key)
            (line,) = ax.plot(steps, values, linewidth=1.2, label=f"lr {h.lr:g}")
            events = dict(guard_events(h))
            marked = [(s, v) for s, v in zip(steps, values, strict=True) if s in events]
            if marked:
                ax.plot(*zip(*marked, strict=True), "x", color="red", markersize=5)
            if divergence_step(h) is not None:
                ax.axvline(divergence_step(h), color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_title(variant)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if log_y:
            ax.set_yscale("log")
    axes[0][0].set_ylabel(key)
    axes[0][-1].legend(fontsize=7)
    figure.suptitle(f"{title} (red x: guard events; dotted: divergence)", fontsize=10)
    return figure


def run_rows(histories: list[History]) -> list[dict]:
    first_events = {h.name: next(iter(guard_events(h)), None) for h in histories}
    rows = []
    for h, outcome in zip(histories, outcomes(histories, first_events), strict=True):
        event = outcome.first_event
        attention = first_step_above(h, "attn/qk_logit_max", ATTENTION_LOGIT_LIMIT)
        rows.append({
            "run": h.name, "final loss": f"{final_loss(h):.3f}",
            "outcome": outcome.status + (f" at {outcome.diverged_at}" if outcome.diverged_at is not None else ""),
            "first guard event": f"{event[1]} at {event[0]}" if event else "",
            "lead (steps)": "" if outcome.lead_steps is None else str(outcome.lead_steps),
            f"attention logit > {ATTENTION_LOGIT_LIMIT:g} at": str(attention or ""),
            "guard events": str(len(guard_events(h))),
        })  # fmt: skip
    return rows


def calibration_rows(histories: list[History], base: GuardConfig) -> list[dict]:
    rows = []
    for row in calibration(histories, candidate_guards(base)):
        settings = ", ".join(f"{k} {getattr(row['guard'], k):g}" for k in CALIBRATION_GRID)
        leads = "" if row["least_lead"] is None else f"{row['least_lead']} / {row['median_lead']:g}"
        rows.append({
            "guard": settings, "diverged runs warned": f"{row['warned']}/{row['diverged']}",
            "least / median lead (steps)": leads,
            "degraded runs warned": f"{row['degraded_warned']}/{row['degraded']}",
            "healthy runs alarmed": str(row["false_alarms"]),
        })  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r.values()) + " |" for r in rows]) + "\n"


def table(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_sweep_report(root: str | Path, out_dir: str | Path | None = None) -> Path:
    root = Path(root)
    if not (root / "sweep.json").is_file():
        raise SweepReportError(f"{root} is not a sweep folder (no sweep.json): give the folder `fusion-train -m` wrote")
    folders = ended_points(root)
    histories = [read_point(folder) for folder in folders]
    if not histories:
        raise SweepReportError(f"no point of the sweep in {root} has ended yet")
    out_dir = Path(out_dir) if out_dir else root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = by_variant(histories)
    plots = [
        ("lr_sensitivity.png", sensitivity_plot(variants)),
        ("qk_logits.png", curves_plot(variants, ["plain", "qk_norm"], "attn/qk_logit_max", "Largest attention logit")),
        ("log_z.png", curves_plot(variants, ["plain", "z_loss"], "logits/logZ_mean_text", "Output log Z (text)", False)),
        ("final_norms.png", curves_plot(variants, list(variants), "norms/final_out", "Last block's output RMS")),
    ]  # fmt: skip
    figures = ""
    for name, figure in plots:
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=100)
        plt.close(figure)
        data = base64.b64encode((out_dir / name).read_bytes()).decode()
        figures += f'<figure><img alt="{name}" src="data:image/png;base64,{data}"></figure>'
    status = {o.name: o.status for o in outcomes(histories, dict.fromkeys(h.name for h in histories))}
    sensitivity = [{"variant": v, "LR sensitivity": f"{lr_sensitivity(runs):.3f}",
                    "best final loss": f"{min(final_loss(h) for h in runs):.3f}",
                    "diverged runs": str(sum(status[h.name] == "diverged" for h in runs)),
                    "degraded runs": str(sum(status[h.name] == "degraded" for h in runs))}
                   for v, runs in variants.items()]  # fmt: skip
    runs, guards = run_rows(histories), calibration_rows(histories, guard_config(folders[0]))
    (out_dir / "tables.md").write_text(f"{markdown(sensitivity)}\n{markdown(runs)}\n{markdown(guards)}")
    write_histories(histories, out_dir / "histories.jsonl")
    page = out_dir / "index.html"
    page.write_text(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fusion_train sweep: {html.escape(root.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; font-size: 14px; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>fusion_train sweep report</h1>
<p>{html.escape(str(root.resolve()))}: {len(histories)} runs</p>
{table(sensitivity)}
{figures}
<h2>Runs</h2>
{table(runs)}
<h2>Guard calibration</h2>
<p>The guard replayed on every run, with the sweep's settings but these (exact when every step was logged).</p>
{table(guards)}
</body></html>
""")
    return page
