"""The multi-node launch path on one machine: launch/torchrun.sh started twice, as on two nodes
(c10d rendezvous on localhost, one rank each, so LOCAL_RANK is 0 on both while RANK is 0 and 1)."""

import os
import subprocess
import sys

from conftest import REPO, free_port, read_metrics, train_overrides


def on_two_nodes(demo_data, run, *extra: str) -> str:
    """Both agents' output, once both have exited 0."""
    port = free_port()
    env = {**os.environ, "PY": sys.executable, "NNODES": "2", "NPROC": "1", "RDZV_ENDPOINT": f"127.0.0.1:{port}",
           "RDZV_ID": f"two_nodes_{port}"}  # fmt: skip
    command = ["bash", "launch/torchrun.sh", *train_overrides(demo_data, run, "trainer.steps=4", *extra)]
    agents = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]  # fmt: skip
    outputs = [agent.communicate(timeout=300) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(err[-3000:] for _, err in outputs)
    return "".join(out + err for out, err in outputs)


def test_two_agents_train_checkpoint_and_resume_and_rank_0_alone_writes_the_run(demo_data, tmp_path):
    run = tmp_path / "run"
    on_two_nodes(demo_data, run, "trainer.stop_after_steps=2")
    checkpoint = run / "checkpoints" / "step_2"
    assert sorted(p.name for p in checkpoint.glob("rank*_state.pt")) == ["rank00000_state.pt", "rank00001_state.pt"]
    resumed = on_two_nodes(demo_data, run)
    assert resumed.count(f"resumed from {checkpoint} at step 2") == 1  # said once, by rank 0
    assert [m["step"] for m in read_metrics(run) if "loss/total" in m] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_2", "step_4"]
