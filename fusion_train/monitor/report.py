"""`fusion-report RUN_DIR`: one self-contained HTML page (PNG plots inlined, also written beside it)
from the run's `metrics.jsonl` and `alerts.jsonl`, readable offline or attached to a ticket.

Plots, against tokens seen: losses per modality (and validation), each block's output RMS as a heat
map and the last block's as a curve (the paper's divergence predictor), the largest attention
logit per layer, gradient norms, the update-to-weight ratio, the LR, and throughput with MFU.
Guard events are red lines on every plot. After a rollback the abandoned steps are drawn grey and
the run that continued in colour. The samples generated during training (`samples.jsonl`) form a
grid, prompts by steps; pages that `fusion-generate` wrote into the run folder are linked.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from fusion_train.generate.page import as_text, segments_html  # noqa: E402
from fusion_train.monitor.guard import EVENT_KINDS  # noqa: E402
from fusion_train.vocab import Modality  # noqa: E402

GUARD_KEY = re.compile(rf"^guard/({'|'.join(EVENT_KINDS)})$")
BLOCK_KEY = re.compile(r"^norms/block_(\d+)_out$")
QK_KEY = re.compile(r"^attn/qk_logit_max_(\d+)$")
EVAL_SOURCE_KEY = re.compile(r"^eval/(.+)/loss$")
DOWNSTREAM_KEY = re.compile(r"^downstream/(.+)/(?!seconds$)([^/]+)$")  # a task's metric, not its cost
MODALITIES = [m.key for m in Modality]  # the vocabulary's: a panel per modality logged
ABANDONED = "#bbbbbb"
log = logging.getLogger(__name__)


class ReportError(ValueError):
    pass


@dataclass
class Run:
    rows: list[dict]  # training rows as logged, rollbacks included
    kept: list[dict]  # the trajectory the run continued from: the last row logged for each step
    abandoned: list[dict]  # the rows a rollback went back over
    evals: list[dict]
    downstream: list[dict]  # the in-loop tasks' rows (trainer.eval_tasks)
    events: list[tuple[int, float, str]]  # (step, tokens seen, kind)
    alerts: list[dict]
    unreadable_lines: int


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The records, and how many lines could not be read (a killed run can leave half a line)."""
    records, bad = [], 0
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return records, bad


def read_run(run_dir: Path) -> Run:
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise ReportError(f"{metrics_file} does not exist: give the run folder a training run wrote (trainer.run_dir)")
    records, bad = read_jsonl(metrics_file)
    rows = as_run_stands(records, lambda r: "loss/total" in r and "data/tokens_seen" in r)
    if not rows:
        raise ReportError(f"{metrics_file} holds no training steps yet: nothing to plot")
    alerts, bad_alerts = read_jsonl(run_dir / "alerts.jsonl") if (run_dir / "alerts.jsonl").is_file() else ([], 0)
    events = [(r["step"], r["data/tokens_seen"], m[1]) for r in rows for k in r if (m := GUARD_KEY.match(k))]
    kept = kept_trajectory(rows)
    tokens_at = {r["step"]: r["data/tokens_seen"] for r in kept}
    evals = [
        {"data/tokens_seen": tokens_at.get(r["step"]), **r} for r in as_run_stands(records, lambda r: "eval/loss" in r)
    ]
    evals = [r for r in evals if r["data/tokens_seen"] is not None]
    downstream = [
        {"data/tokens_seen": tokens_at.get(r["step"]), **r}
        for r in as_run_stands(records, lambda r: any(DOWNSTREAM_KEY.match(k) for k in r))
        if r["step"] in tokens_at
    ]
    kept_ids = {id(r) for r in kept}
    abandoned = [r for r in rows if id(r) not in kept_ids]
    return Run(rows, kept, abandoned, evals, downstream, events, alerts, bad + bad_alerts)


def as_run_stands(records: list[dict], wanted) -> list[dict]:
    """The `wanted` records as the run stands: an invocation that resumed from step N redid the
    steps after N that its killed predecessor had logged, so those earlier records are dropped
    (they are neither the kept trajectory nor a rollback's abandoned steps)."""
    kept = []
    for record in records:
        if "resumed_from" in record:
            kept = [r for r in kept if r["step"] <= record["step"]]
        elif wanted(record):
            kept.append(record)
    return kept


def kept_trajectory(rows: list[dict]) -> list[dict]:
    """Walking back from the last row: a row whose step is not below the next kept one was rolled back."""
    kept = []
    for row in reversed(rows):
        if not kept or row["step"] < kept[-1]["step"]:
            kept.append(row)
    return kept[::-1]


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["data/tokens_seen"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in points], [p[1] for p in points]


def mark_events(ax, run: Run) -> None:
    """A red line per event; the first of an episode (the same kind on consecutive steps) is named."""
    labelled, previous = set(), None
    for step, tokens, kind in run.events:
        label = None if kind in labelled else f"guard: {kind}"
        ax.axvline(tokens, color="red", linestyle="--", linewidth=1, alpha=0.6, label=label)
        if previous != (kind, step - 1):
            ax.annotate(kind, (tokens, 1.0), xycoords=("data", "axes fraction"), color="red", fontsize=7,
                        rotation=90, ha="right", va="top")  # fmt: skip
        labelled.add(kind)
        previous = (kind, step)


def line_plot(run: Run, keys: list[tuple[str, str]], title: str, ylabel: str, log_y: bool = False):
    """One curve per (key, label); abandoned steps in grey."""
    figure, ax = plt.subplots(figsize=(9, 3.6))
    for key, label in keys:
        x, y = series(run.kept, key)
        if x:
            ax.plot(x, y, label=label, linewidth=1.5)
        gx, gy = series(run.abandoned, key)
        if gx:
            ax.plot(gx, gy, ".", color=ABANDONED, markersize=4)
    if log_y:
        ax.set_yscale("log")
    finish(ax, run, title, ylabel)
    return figure


def finish(ax, run: Run, title: str, ylabel: str) -> None:
    mark_events(ax, run)
    ax.set_title(title)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def indexed_keys(rows: list[dict], pattern: re.Pattern) -> list[str]:
    found = {k for r in rows for k in r if pattern.match(k)}
    return sorted(found, key=lambda k: int(pattern.match(k)[1]))


def losses_plot(run: Run):
    keys = [("loss/total", "total")] + [(f"loss/{m}", m) for m in MODALITIES]
    keys += [(f"loss/video_{m}", f"{m} in videos") for m in MODALITIES] + [("loss/still_image", "still images")]
    figure = line_plot(run, keys, "Training loss by target modality (and in videos)", "cross-entropy (nats)")
    x, y = series(run.evals, "eval/loss")
    if x:
        figure.axes[0].plot(x, y, "o-", color="black", label="validation", markersize=4)
        figure.axes[0].legend(fontsize=8)
    return figure


def held_out_plot(run: Run):
    """Validation loss by target modality (its mix differs from training's, so the total alone
    misleads) and by held-out source (dashed)."""
    if not run.evals:
        return None
    figure, ax = plt.subplots(figsize=(9, 3.6))
    sources = sorted({EVAL_SOURCE_KEY.match(k)[1] for r in run.evals for k in r if EVAL_SOURCE_KEY.match(k)})
    curves = [("eval/loss", "all", "o-")] + [(f"eval/loss_{m}", m, "o-") for m in MODALITIES]
    curves += [(f"eval/{name}/loss", f"source {name}", "s--") for name in sources]
    for key, label, style in curves:
        x, y = series(run.evals, key)
        if x:
            ax.plot(x, y, style, label=label, markersize=4, linewidth=1.2)
    finish(ax, run, "Held-out loss by target modality and by source", "cross-entropy (nats)")
    return figure


def downstream_plot(run: Run):
    """Each in-loop task's metrics (trainer.eval_tasks); accuracies and caption scores share an
    axis as percentages."""
    keys = sorted({k for r in run.downstream for k in r if DOWNSTREAM_KEY.match(k)})
    if not keys:
        return None
    figure, ax = plt.subplots(figsize=(9, 3.6))
    for key in keys:
        task, metric = DOWNSTREAM_KEY.match(key).groups()
        x, y = series(run.downstream, key)
        scale = 100 if metric.startswith("acc") else 1  # caption scores are x100 already
        ax.plot(x, [scale * v for v in y], "o-", label=f"{task} {metric}", markersize=4, linewidth=1.2)
    finish(ax, run, "Downstream tasks during training", "score (%, CIDEr, BLEU-4)")
    return figure


def norm_heatmap(run: Run):
    keys = indexed_keys(run.kept, BLOCK_KEY)
    rows = [r for r in run.kept if all(k in r for k in keys)]
    if not keys or not rows:
        return None
    values = [[r[k] for r in rows] for k in keys]
    figure, ax = plt.subplots(figsize=(9, 3.6))
    mesh = ax.pcolormesh(
        [r["data/tokens_seen"] for r in rows],
        range(len(keys)),
        values,
        shading="nearest",
        cmap="viridis",
        norm=LogNorm(vmin=max(min(min(v) for v in values), 1e-12), vmax=max(max(v) for v in values)),
    )
    figure.colorbar(mesh, ax=ax, label="output RMS")
    ax.set_yticks(range(len(keys)))
    finish(ax, run, "Output RMS of each block (norm growth)", "block")
    return figure


def throughput_plot(run: Run):
    figure = line_plot(run, [("perf/tokens_per_s", "tokens/s")], "Throughput and MFU", "tokens/s")
    x, y = series(run.kept, "perf/mfu")
    if x:
        right = figure.axes[0].twinx()
        right.plot(x, [100 * v for v in y], color="tab:orange", linewidth=1.2, label="MFU")
        right.set_ylabel("MFU (%)", color="tab:orange")
    return figure


def routers_plot(run: Run):
    """None for a run without experts (the guard's event marks alone would draw a panel)."""
    if not series(run.kept, "moe/load_max")[0]:
        return None
    keys = [(f"moe/{m}/load_max", m) for m in ("text", "image", "audio")] + [("moe/load_max", "largest")]
    return line_plot(run, keys, "Router load", "share of routes")


def plots(run: Run) -> list[tuple[str, str, object]]:
    """(file name, caption, figure); plots whose metrics the run did not log are left out."""
    groups = ("embeddings", "attention", "ffn", "norms", "output")
    candidates = [
        ("losses.png", "Losses by target modality; black: validation.", losses_plot(run)),
        (
            "held_out.png",
            "Held-out loss over all sources and by target modality; dashed: each held-out source.",
            held_out_plot(run),
        ),
        (
            "downstream.png",
            "In-loop downstream tasks (trainer.eval_tasks): accuracy in %, CIDEr and BLEU-4 x100.",
            downstream_plot(run),
        ),
        ("norms_heatmap.png", "Each block's output RMS over tokens (log colour scale).", norm_heatmap(run)),
        (
            "final_norm.png",
            "The last block's output RMS: its uncontrolled growth predicts divergence (Chameleon §2.3).",
            line_plot(run, [("norms/final_out", "norms/final_out")], "Last-layer output RMS", "RMS", log_y=True),
        ),
        (
            "qk_logits.png",
            "Largest pre-softmax attention logit per layer (bounded by QK-norm).",
            line_plot(
                run,
                [(k, f"layer {QK_KEY.match(k)[1]}") for k in indexed_keys(run.kept, QK_KEY)],
                "Largest attention logit",
                "q·k/√d",
            ),
        ),
        (
            "grad_norm.png",
            "Global gradient norm (before clipping) and per parameter group.",
            line_plot(
                run,
                [("grad/norm", "global")] + [(f"grad/norm_{g}", g) for g in groups],
                "Gradient norm",
                "L2 norm",
                log_y=True,
            ),
        ),
        (
            "update_ratio.png",
            "Update-to-weight ratio per parameter group.",
            line_plot(run, [(f"optim/update_ratio_{g}", g) for g in groups], "Update / weight", "‖Δw‖/‖w‖", log_y=True),
        ),
        (
            "routers.png",
            "Experts (model.experts): the busiest expert's share of its group's routes, over blocks, per modality "
            "(1/E when balanced; the guard's router-collapse test reads the largest, moe/load_max).",
            routers_plot(run),
        ),
        ("lr.png", "Learning rate.", line_plot(run, [("optim/lr", "lr")], "Learning rate", "lr")),
        ("throughput.png", "Tokens per second (all ranks) and MFU.", throughput_plot(run)),
    ]
    kept = []
    for name, caption, figure in candidates:
        if figure is not None and any(ax.has_data() for ax in figure.axes):
            kept.append((name, caption, figure))
        elif figure is not None:
            plt.close(figure)
    return kept


def summary_rows(run: Run) -> list[tuple[str, str]]:
    last = run.kept[-1]
    rollbacks = sum(later["step"] <= earlier["step"] for earlier, later in itertools.pairwise(run.rows))
    rows = [
        ("last step", str(last["step"])),
        ("tokens seen", f"{last['data/tokens_seen']:,}"),
        ("last loss", f"{last['loss/total']:.4f}"),
        ("steps with guard events", str(len(run.events))),
        ("rollbacks", str(rollbacks)),
    ]
    if "perf/mfu" in last:
        rows.append(("last MFU", f"{100 * last['perf/mfu']:.2f}%"))
    if run.unreadable_lines:
        rows.append(("unreadable lines skipped", str(run.unreadable_lines)))
    return rows


MAX_SAMPLE_STEPS = 8  # columns of the samples grid: evenly spaced steps, the last one always
SAMPLE_THUMBNAIL = 96  # px


def samples_grid(run_dir: Path) -> str:
    """Rows: the prompts; columns: the steps they were generated at (the last record of each)."""
    path = run_dir / "samples.jsonl"
    if not path.is_file():
        return ""
    records, _ = read_jsonl(path)
    by_prompt: dict[int, dict[int, dict]] = {}
    for record in records:
        by_prompt.setdefault(record["index"], {})[record["step"]] = record
    steps = sorted({step for outputs in by_prompt.values() for step in outputs})
    if len(steps) > MAX_SAMPLE_STEPS:
        stride = (len(steps) - 1) / (MAX_SAMPLE_STEPS - 1)
        steps = [steps[round(i * stride)] for i in range(MAX_SAMPLE_STEPS)]
    header = "".join(f"<th>step {step}</th>" for step in steps)
    rows = []
    for _, outputs in sorted(by_prompt.items()):
        first = next(iter(outputs.values()))
        cells = "".join(
            f"<td>{segments_html(outputs[step]['output'], run_dir, SAMPLE_THUMBNAIL)}</td>"
            if step in outputs
            else "<td></td>"
            for step in steps
        )
        rows.append(f"<tr><th>{html.escape(first['mode'])}: {html.escape(as_text(first['prompt']))}</th>{cells}</tr>")
    return (
        "<h2>Samples during training</h2><p>Fixed prompts (eval_samples), generated every trainer.eval_every steps.</p>"
        f'<div style="overflow-x: auto"><table><tr><th>prompt</th>{header}</tr>{"".join(rows)}</table></div>'
    )


def generation_links(run_dir: Path) -> str:
    pages = sorted(run_dir.glob("*/index.html"))
    pages = [p for p in pages if (p.parent / "outputs.jsonl").is_file()]  # fusion-generate's pages
    links = "".join(
        f'<li><a href="../{p.relative_to(run_dir)}">{html.escape(str(p.parent.name))}</a></li>' for p in pages
    )
    return f"<h2>Generations</h2><ul>{links}</ul>" if pages else ""


def render_html(run_dir: Path, run: Run, images: list[tuple[str, str, bytes]]) -> str:
    escape = html.escape
    summary = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in summary_rows(run))
    alerts = "".join(
        f"<tr><td>{a.get('step')}</td><td>{escape(str(a.get('title')))}</td><td>{escape(str(a.get('text')))}</td></tr>"
        for a in run.alerts
    )
    counts = Counter(kind for _, _, kind in run.events)
    alert_table = (
        f"<h2>Guard events</h2><p>{escape(', '.join(f'{kind}: {n} steps' for kind, n in counts.items()))}; "
        "an alert on the first step of each episode:</p>"
        f"<table><tr><th>step</th><th>event</th><th>detail</th></tr>{alerts}</table>"
        if run.events
        else "<p>No guard events.</p>"
    )
    figures = "".join(
        f'<figure><img alt="{escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
        for name, caption, png in images
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fusion_train report: {escape(run_dir.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 960px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; font-size: 14px; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 13px; }}
</style></head><body>
<h1>fusion_train run report</h1>
<p>{escape(str(run_dir.resolve()))}</p>
<table>{summary}</table>
{generation_links(run_dir)}
{figures}
{samples_grid(run_dir)}
{alert_table}
</body></html>
"""


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    run = read_run(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for name, caption, figure in plots(run):
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=100)
        plt.close(figure)
        images.append((name, caption, (out_dir / name).read_bytes()))
    page = out_dir / "index.html"
    page.write_text(render_html(run_dir, run, images))
    if run.unreadable_lines:
        log.warning("skipped %d unreadable line(s) in %s", run.unreadable_lines, run_dir)
    return page
