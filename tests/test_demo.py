"""`make demo`'s script at CI size, from data generation to a fine-tuned model's pictures, twice."""

import json
import os
import re
import subprocess

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def two_demo_runs(tmp_path_factory):
    """launch/demo.sh twice at CI size: (its folder's parent, the second invocation's result)."""
    tmp_path = tmp_path_factory.mktemp("demo_runs")
    env = {**os.environ, "PY": os.sys.executable, "DEMO_DIR": str(tmp_path / "demo"), "DEMO_STEPS": "30",
           "DEMO_SFT_STEPS": "10", "DEMO_IMAGES": "160", "DEMO_VQ_STEPS": "10",
           "DEMO_SOUNDS": "40", "DEMO_AUDIO_STEPS": "5"}  # fmt: skip
    for run, steps, every in (("1", "30", "15"), ("2", "10", "5")):  # the second has to start cleanly and finish
        result = subprocess.run(
            ["bash", "launch/demo.sh"], cwd=REPO, env={**env, "DEMO_STEPS": steps, "DEMO_EVAL_EVERY": every},
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"run folder   {tmp_path / 'demo' / 'runs' / run}" in result.stdout
    return tmp_path, result


def test_demo_trains_and_a_second_run_starts_cleanly(two_demo_runs):
    tmp_path, result = two_demo_runs
    assert re.search(r"held-out     [\d.]+ at step 5, [\d.]+ at step 10\n", result.stdout)
    metrics = [json.loads(line) for line in (tmp_path / "demo/runs/1/metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss/total" in m]
    assert train[-1]["step"] == 30
    assert train[-1]["loss/total"] < train[0]["loss/total"] - 1.0
    assert [m["step"] for m in metrics if "eval/loss" in m] == [15, 30]
    # The held-out pictures' colours and shapes, and their captions, scored during training.
    downstream = [m for m in metrics if "downstream/shapes/acc" in m]
    assert [m["step"] for m in downstream] == [15, 30] and all(0 <= m["downstream/shapes/acc"] <= 1 for m in downstream)
    assert (
        all("downstream/captions/cider" in m for m in downstream) and "downstream   step 5: shapes/acc" in result.stdout
    )
    assert list((tmp_path / "demo/runs/1/wandb").glob("offline-run-*/run-*.wandb"))
    report = tmp_path / "demo/runs/2/report/index.html"
    assert f"report       {report}" in result.stdout and report.stat().st_size > 10_000
    assert "Samples during training" in report.read_text()
    # The fine-tuned model drew the six held-out instructions, answered three questions, played the
    # four held-out requests for sounds and described four held-out sounds.
    generations = tmp_path / "demo/runs/2/sft/generations"
    assert f"generations  {generations / 'index.html'}" in result.stdout
    outputs = [json.loads(line) for line in (generations / "outputs.jsonl").read_text().splitlines()]
    assert [o["mode"] for o in outputs] == ["image"] * 6 + ["text"] * 3 + ["audio"] * 4 + ["text"] * 4
    page = (generations / "index.html").read_text()
    assert len(list((generations / "images").glob("*.png"))) == 6 and "<img " in page
    assert len(list((generations / "sounds").glob("*.wav"))) == 4 and page.count("<audio ") == 8
    assert re.search(r"colour check \d/6 held-out drawings show the colour asked for", result.stdout)
    assert re.search(
        r"sound check  \d/4 held-out requests play the notes asked for .*; \d/4 held-out sounds", result.stdout
    )
    for chats, held_out in (("image_generation", outputs[:6]), ("sound", outputs[9:13])):
        said = {
            json.dumps(json.loads(line)["messages"][0]["content"])
            for line in (tmp_path / "demo/sft" / f"{chats}.jsonl").open()
        }
        assert not said & {
            json.dumps(o["prompt"][0]) for o in held_out
        }  # held-out instructions are not in the SFT data
    sft_report = (tmp_path / "demo/runs/2/sft/report/index.html").read_text()
    assert 'href="../generations/index.html"' in sft_report and "Samples during training" in sft_report


def test_the_demo_loses_what_it_lost_when_its_data_last_changed(two_demo_runs):
    """The same losses at every logged step, pretraining and SFT, as the demo gave at CI size when
    its data last changed (tests/data/demo_losses.json says when: first before the loop became
    observers, then when sound joined); a change that means to move them writes the file anew from
    a run of it, any other must leave them."""
    tmp_path, _ = two_demo_runs
    expected = json.loads((REPO / "tests" / "data" / "demo_losses.json").read_text())
    for stage, run in (("pretrain", "demo/runs/1"), ("sft", "demo/runs/1/sft")):
        metrics = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for key, by_step in expected[stage].items():
            logged = {str(m["step"]): m[key] for m in metrics if key in m}
            assert logged == pytest.approx(by_step, rel=1e-6), (stage, key)
