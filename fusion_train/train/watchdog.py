"""A rank that stops making progress ends the invocation within a timeout that fits what it is
doing, with every rank's Python stacks written and one message that names the step and, where it
can be known, the rank that did not arrive; instead of every other rank waiting silently inside a
collective until the process group's own timeout.

The loop beats as it goes (each micro-batch's data, its forward and backward, the optimizer step,
the step's end). A thread of each rank compares the time since the last beat with the timeout in
force:
- `trainer.collective_timeout_s` inside training steps, once the invocation's first step is done;
- `trainer.long_operation_timeout_s` before that (rendezvous, building the engine, loading a
  checkpoint and converting it to the universal form, the first step with its compile) and around
  the long operations the loop marks (checkpoint writes, validation, samples, a rollback).
The process group's own timeout is the long one plus a margin: it only backs this one up.

Every few seconds the thread posts this rank's progress to the launcher's key-value store (the one
torchrun's agent keeps, which outlives any rank). When the timeout passes on a rank, it
- writes its stacks (every thread, faulthandler) to RUN_DIR/hang/step_N_rankR.txt and posts the
  hang, on which every other rank's thread writes its own within a heartbeat and leaves too;
- compares the ranks' progress: one not heard from (stopped, dead, its node unreachable), or one
  behind the others (still waiting for its data: then its stalled loader worker and shard), or all
  waiting at the same point (a collective that does not complete);
- prints one message (the first rank to fail; failure.py), requeues a SLURM job, and exits 75.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from fusion_train.data.reads import process_state
from fusion_train.train import failure
from fusion_train.train.signals import requeue_slurm_job

log = logging.getLogger(__name__)
HANG_FOLDER = "hang"
PROCESS_GROUP_MARGIN_S = 60.0  # the process group's timeout exceeds the long one by this
STORE_TIMEOUT_S = 10.0
# How a collective says that a peer is gone, beyond torch's DistError.
LOST_PEER_WORDS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL error")

# What a rank is doing, in the order a step does it (a rank behind another has a smaller position).
START, DATA, COMPUTE, OPTIMIZER, STEP_END, LONG = range(6)
ACTIVITIES = {
    START: "starting up",
    DATA: "waiting for the data of micro-batch {}",
    COMPUTE: "in the forward and backward of micro-batch {}",
    OPTIMIZER: "in the optimizer step",
    STEP_END: "at the step's end (logging, the preemption check)",
}


@dataclass
class Timeouts:
    step_s: float  # trainer.collective_timeout_s
    long_s: float  # trainer.long_operation_timeout_s

    def process_group(self) -> timedelta:
        return timedelta(seconds=self.long_s + PROCESS_GROUP_MARGIN_S)


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}"


class Watchdog:
    def __init__(self, run_dir: Path, rank: int, world_size: int, timeouts: Timeouts,
                 stalled_read: Callable[[], str], resume_advice: Callable[[], str]):  # fmt: skip
        """`stalled_read()`: the loader worker holding the next batch back, in words;
        `resume_advice()`: what the next invocation resumes from."""
        self.run_dir, self.rank, self.world_size, self.timeouts = Path(run_dir), rank, world_size, timeouts
        self.stalled_read, self.resume_advice = stalled_read, resume_advice
        self.in_training = False  # the invocation's first step is done: the short timeout applies
        self.long_activity: str | None = None
        self._progress = ((0, -1, START), time.monotonic())  # (step, micro-batch, activity), when
        self._tick = min(1.0, timeouts.step_s / 10)
        self._period = min(5.0, timeouts.step_s / 4)  # between posts to the store
        self._prefix = f"fusion_train/watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._store = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fusion-train-watchdog", daemon=True)
        self._thread.start()

    def connect(self) -> None:
        """Post progress to the launcher's store from now on (the process group is up)."""
        if self.world_size > 1:
            self._store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                timeout=timedelta(seconds=STORE_TIMEOUT_S), wait_for_workers=False,
            )  # fmt: skip

    # --- the loop's side ------------------------------------------------------------------------

    def beat(self, step: int, activity: int, micro: int = 0) -> None:
        self._progress = ((step, micro, activity), time.monotonic())

    def step_ended(self, step: int) -> None:
        self.beat(step, STEP_END, 2**31)
        self.in_training = True

    @contextmanager
    def long_operation(self, step: int, activity: str) -> Iterator[None]:
        """Under the long timeout, whatever the loop does inside (checkpoint writes, validation)."""
        self.long_activity = activity
        self.beat(step, LONG, 2**31)
        yield  # an error inside leaves the activity as it was, for the message that ends the run
        self.long_activity = None
        self.beat(step, STEP_END, 2**31)

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()

    def lost_a_peer(self, error: BaseException, signalled: bool) -> int | None:
        """After `error` ended this rank's loop: when a collective failed because a peer is gone,
        or the launcher stopped this rank (`signalled`) on seeing one gone, one message and the
        retry exit code; None for any other error."""
        lost = isinstance(error, dist.DistError) or any(words in str(error) for words in LOST_PEER_WORDS)
        if not (lost or signalled):
            return None
        position, _ = self._progress
        message = (
            f"rank {self.rank} lost a peer in step {position[0]}, {self._activity(position)}: another rank "
            "ended without a word (killed by a signal, as the kernel's OOM killer does, or its node failed); "
            f"torchrun's summary names it. {self._resume()}"
        )
        if failure.report(message, self.run_dir, failure.RETRY_EXIT_CODE):
            requeue_slurm_job()
        return failure.RETRY_EXIT_CODE

    # --- the thread -----------------------------------------------------------------------------

    def _timeout(self) -> tuple[float, str]:
        if self.long_activity is not None or not self.in_training:
            return self.timeouts.long_s, "trainer.long_operation_timeout_s"
        return self.timeouts.step_s, "trainer.collective_timeout_s"

    def _activity(self, position: tuple[int, int, int]) -> str:
        step, micro, activity = position
        if activity == LONG:
            return self.long_activity or "in a long operation"
        return ACTIVITIES[activity].format(micro + 1)

    def _watch(self) -> None:
        posted = 0.0
        while not self._stopped.wait(self._tick):
            position, beat_at = self._progress
            waited = time.monotonic() - beat_at
            if waited > self._timeout()[0]:
                self._end(position, waited)
            if self._store is not None and time.monotonic() - posted >= self._period:
                posted = time.monotonic()
                try:
                    self._post(position, waited)
                    if self._store.check([self._prefix + "hang"]):
                        self._leave_with_the_others(position)
                except Exception as error:  # the store is gone: the launcher is ending the job
                    log.debug("watchdog: the launcher's store did not answer: %s", error)

    def _post(self, position: tuple[int, int, int], waited: float) -> None:
        detail = self._detail(position, waited)
        record = {"position": position, "activity": self._activity(position), "waited": waited,
                  "posted": time.time(), "host": socket.gethostname(), "pid": os.getpid(), "detail": detail}  # fmt: skip
        self._store.set(f"{self._prefix}rank/{self.rank}", json.dumps(record))

    def _detail(self, position: tuple[int, int, int], waited: float) -> str:
        """The loader's side of a long wait for data."""
        if position[2] != DATA or waited < self._period:
            return ""
        try:
            return self.stalled_read()
        except Exception as error:  # a diagnosis must not be what fails
            return f"(the loader could not say: {error})"

    def _dump_stacks(self, step: int, why: str) -> None:
        folder = self.run_dir / HANG_FOLDER
        try:
            folder.mkdir(exist_ok=True)
            with open(folder / f"step_{step}_rank{self.rank:05d}.txt", "w") as out:
                out.write(f"rank {self.rank}, pid {os.getpid()} on {socket.gethostname()}, "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {why}\n\n")  # fmt: skip
                out.flush()
                faulthandler.dump_traceback(out, all_threads=True)
        except OSError as error:
            log.error("the stacks of rank %d could not be written to %s: %s", self.rank, folder, error)

    def _end(self, position: tuple[int, int, int], waited: float) -> None:
        """This rank has waited too long: stacks, the others told, one message, exit."""
        step = position[0]
        timeout, setting = self._timeout()
        activity = self._activity(position)
        self._dump_stacks(step, f"no progress for {waited:.0f} s, {activity} ({setting}={timeout:g})")
        if self._store is not None:
            try:
                self._store.set(self._prefix + "hang", str(self.rank))
            except Exception as error:
                log.debug("watchdog: the launcher's store did not answer: %s", error)
        detail = self._detail(position, waited) if position[2] == DATA else ""
        message = (
            f"rank {self.rank} made no progress for {waited:.0f} s ({setting}={timeout:g}) in step {step}, {activity}"
            + (f": {detail}" if detail else "") + f". {self._who_did_not_arrive(position)}. "
            f"Every rank's Python stacks: {self.run_dir / HANG_FOLDER}/step_{step}_rank*.txt. {self._resume()}"
        )  # fmt: skip
        first = failure.report(message, self.run_dir, failure.RETRY_EXIT_CODE)
        if first:
            requeue_slurm_job()
        self._wait_for_the_others_stacks()
        self._exit()

    def _leave_with_the_others(self, position: tuple[int, int, int]) -> None:
        """Another rank reported a hang: this rank's stacks, then the same exit."""
        self._dump_stacks(position[0], f"another rank reported a hang; this rank was {self._activity(position)}")
        try:
            self._store.add(self._prefix + "stacks_written", 1)
        except Exception as error:
            log.debug("watchdog: the launcher's store did not answer: %s", error)
        failure.peer_failure(self.run_dir)
        self._exit()

    def _wait_for_the_others_stacks(self) -> None:
        if self._store is None:
            return
        deadline = time.monotonic() + self._period + 2 * self._tick + 1
        try:
            while self._store.add(self._prefix + "stacks_written", 0) < self.world_size - 1:
                if time.monotonic() > deadline:
                    return  # a stopped or lost rank writes none
                time.sleep(self._tick)
        except Exception as error:
            log.debug("watchdog: the launcher's store did not answer: %s", error)

    def _exit(self) -> None:
        """Without the interpreter's finalisation (the main thread is stuck); the loader workers
        first, which a stopped one would otherwise outlive."""
        for worker in multiprocessing.active_children():
            worker.kill()
        os._exit(failure.RETRY_EXIT_CODE)

    def _resume(self) -> str:
        try:
            advice = self.resume_advice()
        except Exception:  # before the checkpoints are known
            advice = "The same command resumes from the run's latest checkpoint"
        slurm = "; the SLURM job is requeued" if os.environ.get("SLURM_JOB_ID") else ""
        return f"{advice} (exit {failure.RETRY_EXIT_CODE}{slurm})"

    # --- which rank did not arrive -------------------------------------------------------------

    def _peers(self) -> dict[int, dict] | None:
        """The other ranks' last posts, or None when the store does not answer."""
        if self._store is None:
            return {}
        try:
            keys = [f"{self._prefix}rank/{r}" for r in range(self.world_size) if r != self.rank]
            present = [key for key in keys if self._store.check([key])]
            values = self._store.multi_get(present) if present else []
        except Exception:
            return None
        return {int(key.rsplit("/", 1)[1]): json.loads(value) for key, value in zip(present, values, strict=True)}

    def _who_did_not_arrive(self, position: tuple[int, int, int]) -> str:
        if self.world_size == 1:
            return "This is the only rank"
        peers = self._peers()
        if peers is None:
            return "Which rank did not arrive could not be known: the launcher's store did not answer"
        now = time.time()
        silent = sorted(r for r in range(self.world_size) if r != self.rank and (
            r not in peers or now - peers[r]["posted"] > 3 * self._period + 2 * self._tick))  # fmt: skip
        if silent:
            last = peers.get(silent[0])
            seen = f"; last seen {last['activity']} in step {last['position'][0]}" if last else ""
            quiet_for = f" for {now - last['posted']:.0f} s" if last else ""
            state = last and last["host"] == socket.gethostname() and process_state(last["pid"])
            why = state or "stopped, killed, blocked with its interpreter held, or on an unreachable node"
            return f"{_ranks(silent).capitalize()} did not arrive: no word{quiet_for} ({why}){seen}"
        positions = {r: tuple(p["position"]) for r, p in peers.items()} | {self.rank: position}
        lowest = min(positions.values())
        behind = sorted(r for r, p in positions.items() if p == lowest)
        if behind == [self.rank]:
            return "The other ranks went on and wait for this one"
        if len(behind) == len(positions):
            return (f"Every rank is {self._activity(lowest)} in step {lowest[0]}: a collective that does not "
                    "complete (the network, NCCL) or a shared file system that does not answer")  # fmt: skip
        first = peers.get(behind[0])
        activity = first["activity"] if first else self._activity(lowest)
        detail = f": {first['detail']}" if first and first["detail"] else ""
        return f"{_ranks(behind).capitalize()} fell behind, still {activity} in step {lowest[0]}{detail}"
