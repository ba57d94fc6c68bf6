"""launch/slurm/pretrain.sbatch on a real one-node SLURM cluster (slurmctld + slurmd + munge,
started here): USR1 makes the job checkpoint and requeue itself, and the requeued job finishes the
run from that checkpoint."""

import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO, read_metrics, train_overrides

BASE = "/tmp/fusion-slurm"
SLURM_ENV = {**os.environ, "BASE": BASE, "SLURM_CONF": f"{BASE}/slurm.conf"}


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("starting SLURM daemons needs root (slurmd, munged), and this test runs as a user")
    up = subprocess.run(["bash", "tests/slurm/slurm_up.sh"], cwd=REPO, env=SLURM_ENV, capture_output=True, text=True)
    if up.returncode != 0:
        pytest.skip(f"SLURM could not start on this machine: {(up.stdout + up.stderr).strip()[-800:]}")
    yield
    subprocess.run(["bash", "tests/slurm/slurm_down.sh"], cwd=REPO, env=SLURM_ENV, capture_output=True)


def job_info(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=SLURM_ENV, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def wait_for(condition, job: str, timeout: float = 300):
    deadline = time.time() + timeout
    while not condition():
        state = job_info(job).get("JobState")
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), job_info(job)
        assert time.time() < deadline, f"timed out; job {job_info(job)}"
        time.sleep(0.5)


def test_usr1_checkpoints_requeues_and_the_job_finishes(slurm, demo_data, tmp_path):
    run = tmp_path / "run"
    overrides = [
        o
        for o in train_overrides(demo_data, run, "trainer.steps=60", "trainer.checkpoint_every=100")
        if not o.startswith("trainer.run_dir")
    ]
    env = {**SLURM_ENV, "PYTHON": sys.executable, "NPROC_PER_NODE": "2", "RUN_DIR": str(run), "MASTER_PORT": "29733",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu"}  # fmt: skip
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", f"--output={tmp_path}/job_%j.out", "launch/slurm/pretrain.sbatch", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = submitted.stdout.strip().split(";")[0]

    wait_for(
        lambda: (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3, job
    )
    subprocess.run(["scancel", "--signal=USR1", job], env=SLURM_ENV, check=True)
    wait_for(lambda: job_info(job).get("JobState") == "COMPLETED", job)

    info = job_info(job)
    log = (tmp_path / f"job_{job}.out").read_text()
    assert info["Restarts"] == "1", info
    stopped_at = int(re.search(r"stopping at step (\d+) on SIGUSR1", log)[1])
    assert f"resumed from {run}/checkpoints/step_{stopped_at} at step {stopped_at} " in log
    assert "restart 1" in log and stopped_at < 60
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 61))


def test_a_job_array_builds_the_parts_that_merge_into_the_one_process_build(
    slurm, text_tokenizer, paragraphs, tmp_path
):
    """launch/slurm/build_shards.sbatch as a 2-task array on the real cluster, then merge-manifests."""
    from data_pipelines.build import BuildSettings, build_shards
    from fusion_train.commands.data import main as fusion_data
    from helpers import shard_documents

    out, whole = tmp_path / "parts", tmp_path / "whole"
    build_shards(
        BuildSettings("text", str(text_tokenizer.path)), paragraphs, whole, workers=0, max_samples_per_shard=20
    )
    arguments = ["--kind", "text", "--input", *map(str, paragraphs), "--output", str(out),
                 "--text-tokenizer", str(text_tokenizer.path), "--workers", "0", "--max-samples-per-shard", "20"]  # fmt: skip
    env = {**SLURM_ENV, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/shards_%A_%a.out",
         "launch/slurm/build_shards.sbatch", *arguments],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = submitted.stdout.strip().split(";")[0]

    def finished() -> bool:
        out_text = subprocess.run(["scontrol", "show", "job", "-o", job], env=SLURM_ENV, capture_output=True, text=True)
        states = re.findall(r"JobState=(\S+)", out_text.stdout)
        assert not {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"} & set(states), out_text.stdout
        return len(states) == 2 and set(states) == {"COMPLETED"}

    deadline = time.time() + 300
    while not finished():
        assert time.time() < deadline, "the array did not finish in 300 s"
        time.sleep(0.5)
    logs = sorted(tmp_path.glob("shards_*.out"))
    assert [re.search(r"part (\d) of 2", p.read_text())[1] for p in logs] == ["0", "1"]
    assert fusion_data(["merge-manifests", str(out)]) == 0
    assert shard_documents(out) == shard_documents(whole)
