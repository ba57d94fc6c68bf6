"""The throughput benchmark runs the real trainer path on the CPU and reports in its contract."""

import json
import subprocess
import sys

from conftest import REPO


def test_train_throughput_prints_one_json_line_from_the_trainer():
    result = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--preset", "tiny", "--seq-len", "128", "--micro-batch", "4",
         "--micro-steps", "2", "--zero", "2", "--steps", "2", "--log-every", "1", "--", "model.vocab_size=4096"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("{")]
    figures = json.loads(line)
    assert figures["bench"] == "train_throughput" and figures["device"] == "cpu" and figures["monitoring"] is True
    assert figures["global_batch_tokens"] == 4 * 128 * 2 and figures["grad_accum"] == 2 and figures["zero_stage"] == 2
    assert figures["tokens_per_s"] > 0 and 0 < figures["mfu"] < 1 and figures["peak_mem_gb"] > 0
    assert 7 < figures["loss_first"] < 10  # random ids over 4,096: about ln 4096 = 8.3
