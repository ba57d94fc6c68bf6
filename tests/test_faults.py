"""The faults of a real cluster, on 2 CPU ranks under torchrun, each tried on a real process with a
real signal or a real full file system: kills of the launcher or of one rank anywhere (mid-step,
inside a checkpoint write, inside pruning), a rank or a loader worker that stops making progress
(SIGSTOP), a disk that fills up during a checkpoint. Each ends its invocation with one clean
message, and the next invocation resumes exactly: every step's loss is an uninterrupted run's."""

import os
import random
import time

import psutil
import pytest

from conftest import (
    assert_no_traceback_of_ours,
    assert_one_clean_error,
    checkpoints,
    ended,
    last_logged_step,
    logged_steps,
    losses,
    rank_processes,
    read_metrics,
    read_records,
    small_file_system,
    start_training,
    torchrun,
    train_overrides,
    wait_for,
)
from fusion_train.model.size import parameter_counts
from fusion_train.storage import size_text, tree_bytes
from fusion_train.train.config import load_config
from fusion_train.train.plan import checkpoint_bytes

TRAIN = "-m fusion_train.train"
COMMON = ["trainer.steps=16", "trainer.checkpoint_every=4", "trainer.keep_last=1"]
TORCHRUN_GRACE_S = 30  # how long torchrun waits for a rank it sent SIGTERM before it sends SIGKILL


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    """The uninterrupted run the interrupted ones must equal: (its folder, its losses)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    torchrun(TRAIN, *train_overrides(demo_data, run, *COMMON))
    return run, losses(run)


def assert_resumed_exactly(run, reference_losses) -> None:
    by_step = {m["step"]: m["loss/total"] for m in read_metrics(run)}  # the last logging of each step
    assert [by_step[s] for s in range(1, 17)] == reference_losses


def kill_launcher(process) -> None:
    """SIGKILL torchrun alone, as `kill -9 PID` does: its ranks must not go on without it."""
    processes = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    processes[0].kill()
    process.wait()
    deadline = time.time() + 10
    while alive := [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        assert time.time() < deadline, f"still running after their launcher died: {alive}"
        time.sleep(0.2)


def wait_for_checkpoint(run, pattern, process):
    wait_for(lambda: list((run / "checkpoints").glob(pattern)), process)
    return next((run / "checkpoints").glob(pattern))


def test_kills_of_the_launcher_or_of_one_rank_anywhere_lose_nothing(demo_data, tmp_path, reference):
    """kill -9 of torchrun mid-training, inside a checkpoint write and inside pruning: the ranks die
    with it, and a second invocation meanwhile is refused. SIGKILL of rank 1 alone, as the kernel's
    OOM killer does, at a random step and inside a checkpoint write: torchrun ends rank 0, which
    says what happened once. The resumed run equals an uninterrupted one."""
    run = tmp_path / "run"
    process = start_training(demo_data, run, *COMMON)
    wait_for(lambda: logged_steps(run) >= 6, process)
    kill_launcher(process)  # mid-training
    logged = (run / "metrics.jsonl").read_text()
    time.sleep(2)
    assert (run / "metrics.jsonl").read_text() == logged  # nobody writes on
    assert checkpoints(run)[-1] in ("step_4", "step_8") and read_metrics(run)[-1]["step"] < 16

    # Inside the writing of the next checkpoint; meanwhile a second invocation is refused.
    process = start_training(demo_data, run, *COMMON, env={**os.environ, "FUSION_TRAIN_CHECKPOINT_PAUSE_S": "60"})
    partial = wait_for_checkpoint(run, "step_*.partial", process)
    second = torchrun(TRAIN, *train_overrides(demo_data, run, *COMMON), check=False)
    assert second.returncode != 0
    assert_one_clean_error(second.stdout + second.stderr, f"{run} is in use by another training invocation")
    assert '"pid": ' in second.stdout + second.stderr  # the holder, named
    kill_launcher(process)
    assert partial.is_dir() and partial.name.removesuffix(".partial") not in checkpoints(run)

    # Inside pruning the previous checkpoint: it is renamed before it is deleted.
    process = start_training(demo_data, run, *COMMON, env={**os.environ, "FUSION_TRAIN_PRUNE_PAUSE_S": "60"})
    pruning = wait_for_checkpoint(run, "step_*.pruning", process)
    kill_launcher(process)
    assert pruning.is_dir() and pruning.name.removesuffix(".pruning") not in checkpoints(run)
    assert checkpoints(run)[-1] == "step_8"

    # Rank 1 alone, mid-step.
    at = random.randint(9, 11)
    process = start_training(demo_data, run, *COMMON)
    wait_for(lambda: last_logged_step(run) >= at, process)
    rank_processes(process)[1].kill()
    output = ended(process, timeout=120)
    printed = [line for line in output.splitlines() if line.startswith("fusion-train: error:")]
    assert len(printed) == 1 and "rank 0 lost a peer in step" in printed[0], (at, output[-5000:])
    assert "step_8 is complete and intact: the same command resumes from it (exit 75)" in printed[0]
    assert "exitcode  : -9" in output.split("Root Cause (first observed failure):")[1]
    assert_no_traceback_of_ours(output)

    # Rank 1 alone, inside a checkpoint write: the checkpoint stays partial, never taken for whole.
    process = start_training(demo_data, run, *COMMON, env={**os.environ, "FUSION_TRAIN_CHECKPOINT_PAUSE_S": "5"})
    partial = wait_for_checkpoint(run, "step_12.partial", process)
    rank_processes(process)[1].kill()
    output = ended(process, timeout=120)
    assert "rank 0 lost a peer in step 12, writing checkpoint step_12" in output, output[-5000:]
    assert checkpoints(run)[-2:] == ["step_8", "step_12.partial"]

    torchrun(TRAIN, *train_overrides(demo_data, run, *COMMON))
    assert checkpoints(run) == ["step_16"]
    assert_resumed_exactly(run, reference[1])
    # Each invocation marked where it started; the refused one wrote nothing.
    starts = [r for r in read_records(run) if "resumed_from" in r]
    assert len(starts) == 6 and starts[0] == {**starts[0], "step": 0, "resumed_from": None}
    assert all(r["resumed_from"].endswith(f"step_{r['step']}") for r in starts[1:])


def test_a_stopped_rank_or_loader_worker_ends_the_invocation_with_every_ranks_stacks(demo_data, tmp_path, reference):
    """SIGSTOP of rank 1 after step 2, then of rank 0's loader worker: the invocation ends within
    trainer.collective_timeout_s plus a margin, every rank that can writes its stacks to
    RUN_DIR/hang/, one message names the step and who stalled, every rank exits 75 (a SLURM job
    would be requeued), and the next invocation resumes exactly."""
    run, timeout = tmp_path / "run", 8
    settings = [*COMMON, f"trainer.collective_timeout_s={timeout}"]

    process = start_training(demo_data, run, *settings)
    wait_for(lambda: last_logged_step(run) >= 2, process)
    rank_processes(process)[1].suspend()
    stopped = time.time()
    output = ended(process, timeout=timeout + TORCHRUN_GRACE_S + 60)
    # The timeout, a heartbeat for the other ranks' stacks, then torchrun's grace for the stopped rank.
    assert time.time() - stopped < timeout + TORCHRUN_GRACE_S + 15
    message = assert_one_clean_error(output, "rank 0 made no progress for", exit_code=75)
    assert f"(trainer.collective_timeout_s={timeout})" in message
    assert "Rank 1 did not arrive: no word for" in message and "(stopped by a signal)" in message
    assert "There is no complete checkpoint yet: the next invocation starts from the beginning (exit 75)" in message
    [stacks] = (run / "hang").glob("step_*_rank00000.txt")
    assert f"Every rank's Python stacks: {run / 'hang'}/{stacks.name.split('_rank')[0]}_rank*.txt" in message
    assert "in _optimizer_step" in stacks.read_text() and "watchdog" in stacks.read_text()

    process = start_training(demo_data, run, *settings)
    wait_for(lambda: last_logged_step(run) >= 6, process)
    worker = rank_processes(process)[0].children()[0]
    worker.suspend()
    stopped = time.time()
    output = ended(process, timeout=timeout + 60)
    assert time.time() - stopped < timeout + 15
    # Whichever rank's timeout passes first says it: rank 0 waiting for its data, or rank 1 waiting
    # for rank 0 (then from what rank 0 posted); either way the worker and its shard are named.
    message = assert_one_clean_error(output, "rank ", exit_code=75)
    assert (
        "made no progress for" in message
        and "waiting for the data of micro-batch" in message
        and "step_4 is complete and intact" in message
    )
    assert f"loader worker 0 (pid {worker.pid}, stopped by a signal)" in message
    assert str(demo_data["shards"]["text"]) in message or "shard-0" in message
    step = message.split(" in step ")[1].split(",")[0]
    assert sorted(p.name for p in (run / "hang").glob(f"step_{step}_rank*.txt")) == [
        f"step_{step}_rank00000.txt", f"step_{step}_rank00001.txt"
    ]  # fmt: skip
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE  # not left stopped

    torchrun(TRAIN, *train_overrides(demo_data, run, *settings))
    assert_resumed_exactly(run, reference[1])


def test_a_full_disk_during_a_checkpoint_says_so_and_the_same_command_resumes(demo_data, tmp_path, reference):
    """The run folder on a file system with room for one and a half checkpoints: step_4 is written,
    step_8 cannot be. One message says where, why and how much; step_4 stays whole; once there is
    room, the same command resumes from it and matches the uninterrupted run. A checkpoint's size is
    what --plan's arithmetic says."""
    size = tree_bytes(reference[0] / "checkpoints" / "step_16")
    parameters = parameter_counts(load_config(train_overrides(demo_data, tmp_path)).model).total
    assert checkpoint_bytes(parameters, bf16=False) == pytest.approx(size, rel=0.02)  # fp32 on a CPU
    with small_file_system(tmp_path / "disk", int(1.5 * size) + 2**20) as resize:
        run = tmp_path / "disk" / "run"
        result = torchrun(TRAIN, *train_overrides(demo_data, run, *COMMON), check=False)
        output = result.stdout + result.stderr
        message = assert_one_clean_error(output, f"checkpoint step_8 could not be written to {run / 'checkpoints'}: "
                                                 "No space left on device")  # fmt: skip
        taken = size_text(tree_bytes(run / "checkpoints" / "step_4"))
        assert (f"a checkpoint takes {taken} (as step_4 does). To go on, make room or move trainer.run_dir. "
                "step_4 is complete and intact: the same command resumes from it") in message  # fmt: skip
        assert output.count("has room for 1 more checkpoint(s)") == 1  # warned before step_4's write
        assert checkpoints(run) == ["step_4", "step_8.partial"]

        resize(4 * size)
        torchrun(TRAIN, *train_overrides(demo_data, run, *COMMON))
        assert_resumed_exactly(run, reference[1])
