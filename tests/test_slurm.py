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
