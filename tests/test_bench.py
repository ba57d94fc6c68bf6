"""The throughput benchmark runs the real trainer path on the CPU and reports in its contract."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


def test_train_throughput_prints_one_json_line_from_the_trainer(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--preset", "tiny", "--seq-len", "128", "--micro-batch", "4",
         "--micro-steps", "2", "--zero", "2", "--steps", "2", "--log-every", "1", "--profile", str(tmp_path),
         "--", "model.vocab_size=4096"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("{")]
    figures = json.loads(line)
    assert figures["bench"] == "train_throughput" and figures["device"] == "cpu" and figures["monitoring"] is True
    assert figures["global_batch_tokens"] == 4 * 128 * 2 and figures["grad_accum"] == 2 and figures["zero_stage"] == 2
    assert figures["tokens_per_s"] > 0 and 0 < figures["mfu"] < 1 and figures["peak_mem_gb"] > 0
    assert 7 < figures["loss_first"] < 10  # random ids over 4,096: about ln 4096 = 8.3
    assert len(figures["losses"]) == 3 and figures["losses"][0] == pytest.approx(figures["loss_first"], abs=1e-4)
    # One optimizer step traced: both micro-steps' forward and backward, and the optimizer's step.
    (trace,) = tmp_path.glob("*.pt.trace.json")
    names = [event.get("name", "") for event in json.loads(trace.read_text())["traceEvents"]]
    assert sum(name.startswith("ProfilerStep#") for name in names) == 1 and "Optimizer.step#AdamW.step" in names
    assert names.count("aten::scaled_dot_product_attention") == 2 * 2  # micro-steps x blocks
    assert "aten::mm" in (tmp_path / "summary.txt").read_text()  # the matrix products lead the table
    assert figures["host_syncs_in_profiled_step"] == {}  # a CPU has no GPU to wait for


def test_every_peer_comparison_runs_at_toy_size_with_the_systems_doing_the_same_work(demo_data):
    """bench/peers.py in seconds: one line per system of every comparison, a ratio to its peer, and
    the check that the systems did the same work (no timing is asserted)."""
    result = subprocess.run(
        [sys.executable, "bench/peers.py", "--size", "toy", "--rounds", "1", "--demo", demo_data["folder"]],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-6000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # nothing but JSON lines on stdout
    by_system = {(line["comparison"], line["system"]): line for line in lines}
    assert list(by_system) == [
        *(("train_step", s) for s in ("hf", "plain", "fusion_train", "fusion_train+monitors")),
        *(("sharded", s) for s in ("ddp", "zero1", "zero2", "fsdp2", "zero3")),
        *(("loader", s) for s in ("fusion_train/1", "streaming/1", "fusion_train/2", "streaming/2")),
        ("vq_encode", "hf"), ("vq_encode", "fusion_train"), ("vq_decode", "fusion_train"),
    ]  # fmt: skip
    for line in lines:
        assert line["median"] > 0 and line["device"] == "cpu", line
        assert line["peer"] is None or line["ratio_to_peer"] > 0, line
    # The same model, weights, batches and optimizer: the same cross-entropy at every step, on one
    # process and on rank 0 of two, whatever the engine.
    for comparison in ("train_step", "sharded"):
        for (name, _), line in by_system.items():
            if name == comparison:
                assert line["max_ce_difference"] < 1e-4 and 7 < line["ce_last"] < 9, line  # ln 4096 = 8.3
    assert by_system["train_step", "fusion_train+monitors"]["monitor_cost"] is not None
    assert by_system["sharded", "zero3"]["peer"] == "fsdp2" and by_system["sharded", "zero1"]["peer"] == "ddp"
    # Both loaders' packed sequences hold exactly the demo's documents, each once per epoch.
    assert all(line["same_documents_as_shards"] for (name, _), line in by_system.items() if name == "loader")
    assert by_system["vq_encode", "fusion_train"]["same_codes"] is True
