"""Sweeps: one `fusion-train` run per point of a grid of overrides, one after another, each in a run
folder of its own under the sweep's folder. A point whose run ended is not run again, so an
interrupted sweep is resumed by running the same command: the unfinished point resumes from its
last checkpoint (the trainer's own resume), the points after it start.

The grid is Hydra's multirun syntax (`optim.lr=1e-3,1e-2`, `range(...)`, `choice(...)`), from the
command line and from `hydra.sweeper.params` in the composed config (an experiment file sets it);
the command line wins for a key given in both, as in Hydra.
"""

from __future__ import annotations

import itertools
import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

log = logging.getLogger(__name__)

POINT_RECORD = "sweep_point.json"  # written in a point's run folder when its run has ended
SWEEP_RECORD = "sweep.json"  # in the sweep's folder: the command and the points


@dataclass
class Point:
    overrides: list[str]  # this point's own values, e.g. ["optim.lr=0.01", "+variant=plain"]

    @property
    def name(self) -> str:
        """Hydra's `override_dirname`: key=value pairs sorted by key, without the `+` or `~`."""
        pairs = sorted(o.lstrip("+~") for o in self.overrides)
        return ",".join(pairs).replace("/", "_") or "point"


def expand(overrides: list[str], sweeper_params: dict[str, str] | None = None) -> tuple[list[str], list[Point]]:
    """The overrides every point shares, and the points: the product of the sweep axes, in order."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    given = {o.key_or_group for o in parsed}
    from_config = parser.parse_overrides([f"{key}={value}" for key, value in (sweeper_params or {}).items()])
    parsed += [o for o in from_config if o.key_or_group not in given]
    common = [o.input_line for o in parsed if not o.is_sweep_override()]
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed if o.is_sweep_override()]
    return common, [Point(list(values)) for values in itertools.product(*axes)]


def fixed_overrides(overrides: list[str]) -> list[str]:
    """The overrides that are not sweeps: what the sweep's own settings are composed from."""
    return [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]


class SweepInterrupted(RuntimeError):
    pass


def ended(folder: Path) -> dict | None:
    """The record of a point whose run ended (whatever its exit code), else None."""
    record = folder / POINT_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def reached_last_step(folder: Path) -> bool:
    """Whether the run's latest checkpoint is its last step's (a preempted run also exits 0)."""
    config, latest = folder / "config.yaml", folder / "checkpoints" / "latest"
    if not (config.is_file() and latest.is_file()):
        return False
    return latest.read_text().strip() == f"step_{yaml.safe_load(config.read_text())['trainer']['steps']}"


def run_sweep(root: Path, common: list[str], points: list[Point], launcher: list[str]) -> list[dict]:
    """Runs the unfinished points, one after another; returns every point's record."""
    if "'" in str(root):
        raise ValueError(f"sweep folder {root}: a quote in its path cannot be passed to Hydra; choose another")
    root.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ValueError(f"two sweep points share a folder name: {names}")
    (root / SWEEP_RECORD).write_text(
        json.dumps({"common": common, "points": [{"name": p.name, "overrides": p.overrides} for p in points]}, indent=1)
    )
    records = []
    for index, point in enumerate(points, 1):
        folder = root / point.name
        record = ended(folder)
        if record is not None:
            log.info("sweep point %d/%d %s ended before (exit %d): not run again", index, len(points), point.name,
                     record["returncode"])  # fmt: skip
        else:
            run_dir = f"trainer.run_dir='{folder}'"  # quoted: the folder's name holds = and ,
            record = _run_point(point, folder, [*launcher, *common, *point.overrides, run_dir])
        records.append(record)
    return records


def _run_point(point: Point, folder: Path, command: list[str]) -> dict:
    log.info("sweep point %s: %s", point.name, shlex.join(command))
    started = time.time()
    returncode = subprocess.run(command).returncode
    if returncode < 0 or (returncode == 0 and not reached_last_step(folder)):
        raise SweepInterrupted(
            f"sweep point {point.name} stopped before its last step (exit {returncode}); run the same command "
            "again to resume it and run the points after it"
        )
    record = {"name": point.name, "overrides": point.overrides, "returncode": returncode,
              "seconds": round(time.time() - started, 1)}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)  # a run that failed at its start made none
    (folder / POINT_RECORD).write_text(json.dumps(record, indent=1))
    return record


def default_launcher(nproc: int) -> list[str]:
    """One process per point, or torchrun with `nproc` ranks on this machine."""
    if nproc <= 1:
        return [sys.executable, "-m", "fusion_train.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "fusion_train.train"]  # fmt: skip
