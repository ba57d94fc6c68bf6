"""Monitoring end to end, on real runs of the trainer: faults injected at chosen steps are caught at
those steps and rolled back, the skipped data stays skipped after a resume, the stop actions exit
non-zero with the right checkpoint left, and `fusion-report` renders in headless Chromium."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from wandb_records import records

from conftest import REPO, WANDB, colour_fraction, read_metrics, screenshot, torchrun, train_overrides
from fusion_train.monitor.report import kept_trajectory, read_run, summary_rows

FAULT_STEPS = {"nonfinite": 12, "loss_spike": 24, "norm_jump": 33}
CHECKPOINT_EVERY = 5
GUARD = [
    "monitor.guard.min_history=5", "monitor.guard.spike_window=10", "monitor.guard.norm_window=10",
    "monitor.guard.norm_growth_max=10", "monitor.guard.norm_start_step=15",
]  # fmt: skip
SECRET = "0123456789abcdef0123456789abcdef01234567"  # shaped like a W&B API key; must be written nowhere
MICRO_STEPS = 4  # train_overrides on one process: 2,048 tokens per step of 4 x 128-token sequences


def train(demo_data, run_dir, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """One process, no torchrun: the trainer sets up its own single-rank process group."""
    return subprocess.run(
        [sys.executable, "-m", "fusion_train.train", *train_overrides(demo_data, run_dir, *extra)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def training_rows(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss/total" in r]


def events(rows: list[dict]) -> list[tuple[int, str]]:
    return [(r["step"], k.split("/")[1]) for r in rows for k in r if k.startswith("guard/") and k != "guard/rollbacks"]


@pytest.fixture(scope="module")
def guarded_run(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("guarded") / "run"
    faults = [
        f"faults.nan_gradient_at=[{FAULT_STEPS['nonfinite']}]",
        f"faults.loss_spike_at=[{FAULT_STEPS['loss_spike']}]",
        f"faults.norm_blowup_at=[{FAULT_STEPS['norm_jump']}]",
    ]
    result = train(
        demo_data, run, "trainer.steps=40", f"trainer.checkpoint_every={CHECKPOINT_EVERY}", "trainer.keep_every=10",
        WANDB, "logging.tensorboard=true", "monitor.guard.action=rollback", "monitor.guard.rollback_lr_factor=0.5",
        "monitor.guard.rollback_lr_steps=3", *GUARD, *faults,
        env={**os.environ, "WANDB_API_KEY": SECRET},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-6000:]
    return run


def test_each_injected_fault_is_caught_at_its_step_and_rolled_back(guarded_run):
    rows = training_rows(guarded_run)
    assert events(rows) == [(step, kind) for kind, step in FAULT_STEPS.items()]
    # After each event the run went on from the checkpoint before it, with the LR halved for 3 steps.
    first_lr = {r["step"]: r["optim/lr"] for r in rows[: FAULT_STEPS["nonfinite"]]}
    for kind, step in FAULT_STEPS.items():
        at = next(i for i, r in enumerate(rows) if r["step"] == step and f"guard/{kind}" in r)
        restored = step - step % CHECKPOINT_EVERY
        assert rows[at + 1]["step"] == restored + 1
        if kind == "nonfinite":
            assert rows[at + 1]["optim/lr"] == pytest.approx(first_lr[restored + 1] / 2)
            assert rows[at + 4]["optim/lr"] > 1.5 * rows[at + 3]["optim/lr"]  # back to the schedule
    state = json.loads((guarded_run / "checkpoints" / "step_40" / "trainer_state.json").read_text())
    assert state["step"] == 40 and state["guard"]["rollbacks"] == [
        {"event": kind, "detected_at": step, "to_step": step - step % 5, "skipped_batches": step % 5 * MICRO_STEPS}
        for kind, step in FAULT_STEPS.items()
    ]
    kept = kept_trajectory(rows)
    assert [r["step"] for r in kept] == list(range(1, 41))
    assert all(math.isfinite(r["loss/total"]) for r in kept) and kept[-1]["loss/total"] < kept[0]["loss/total"] - 1
    # The data of the abandoned steps was never trained on again.
    abandoned = [r for r in rows if r not in kept]
    assert len(abandoned) == sum(step % 5 for step in FAULT_STEPS.values())
    assert not {r["data/checksum"] for r in abandoned} & {r["data/checksum"] for r in kept}


def test_guard_events_are_alerted_to_every_logger_and_the_api_key_is_written_nowhere(guarded_run):
    alerts = [json.loads(line) for line in (guarded_run / "alerts.jsonl").read_text().splitlines()]
    assert [(a["step"], a["title"].split()[0]) for a in alerts] == [(s, k) for k, s in FAULT_STEPS.items()]
    (run_file,) = guarded_run.glob("wandb/offline-run-*/run-*.wandb")
    wandb_alerts = [r.alert for r in records(run_file) if r.WhichOneof("record_type") == "alert"]
    assert [a.title for a in wandb_alerts] == [a["title"] for a in alerts]
    assert all(a.level == "WARN" and "action: rollback" in a.text for a in wandb_alerts)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(guarded_run / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("guard/loss_spike")] == [FAULT_STEPS["loss_spike"]]
    assert len(board.Scalars("norms/final_out")) == len(training_rows(guarded_run))

    for path in guarded_run.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_skipped_data_stays_skipped_after_a_resume(guarded_run, demo_data, tmp_path):
    """Resuming from the checkpoint the loss-spike rollback rewrote replays the steps the run took
    after the rollback, not the skipped ones."""
    spike = FAULT_STEPS["loss_spike"]
    restored = guarded_run / "checkpoints" / f"step_{spike - spike % 5}"
    result = train(
        demo_data, tmp_path / "resumed", f"trainer.resume_from={restored}", f"trainer.steps={spike}",
        "logging.wandb=false", *GUARD,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-6000:]
    resumed = {r["step"]: r["data/checksum"] for r in training_rows(tmp_path / "resumed")}
    assert sorted(resumed) == list(range(spike - spike % 5 + 1, spike + 1))
    rows = training_rows(guarded_run)
    kept = {r["step"]: r["data/checksum"] for r in kept_trajectory(rows)}
    assert resumed == {step: kept[step] for step in resumed}
    skipped = {r["data/checksum"] for r in rows if r["step"] in resumed} - set(kept.values())
    assert len(skipped) == spike % 5 and not skipped & set(resumed.values())


@pytest.mark.parametrize(
    "action, fault, checkpoint_left, message",
    [
        (["monitor.guard.action=stop"], "loss_spike_at", "step_8", "Checkpoint .*step_8 written"),
        (["monitor.guard.action=stop"], "nan_gradient_at", "step_5", "step_5 left as the last good checkpoint"),
        (
            ["monitor.guard.action=rollback", "monitor.guard.max_rollbacks=0"],
            "loss_spike_at",
            "step_5",
            "the run looks hopeless",
        ),
    ],
    ids=["stop-spike", "stop-nonfinite", "rollback-limit"],
)
def test_stopping_exits_3_and_leaves_a_good_checkpoint(demo_data, tmp_path, action, fault, checkpoint_left, message):
    run = tmp_path / "run"
    result = train(
        demo_data, run, "trainer.steps=12", "trainer.checkpoint_every=5", "logging.wandb=false", *GUARD, *action,
        f"faults.{fault}=[8]",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr[-4000:]
    assert "divergence guard stops the run" in result.stderr
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*"))[-1] == checkpoint_left
    assert training_rows(run)[-1]["step"] == 8


def test_warn_alerts_and_changes_nothing_else(demo_data, tmp_path):
    """An event on a checkpoint step, the last one: the run still validates, saves and ends normally."""
    run = tmp_path / "run"
    held_out = [
        "eval_data=demo", f"eval_data.sources.held_out.path={demo_data['shards']['held_out']}", "eval_data.seq_len=128",
        "trainer.eval_every=10", "trainer.eval_batches=1",
    ]  # fmt: skip
    result = train(
        demo_data, run, "trainer.steps=10", "trainer.checkpoint_every=5", "logging.wandb=false", *GUARD, *held_out,
        "monitor.guard.action=warn", "faults.loss_spike_at=[10]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert events(training_rows(run)) == [(10, "loss_spike")] and "action: warn" in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_10", "step_5"]
    assert [m["step"] for m in read_metrics(run) if "eval/loss" in m] == [10]


def test_two_ranks_under_zero3_decide_and_roll_back_together(demo_data, tmp_path):
    """Every rank sees the same all-reduced values, takes the same decision and reloads the same
    partitioned checkpoint; a rank that disagreed would hang the next collective."""
    run = tmp_path / "run"
    overrides = train_overrides(
        demo_data, run, "deepspeed=zero3", "trainer.steps=12", "trainer.checkpoint_every=5", "logging.wandb=false",
        "monitor.guard.action=rollback", *GUARD, "faults.loss_spike_at=[8]", "faults.nan_gradient_at=[11]",
    )  # fmt: skip
    torchrun("-m fusion_train.train", *overrides, timeout=240)
    rows = training_rows(run)
    assert events(rows) == [(8, "loss_spike"), (11, "nonfinite")]
    kept = kept_trajectory(rows)
    assert [r["step"] for r in kept] == list(range(1, 13)) and all(math.isfinite(r["loss/total"]) for r in kept)
    assert [r["step"] for r in rows].count(6) == 2 and [r["step"] for r in rows].count(11) == 2


def test_report_renders_in_a_headless_browser(guarded_run, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "fusion_train.commands.report", str(guarded_run), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {
        "losses.png", "norms_heatmap.png", "final_norm.png", "qk_logits.png", "grad_norm.png",
        "update_ratio.png", "lr.png", "throughput.png",
    }  # fmt: skip
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(pngs)  # self-contained
    assert "http" not in page.replace("https://", "").split("<body>")[0] and "loss_spike at step 24" in page

    pixels = screenshot(out / "index.html", tmp_path / "screenshot.png", width=1000)
    assert pixels.shape[:2] == (2400, 1000)
    assert colour_fraction(pixels, (255, 255, 255), 3) < 0.9  # not a blank page
    assert colour_fraction(pixels, (31, 119, 180)) > 5e-4  # matplotlib's first line colour: curves drawn
    assert colour_fraction(pixels, (253, 231, 37), 40) + colour_fraction(pixels, (68, 1, 84), 40) > 5e-3  # heat map
    assert colour_fraction(pixels, (255, 0, 0), 40) > 2e-4  # guard events marked


def test_report_names_a_folder_without_metrics(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fusion_train.commands.report", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "metrics.jsonl does not exist" in result.stderr


def test_the_report_takes_the_steps_a_resume_redid_once_and_not_as_a_rollback(tmp_path):
    def row(step, loss):
        return {"step": step, "loss/total": loss, "data/tokens_seen": 100 * step}

    records = [
        {"step": 0, "resumed_from": None, "time": 0.0}, *(row(s, 1.0) for s in range(1, 7)),
        {"step": 4, "resumed_from": "checkpoints/step_4", "time": 1.0}, *(row(s, 2.0) for s in range(5, 9)),
        row(6, 3.0),  # a rollback from step 8 to step 5
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = read_run(tmp_path)
    assert [(r["step"], r["loss/total"]) for r in run.kept] == [
        (1, 1.0),
        (2, 1.0),
        (3, 1.0),
        (4, 1.0),
        (5, 2.0),
        (6, 3.0),
    ]
    assert [r["step"] for r in run.abandoned] == [6, 7, 8]  # the rollback's, not the resume's
    assert dict(summary_rows(run))["rollbacks"] == "1"
