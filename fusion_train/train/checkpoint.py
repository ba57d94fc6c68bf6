"""Checkpoints that a crash at any moment leaves usable.

A checkpoint is written under `step_N.partial` (DeepSpeed's engine state, then each rank's data
position and RNG states) and, once every rank has finished, rank 0 writes its trainer state last:
`trainer_state.json` is the completion marker. It lists the checkpoint's files and their sizes,
which a resume checks first: a file lost or cut short after the save is named, with the checkpoint
before. Only then is the folder renamed to `step_N`. A checkpoint is complete when it is named
`step_N` and holds the marker; `latest`, `latest_before` and resume look at nothing else. `latest` (for DeepSpeed's own tools) is replaced atomically after
the rename. The last `keep_last` (at least 1) checkpoints are kept, plus every `keep_every`-th
step; the newest complete one is never pruned. Pruning renames `step_N` to `step_N.pruning` before
deleting it, so a kill in the middle leaves a marked leftover, removed at the next start, and never
a half-deleted `step_N`.

A write the file system refuses (a full disk, a quota, a read-only mount) ends the run with
`storage.WriteFailed`: which folder, what the OS said, the space free and a checkpoint's size (the
last complete one's, or the estimate before there is one). Before each save rank 0 compares the
free space with that size and warns once when fewer than two more checkpoints fit.

A checkpoint resumed on another number of ranks is first converted, once, into DeepSpeed's
universal format in `step_N/universal` (by rank 0, under `universal.partial` until complete): each
parameter's fp32 weights and Adam moments whole, which any data-parallel split can load.

A rollback rewrites the checkpoint it went back to (same weights, a data position past the skipped
batches): the old folder is set aside as `step_N.superseded` until the new one is in place, and a
crash in between restores it at the next start.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fusion_train.storage import free_bytes, size_text, tree_bytes, writing
from fusion_train.weights.training_checkpoint import TRAINER_STATE, CheckpointError

log = logging.getLogger(__name__)
TAG = re.compile(r"^step_(\d+)$")
PARTIAL = ".partial"
SUPERSEDED = ".superseded"
PRUNING = ".pruning"
UNIVERSAL = "universal"
FILES = "files"  # the marker's list of the checkpoint's files and sizes


def written_files(folder: Path) -> dict[str, int]:
    """The checkpoint's files and their sizes, recorded in its marker."""
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def _rank_state_file(rank: int) -> str:
    return f"rank{rank:05d}_state.pt"


def rng_states() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # weights_only-loadable
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _fault_injection_pause(variable: str) -> None:
    """Tests kill a trainer inside a checkpoint write (FUSION_TRAIN_CHECKPOINT_PAUSE_S: between the
    engine state and the rest) or inside pruning (FUSION_TRAIN_PRUNE_PAUSE_S: between the rename
    and the deletion): the variable holds it there for that many seconds."""
    pause = float(os.environ.get(variable, "0"))
    if pause:
        time.sleep(pause)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def is_complete(path: Path) -> bool:
    return TAG.match(path.name) is not None and (path / TRAINER_STATE).is_file()


def check_retention(keep_last: int, keep_every: int) -> None:
    if keep_last < 1 or keep_every < 0:
        raise ValueError(
            f"trainer.keep_last={keep_last}, trainer.keep_every={keep_every}: keep_last must be at least 1 "
            "(the newest checkpoint is what a restart resumes from) and keep_every 0 (none) or positive"
        )


class Checkpointer:
    def __init__(self, folder: str | Path, rank: int, keep_last: int, keep_every: int, estimated_size: int = 0):
        """`estimated_size`: a checkpoint's bytes before one exists to measure."""
        check_retention(keep_last, keep_every)
        self.folder, self.rank = Path(folder), rank
        self.keep_last, self.keep_every = keep_last, keep_every
        self.estimated_size = estimated_size
        self._measured: tuple[Path, int] | None = None
        self._warned_of_space = False

    def complete(self) -> list[tuple[int, Path]]:
        found = [(int(p.name.split("_")[1]), p) for p in self.folder.glob("step_*") if is_complete(p)]
        return sorted(found)

    def latest(self) -> Path | None:
        complete = self.complete()
        return complete[-1][1] if complete else None

    def latest_before(self, step: int) -> Path | None:
        earlier = [path for s, path in self.complete() if s < step]
        return earlier[-1] if earlier else None

    def remove_leftovers(self) -> None:
        """Leftovers of a save or a prune that was interrupted (rank 0, before training starts)."""
        if self.rank == 0:
            for leftover in [*self.folder.glob(f"step_*{PARTIAL}"), *self.folder.glob(f"step_*{PRUNING}")]:
                shutil.rmtree(leftover, ignore_errors=True)
            for unmarked in self.folder.glob("step_*"):
                if TAG.match(unmarked.name) and not is_complete(unmarked):
                    log.warning("%s has no %s: an incomplete checkpoint, ignored", unmarked, TRAINER_STATE)
            for old in self.folder.glob(f"step_*{SUPERSEDED}"):
                final = old.with_name(old.name.removesuffix(SUPERSEDED))
                if final.exists():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(old, final)  # its replacement never arrived

    def size(self) -> tuple[int, str]:
        """A checkpoint's bytes, and where the figure comes from: the newest complete checkpoint
        (its universal form aside), or the estimate."""
        latest = self.latest()
        if latest is None:
            return self.estimated_size, "estimated"
        if self._measured is None or self._measured[0] != latest:
            self._measured = (latest, sum(tree_bytes(p) for p in latest.iterdir() if p.name != UNIVERSAL))
        return self._measured[1], f"as {latest.name} does"

    def _warn_if_room_runs_out(self) -> None:
        size, source = self.size()
        free = free_bytes(self.folder)
        if free < 2 * size and not self._warned_of_space:
            self._warned_of_space = True
            log.warning(
                "%s has room for %d more checkpoint(s): %s free, and a checkpoint takes %s (%s). Free space, lower "
                "trainer.keep_last (now %d) or move trainer.run_dir before it runs out",
                self.folder, free // max(size, 1), size_text(free), size_text(size), source, self.keep_last,
            )  # fmt: skip

    def save(self, engine, step: int, rank_state: dict, trainer_state: dict) -> Path:
        tag = f"step_{step}"
        partial, final = self.folder / (tag + PARTIAL), self.folder / tag
        size, source = self.size()
        if self.rank == 0:
            self._warn_if_room_runs_out()
        needs = f"a checkpoint takes {size_text(size)} ({source})"
        with writing(self.folder, f"checkpoint {tag}", needs, setting="trainer.run_dir"):
            engine.save_checkpoint(str(self.folder), tag=partial.name, save_latest=False)
            _fault_injection_pause("FUSION_TRAIN_CHECKPOINT_PAUSE_S")
            torch.save({**rank_state, "rng": rng_states()}, partial / _rank_state_file(self.rank))
            dist.barrier()
            if self.rank == 0:
                marker = {**trainer_state, FILES: written_files(partial)}
                _write_atomically(partial / TRAINER_STATE, json.dumps(marker, indent=2) + "\n")  # the marker
                superseded = final.with_name(tag + SUPERSEDED)
                if final.exists():
                    os.rename(final, superseded)
                os.rename(partial, final)
                shutil.rmtree(superseded, ignore_errors=True)
                _write_atomically(self.folder / "latest", tag)
                self._prune()
        dist.barrier()
        return final

    def resume_advice(self) -> str:
        """What the next invocation resumes from, for a message that ends this one."""
        latest = self.latest()
        if latest is None:
            return "There is no complete checkpoint yet: the next invocation starts from the beginning"
        return f"{latest.name} is complete and intact: the same command resumes from it"

    def _prune(self) -> None:
        complete = self.complete()
        keep = {step for step, _ in complete[-self.keep_last :]}
        keep |= {step for step, _ in complete if self.keep_every and step % self.keep_every == 0}
        for step, path in complete:
            if step not in keep:
                doomed = path.with_name(path.name + PRUNING)
                shutil.rmtree(doomed, ignore_errors=True)  # an earlier attempt's leftover
                os.rename(path, doomed)
                _fault_injection_pause("FUSION_TRAIN_PRUNE_PAUSE_S")
                shutil.rmtree(doomed, ignore_errors=True)

    def check_intact(self, path: Path, saved: dict) -> None:
        """Every file the checkpoint was written with, at the size it was written (checkpoints from
        before the marker listed them are taken as they are); else one error, on every rank alike,
        before any rank starts loading and waits for the others."""
        damaged = [f"{name} is missing" if not (path / name).is_file() else
                   f"{name} has {(path / name).stat().st_size:,} bytes, written with {size:,}"
                   for name, size in saved.get(FILES, {}).items()
                   if not (path / name).is_file() or (path / name).stat().st_size != size]  # fmt: skip
        if damaged:
            earlier = self.latest_before(int(path.name.split("_")[1]))
            instead = f"trainer.resume_from={earlier}" if earlier else "a new run (no earlier complete checkpoint)"
            raise CheckpointError(f"{path} is damaged: {'; '.join(damaged[:3])}. Restore it, or resume from {instead}")

    def load_engine(self, engine, path: Path) -> None:
        """The model, optimizer and schedule from the checkpoint at `path` (or its universal form)."""
        engine.load_checkpoint(str(path.parent), tag=path.name)

    def universal(self, path: Path) -> Path:
        """The checkpoint at `path` in DeepSpeed's universal format, converted by rank 0 if it is
        not yet (the optimizer's fp32 partitions of every old rank read and merged per parameter)."""
        universal = path / UNIVERSAL
        if self.rank == 0 and not universal.is_dir():
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            partial = universal.with_name(UNIVERSAL + PARTIAL)
            shutil.rmtree(partial, ignore_errors=True)
            started = time.perf_counter()
            options = dict(input_folder=str(path), output_folder=str(partial), num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)  # fmt: skip
            with writing(path, f"the universal form of {path.name}", f"it takes about {size_text(self.size()[0])}",
                         setting="trainer.run_dir"):  # fmt: skip
                ds_to_universal(argparse.Namespace(**options))
            os.rename(partial, universal)
            log.warning("converted %s to DeepSpeed's universal format in %.1f s", path, time.perf_counter() - started)
        dist.barrier()
        return universal

    def load_rank_state(self, path: Path, rank: int | None = None) -> dict:
        """This rank's saved state, or another rank's (a new split reads every old rank's)."""
        return torch.load(path / _rank_state_file(self.rank if rank is None else rank), weights_only=True)
