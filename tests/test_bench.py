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
