"""One writer per run folder. Rank 0 holds an OS lock on `RUN_DIR/run.lock` for as long as it
lives (the kernel releases it when the process ends, however it ends), and the file names the
holder's host and pid, so that a second invocation on the same folder is refused with a message
saying who holds it instead of two trainers interleaving their metrics and checkpoints."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from fusion_train.storage import WriteFailed, writing

log = logging.getLogger(__name__)
LOCK_FILE = "run.lock"


class RunFolderInUse(ValueError):
    pass


def holder(run_dir: Path) -> str:
    """Who holds the run folder, as its lock file says."""
    try:
        return (Path(run_dir) / LOCK_FILE).read_text().strip() or "a process that has not written its name yet"
    except OSError:
        return "holder unknown"


def in_use(run_dir: Path) -> RunFolderInUse:
    return RunFolderInUse(
        f"{run_dir} is in use by another training invocation ({holder(run_dir)}): wait for it to end or stop it, "
        "or give this run another trainer.run_dir"
    )


class RunFolderLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise in_use(run_dir) from None
        except OSError as err:  # a file system mounted without locks (some Lustre and NFS setups)
            log.warning(
                "%s cannot be locked (%s): nothing stops a second trainer writing this run folder", self.path, err
            )
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.ctime()}) + "\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()


def hold_run_folder(
    run_dir: Path, rank: int, device: torch.device, on_hold: Callable[[], None]
) -> RunFolderLock | None:
    """Rank 0 locks the run folder before anything is written there (`on_hold` then writes what
    comes first); every rank learns whether it could, and raises RunFolderInUse if not, the
    holder's name from the lock file in the message of each."""
    lock, failed = None, None
    if rank == 0:
        try:
            with writing(run_dir, "the run folder", setting="trainer.run_dir"):
                run_dir.mkdir(parents=True, exist_ok=True)
                lock = RunFolderLock(run_dir)
                on_hold()
        except RunFolderInUse:
            pass
        except WriteFailed as error:
            failed = error
    verdict = torch.tensor([2 if failed else int(rank == 0 and lock is None)], device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
    if verdict.item() == 2:  # rank 0 says why
        raise failed or WriteFailed(f"{run_dir} could not be written: rank 0 said why")
    if verdict.item():
        raise in_use(run_dir)
    return lock
