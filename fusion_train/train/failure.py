"""How a run that cannot go on ends under torchrun: one `fusion-train: error: ...` message, one
exit code on every rank, and the message as the root cause in torchrun's failure summary. Exit 2
is a problem the user must fix (config, data, a full disk); exit 75 (EX_TEMPFAIL) a fault of the
cluster that running again may not meet (a hung or lost rank: watchdog.py), for which a SLURM job
is requeued.

Every failing rank writes the message to torchrun's error file (TORCHELASTIC_ERROR_FILE, the file
`torch.distributed.elastic.multiprocessing.errors.record` writes and torchrun's summary reads),
with the message itself in place of a traceback. Only one rank prints it:
- errors found while the run starts (config, data, checkpoint, run folder) are the same on every
  rank, so rank 0 prints them. torchrun stops every rank at the first exit, so the other ranks
  wait for rank 0 to record its error before they leave (or print their own if it has none);
- errors met during training (a source whose every shard turned unreadable, in a loader worker)
  are printed by the first rank to create `RUN_DIR/failure.json`, which keeps the message and
  the exit code. A rank that then fails only because that peer left (a collective that lost its
  partner) ends quietly, with the peer's message and code instead of a traceback of its own.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

FAILURE_FILE = "failure.json"
EXIT_CODE = 2
RETRY_EXIT_CODE = 75
RANK_0_GRACE_S = 10.0  # how long another rank waits for rank 0 to meet the same error at start


def user_message(error: BaseException) -> str:
    """The error's own message, then each underlying cause it does not already say (Hydra's
    "Error merging override X" is only useful with OmegaConf's reason under it). For an error
    re-raised from a loader worker, the original's last line rather than the worker's traceback
    that the DataLoader prepends."""
    message = str(error)
    if message.startswith("Caught ") and "Original Traceback" in message:
        last_line = message.rstrip().splitlines()[-1]
        message = last_line.split(": ", 1)[1] if ": " in last_line else last_line
    cause = error.__cause__
    while cause is not None:
        text = str(cause).strip()
        if text and text not in message:
            message += "\n  because: " + text.replace("\n", "\n    ")
        cause = cause.__cause__
    return message


def _record_for_torchrun(message: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        text = f"fusion-train: error: {message}"
        record = {"message": {"message": text, "extraInfo": {"py_callstack": text, "timestamp": str(int(time.time()))}}}
        try:
            Path(path).write_text(json.dumps(record))
        except OSError:
            pass  # its file system is full too: the printed message is what remains


def _print(message: str) -> None:
    print(f"fusion-train: error: {message}", file=sys.stderr, flush=True)


def fail_at_start(error: BaseException) -> int:
    message = user_message(error)
    if os.environ.get("RANK", "0") == "0":
        _print(message)
    elif not _rank_0_recorded_its_error(RANK_0_GRACE_S):
        _print(message)  # rank 0 did not fail this way: the error is this rank's own
    _record_for_torchrun(message)
    return EXIT_CODE


def _rank_0_recorded_its_error(grace_s: float) -> bool:
    """Whether rank 0 wrote torchrun's error file within `grace_s` (it prints first). Its file is
    found beside this rank's own on the first node; elsewhere, waiting out the grace is all a rank
    can do to keep its exit from cutting rank 0 short."""
    own_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    on_rank_0_node = os.environ.get("GROUP_RANK", "0") == "0"
    rank_0_file = Path(own_file).parent.parent / "0" / "error.json" if own_file and on_rank_0_node else None
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if rank_0_file is not None and rank_0_file.exists():
            return True
        time.sleep(0.05)
    return rank_0_file is None


def fail_in_training(error: BaseException, run_dir: Path) -> int:
    report(user_message(error), run_dir, EXIT_CODE)
    return EXIT_CODE


def report(message: str, run_dir: Path, exit_code: int) -> bool:
    """Record the message for torchrun; print it if this rank is the first to fail (it creates
    FAILURE_FILE and leaves the message and code there for its peers). Returns whether it was.
    On a full disk the file stays empty (a peer then refers to the message printed); where it
    cannot be created at all, every rank that fails says why."""
    _record_for_torchrun(message)
    try:
        claim = os.open(Path(run_dir) / FAILURE_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError:
        claim = None
    if claim is not None:
        record = {"rank": int(os.environ.get("RANK", "0")), "time": time.time(), "message": message,
                  "exit_code": exit_code}  # fmt: skip
        try:
            with os.fdopen(claim, "w") as f:
                f.write(json.dumps(record))
        except OSError:
            pass
    _print(message)
    return True


def peer_failure(run_dir: Path) -> int | None:
    """The exit code of a peer's failure, after recording it as this rank's cause; None when no
    peer failed."""
    path = Path(run_dir) / FAILURE_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {}
    message = record.get("message", "another rank failed: its message is printed above")
    _record_for_torchrun(f"{message} (reported by another rank)")
    return record.get("exit_code", EXIT_CODE)


def clear(run_dir: Path) -> None:
    """A new invocation's failures are its own (rank 0, holding the run folder)."""
    (Path(run_dir) / FAILURE_FILE).unlink(missing_ok=True)
