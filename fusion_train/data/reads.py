"""Which shard each loader worker is reading, in memory shared with the training process: when a
rank waits too long for its next batch, the stalled read (a hung file system) or the stalled
worker (stopped, killed, blocked in the kernel) is named by the process that waits for it.

A worker's row: its pid, when its current read began (0: none in progress), the source and shard
of that read (or of its last one), and when it last finished a read. Two stores of floats per
document read, into a numpy view of the shared tensor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import torch

PID, STARTED, SOURCE, SHARD, FINISHED = range(5)
PROCESS_STATES = {
    "T": "stopped by a signal",
    "t": "stopped by a debugger",
    "D": "blocked in the kernel, typically on a hung file system",
    "Z": "dead",
}


class ReadSlot:
    """One worker's row, for the reads of one of its sources."""

    def __init__(self, row: np.ndarray, source: int):
        self.row, self.source = row, source

    def begin(self, shard: int) -> None:
        self.row[SOURCE], self.row[SHARD], self.row[STARTED] = self.source, shard, time.time()

    def end(self) -> None:
        self.row[STARTED], self.row[FINISHED] = 0.0, time.time()


def process_state(pid: int) -> str | None:
    """What Linux says of a process that is not running normally, or None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    return PROCESS_STATES.get(state)


class ReadBoard:
    def __init__(self, workers: int):
        """`workers`: the loader's worker processes (0: the training process reads)."""
        self.table = torch.zeros(max(workers, 1), 5, dtype=torch.float64).share_memory_()

    def slots(self, worker: int, sources: int) -> list[ReadSlot]:
        """Worker `worker`'s row, one slot per source (called in the worker: the numpy view is made
        in the process that writes through it)."""
        row = self.table.numpy()[worker]
        row[PID], row[SOURCE], row[FINISHED] = os.getpid(), -1, time.time()
        return [ReadSlot(row, source) for source in range(sources)]

    def stalled(self, shard_name: Callable[[int, int], str]) -> str:
        """The worker most likely holding the batch back, in words: the one whose read has been
        going on longest, else the one idle longest. `shard_name(source, shard)` names a shard."""
        rows, now = self.table.numpy(), time.time()
        started = [(now - row[STARTED], worker) for worker, row in enumerate(rows) if row[STARTED] > 0 and row[PID]]
        idle = [(now - row[FINISHED], worker) for worker, row in enumerate(rows) if row[PID]]
        if not idle:
            return "no loader worker has started"
        (age, worker), reading = (max(started), True) if started else (max(idle), False)
        row = rows[worker]
        pid = int(row[PID])
        state = process_state(pid) if pid != os.getpid() else None
        who = f"loader worker {worker} (pid {pid}{', ' + state if state else ''})"
        shard = shard_name(int(row[SOURCE]), int(row[SHARD])) if row[SOURCE] >= 0 else "no shard yet"
        if reading:
            return f"{who} has been reading {shard} for {age:.0f} s"
        return f"{who} has finished no read for {age:.0f} s; its last was of {shard}"
