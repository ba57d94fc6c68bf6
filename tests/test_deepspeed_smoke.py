"""The install is real: the tiny model trains through DeepSpeed's engine on 2 ranks."""

import json

from conftest import REPO, torchrun


def test_tiny_model_trains_with_zero2_and_gradient_accumulation(tmp_path):
    out = tmp_path / "record.json"
    torchrun(REPO / "tests" / "scripts" / "deepspeed_smoke.py", "--out", str(out), "--steps", "20")
    record = json.loads(out.read_text())

    assert record["world_size"] == 2
    assert record["zero_stage"] == 2
    assert record["gradient_accumulation_steps"] == 2
    assert record["optimizer_steps"] == 20
    assert record["optimizer"] == "DeepSpeedZeroOptimizer"
    losses = record["losses"]
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses
    checksums = record["weight_checksums"]
    assert checksums[0] == checksums[1], "the replicas diverged"
