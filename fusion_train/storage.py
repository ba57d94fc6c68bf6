"""What a file system said when a write failed, in words a user can act on: the folder, the OS's
reason, the space free and the space the write needed. Checkpoints, the run's logs and shard
building all write through `writing`, so that a full disk, an exceeded quota, a read-only mount or a
failing device ends with one message rather than a traceback from deep inside torch's serializer.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# What a write can meet that no retry in the same place fixes.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
# torch's serializer reports a failed write in its own words, without the errno.
TORCH_WRITE_FAILURES = ("unexpected pos", "basic_ios::clear", "PytorchStreamWriter failed", "file write failed")


class WriteFailed(Exception):
    """A write that the file system refused; the message says where, why and what to do."""


def size_text(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent: what disk_usage can ask about before a folder exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(folder: str | Path) -> int:
    return shutil.disk_usage(_existing(Path(folder))).free


def tree_bytes(path: str | Path) -> int:
    """The size of a file, or of everything under a folder (files that vanish meanwhile count 0)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def is_write_failure(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in WRITE_ERRNOS
    return isinstance(error, RuntimeError) and any(words in str(error) for words in TORCH_WRITE_FAILURES)


FULL_BELOW = 2**20  # free bytes under which a failed write is put down to a full file system


def _reason_and_remedy(error: BaseException, free: int) -> tuple[str, str]:
    """What went wrong in the OS's words (torch's serializer gives none: a full disk is read from
    the free space), and what to do about it."""
    code = error.errno if isinstance(error, OSError) else (errno.ENOSPC if free < FULL_BELOW else None)
    if isinstance(error, OSError):
        reason = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    else:
        words = f"torch: {str(error).strip().splitlines()[0]!r}"
        reason = f"{os.strerror(code)} ({words})" if code else f"the write failed ({words})"
    remedy = {
        errno.ENOSPC: "make room",
        errno.EDQUOT: "raise the quota or make room",
        errno.EROFS: "remount it writable",
        errno.EIO: "check the disk or the network file system (dmesg, the file server)",
    }.get(code, "check the file system")
    return reason, remedy


def describe_failure(error: BaseException, folder: str | Path, what: str, needs: str = "", setting: str = "") -> str:
    """`what` could not be written to `folder`: the OS's reason, the space free, what the write
    `needs` ("a checkpoint takes 22.0 MB, as step_2 does") and what to do, `setting` being the
    option that puts the folder elsewhere."""
    usage = shutil.disk_usage(_existing(Path(folder)))
    reason, remedy = _reason_and_remedy(error, usage.free)
    space = f"the file system has {size_text(usage.free)} free of {size_text(usage.total)}"
    return (
        f"{what} could not be written to {folder}: {reason}; {space}" + (f", and {needs}" if needs else "")
        + f". To go on, {remedy}" + (f" or move {setting}" if setting else "")
    )  # fmt: skip


def check_room(folder: str | Path, what: str, setting: str = "") -> None:
    """WriteFailed when `folder`'s file system is full (under FULL_BELOW free): for writers that
    fail without telling (W&B's service process only logs its own ENOSPC)."""
    usage = shutil.disk_usage(_existing(Path(folder)))
    if usage.free < FULL_BELOW:
        raise WriteFailed(
            f"{what} cannot be written to {folder}: the file system is full ({size_text(usage.free)} free of "
            f"{size_text(usage.total)}). To go on, make room" + (f" or move {setting}" if setting else "")
        )


@contextmanager
def writing(folder: str | Path, what: str, needs: str = "", setting: str = "") -> Iterator[None]:
    """Turn a write failure inside the block into WriteFailed (describe_failure's message); any
    other error passes unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if not is_write_failure(error):
            raise
        raise WriteFailed(describe_failure(error, folder, what, needs, setting)) from None
