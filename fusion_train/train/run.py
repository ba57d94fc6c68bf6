"""One training run on this rank, from overrides to exit code: what `fusion-train` does when it is
asked to train and what `python -m fusion_train.train` (the entry torchrun and srun start on every
rank) does always. A bad config, data or checkpoint ends it with one `fusion-train: error:` line
and exit code 2 (`failure.py`); a peer's failure ends it quietly with the peer's message."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import warnings

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from fusion_train.data.manifest import DataError
from fusion_train.train import failure
from fusion_train.train.config import ConfigError, TrainConfig, gradient_accumulation_steps, load_config, validate
from fusion_train.train.signals import exit_with_launcher

START_ERRORS = (ConfigError, DataError, ValueError, HydraException, OmegaConfBaseException)
ENTRY_USAGE = """python -m fusion_train.train [--config-dir DIR] [HYDRA OVERRIDES...]

One training run: what torchrun and srun start on each rank. fusion-train is the same run and also
plans it (--plan), prints its config (--cfg) and sweeps (-m): see fusion-train --help."""


def prepare_process() -> None:
    """Before anything else in a rank: die with the launcher, log to stderr, and silence the
    deprecations inside torchdata and DeepSpeed that every rank repeats and no user can act on."""
    exit_with_launcher()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor. is deprecated")


def single_process_environment() -> None:
    """Run without a launcher as one rank (torchrun and SLURM set these)."""
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def run_training(overrides: list[str], config_dirs: list[str]) -> int:
    """Compose and check the config (before anything is allocated), then train."""
    try:
        cfg = load_config(overrides, config_dirs)
        validate(cfg)
        gradient_accumulation_steps(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except START_ERRORS as err:
        return failure.fail_at_start(err)
    return train(cfg)


def train(cfg: TrainConfig) -> int:
    single_process_environment()
    # DeepSpeed binds its logger to stdout when it is first imported, and prints as it loads its
    # ops: its words belong in the log (stderr) with everyone else's.
    with contextlib.redirect_stdout(sys.stderr):
        from fusion_train.train.trainer import Trainer
    from fusion_train.storage import WriteFailed
    from fusion_train.train.run_lock import RunFolderInUse
    from fusion_train.train.validation import ValidationError
    from fusion_train.weights.training_checkpoint import CheckpointError

    user_errors = (ConfigError, DataError, CheckpointError, RunFolderInUse, ValidationError, WriteFailed)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            trainer = Trainer(cfg)
    except user_errors as err:
        _exit_now(failure.fail_at_start(err))
    try:
        code = trainer.train()
    except user_errors as err:
        code = failure.fail_in_training(err, trainer.run_dir)
        _close_loggers_after_failure(trainer)
        _exit_now(code)
    except Exception as error:
        code = failure.peer_failure(trainer.run_dir)  # this rank lost a peer that said why
        if code is None:  # or one that could not: killed, its node lost
            code = trainer.watchdog.lost_a_peer(error, signalled=trainer.preemption.received is not None)
        if code is None:
            raise
        _close_loggers_after_failure(trainer)
        _exit_now(code)
    trainer.close()
    return code


def _close_loggers_after_failure(trainer) -> None:
    """Flush what the loggers hold (an offline W&B run loses its history unless closed); on a full
    disk that fails too, and the message already said why."""
    try:
        trainer.close_loggers()
    except Exception as error:
        logging.getLogger(__name__).warning("the loggers could not be closed: %s", error)


def _exit_now(code: int) -> None:
    """Exit without the interpreter's finalisation: with the process group still up (a failure
    leaves no way to tear it down together), gloo's threads abort at exit and turn the exit code
    into SIGABRT."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """`python -m fusion_train.train`: ENTRY_USAGE."""
    prepare_process()
    parser = argparse.ArgumentParser(prog="python -m fusion_train.train", usage=ENTRY_USAGE, add_help=False)
    parser.add_argument("--config-dir", "-cd", action="append", default=[])
    parser.add_argument("--help", "-h", action="store_true")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.help:
        print(ENTRY_USAGE)
        return 0
    options = [a for a in rest if a.startswith("-")]
    if options:
        return failure.fail_at_start(
            ConfigError(f"{options[0]} is an option of fusion-train, not of the per-rank entry: run "
                        f"`fusion-train {options[0]} ...` (python -m fusion_train.train takes --config-dir and overrides)")
        )  # fmt: skip
    return run_training(rest, args.config_dir)
