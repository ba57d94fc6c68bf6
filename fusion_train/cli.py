"""Console entry points."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import warnings
from pathlib import Path

from fusion_train.model import convert


def _vocab_arguments(parser: argparse.ArgumentParser, when_missing: str) -> None:
    """The vocabulary sizes a source format may not record (vocab_size always comes from it)."""
    group = parser.add_argument_group(f"vocabulary layout ({when_missing})")
    group.add_argument("--image-codebook-size", type=int, help="image codes (an HF vocabulary map names them)")
    group.add_argument("--image-grid", type=int, help="codes per image side")
    group.add_argument("--n-reserved", type=int, help="reserved control ids")


def _vocab_sizes(args: argparse.Namespace) -> convert.VocabSizes:
    return convert.VocabSizes(args.image_codebook_size, args.image_grid, args.n_reserved)


def _convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusion-convert",
        description="Convert Chameleon weights between fusion_train, HF transformers and Meta's release.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, source: str, help_text: str, vocab_when_missing: str = "") -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(source)
        sub.add_argument("out_dir")
        if vocab_when_missing:
            _vocab_arguments(sub, vocab_when_missing)
        return sub

    command(
        "from-hf", "hf_dir", "HF ChameleonForConditionalGeneration folder -> fusion_train model folder",
        "needed only for an export that does not record it and is not of Chameleon's released sizes",
    )  # fmt: skip
    command("to-hf", "model_dir", "fusion_train model folder or training checkpoint -> HF folder")
    command(
        "from-meta", "meta_dir", "Meta params.json + consolidated*.pth -> fusion_train model folder",
        "Meta's format records none; defaults: Chameleon's 8192 codes, 32 x 32 grid, 1024 reserved",
    )  # fmt: skip
    command(
        "zero-to-safetensors", "checkpoint", "a run's checkpoints/step_N (any ZeRO stage) -> fusion_train model folder"
    )
    to_meta = command("to-meta", "model_dir", "fusion_train model folder -> Meta params.json + consolidated*.pth")
    to_meta.add_argument(
        "--model-parallel", type=int, default=None, help="shards to write (default: the model's qk_norm_groups)"
    )
    return parser


def convert_main(argv: list[str] | None = None) -> int:
    from fusion_train.train.init_from import checkpoint_to_model_folder, is_training_checkpoint

    args = _convert_parser().parse_args(argv)
    try:
        if args.command == "from-hf":
            out = convert.import_hf(args.hf_dir, args.out_dir, _vocab_sizes(args))
        elif args.command == "to-hf":
            model_dir = args.model_dir
            if is_training_checkpoint(model_dir):
                model_dir = checkpoint_to_model_folder(model_dir, Path(args.out_dir) / "fusion_train")
            out = convert.export_hf(model_dir, args.out_dir)
        elif args.command == "zero-to-safetensors":
            out = checkpoint_to_model_folder(args.checkpoint, args.out_dir)
        elif args.command == "from-meta":
            out = convert.import_meta(args.meta_dir, args.out_dir, _vocab_sizes(args))
        else:
            out = convert.export_meta(args.model_dir, args.out_dir, args.model_parallel)
    except (convert.ConversionError, ValueError) as err:
        print(f"fusion-convert {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _single_process_environment() -> None:
    """Run without a launcher as one rank (torchrun and SLURM set these)."""
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


TRAIN_USAGE = """fusion-train [--config-dir DIR] [HYDRA OVERRIDES...]

  fusion-train model=1b deepspeed=zero3 trainer.steps=1000
  fusion-train --config-dir my_conf data=my_corpus        # my_conf/data/my_corpus.yaml
  fusion-train +data.sources.mine.path=shards/mine +data.sources.mine.weight=2   # add a source
  fusion-train '~data' +data.sources.mine.path=shards/mine data.seq_len=4096    # only this source

--config-dir DIR (repeatable) adds DIR to the config search path after fusion_train's conf/: its
group options (DIR/data/NAME.yaml, DIR/model/NAME.yaml, ...) are selected by name.

--plan [--gpus N] prints the run's plan and writes RUN_DIR/plan.json without allocating anything:
parameters, FLOPs, batch, memory per GPU by component against trainer.gpu_memory_gb (and the first
setting to change when it does not fit), time per step and GPU-hours at trainer.plan_mfu on
trainer.gpu. N defaults to WORLD_SIZE, else 1.

  fusion-train --plan --gpus 64 model=34b deepspeed=zero3 trainer.global_batch_tokens=12582912
"""


def _train_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fusion-train", usage=TRAIN_USAGE, add_help=False)
    parser.add_argument("--config-dir", "-cd", action="append", default=[])
    parser.add_argument("--help", "-h", action="store_true")
    parser.add_argument("--plan", action="store_true")
    parser.add_argument("--gpus", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    parser.add_argument("overrides", nargs="*")
    return parser.parse_intermixed_args(argv)


def train_main(argv: list[str] | None = None) -> int:
    """`fusion-train [--config-dir DIR] [HYDRA OVERRIDES...]`: see TRAIN_USAGE."""
    from fusion_train.train.signals import exit_with_launcher

    exit_with_launcher()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fusion_train.data.manifest import DataError
    from fusion_train.train import failure
    from fusion_train.train.checkpoint import CheckpointError
    from fusion_train.train.config import ConfigError, gradient_accumulation_steps, load_config, validate
    from fusion_train.train.run_lock import RunFolderInUse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Deprecations inside torchdata and DeepSpeed, repeated by every rank, that a user cannot act on.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor. is deprecated")
    args = _train_arguments(sys.argv[1:] if argv is None else argv)
    if args.help:
        print(TRAIN_USAGE)
        return 0
    try:
        cfg = load_config(args.overrides, args.config_dir)
        validate(cfg)
        if args.plan:
            return _print_plan(cfg, args.gpus)
        gradient_accumulation_steps(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before anything is allocated
    except (ConfigError, DataError, ValueError, HydraException, OmegaConfBaseException) as err:
        return failure.fail_at_start(err)
    _single_process_environment()
    from fusion_train.train.trainer import Trainer
    from fusion_train.train.validation import ValidationError

    user_errors = (ConfigError, DataError, CheckpointError, RunFolderInUse, ValidationError)
    try:
        trainer = Trainer(cfg)
    except user_errors as err:
        _exit_now(failure.fail_at_start(err))
    try:
        code = trainer.train()
    except user_errors as err:
        trainer.close_loggers()
        _exit_now(failure.fail_in_training(err, trainer.run_dir))
    except Exception:
        code = failure.peer_failure(trainer.run_dir)  # this rank lost a peer that said why
        if code is None:
            raise
        trainer.close_loggers()
        _exit_now(code)
    trainer.close()
    return code


def _print_plan(cfg, gpus: int) -> int:
    from fusion_train.train.plan import make_plan, render, write_plan

    plan = make_plan(cfg, gpus)
    print(render(plan))
    print(f"wrote {write_plan(plan, Path(cfg.trainer.run_dir))}")
    return 0


def _exit_now(code: int) -> None:
    """Exit without the interpreter's finalisation: with the process group still up (a failure
    leaves no way to tear it down together), gloo's threads abort at exit and turn the exit code
    into SIGABRT."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
