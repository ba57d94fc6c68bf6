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


TRAIN_USAGE = """fusion-train [--config-dir DIR] [--cfg job|hydra|all [-p KEY]] [-m [--nproc N]] [HYDRA OVERRIDES...]

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

--cfg job prints the composed config and exits (hydra: Hydra's own settings; all: both); -p KEY
prints only that part, e.g. `--cfg job -p model`; --resolve resolves interpolations first.

-m/--multirun runs one training per point of the grid that comma lists, range() and choice() in the
overrides (and hydra.sweeper.params in an experiment file) make, one after another, each in
trainer.run_dir/KEY=VALUE,...; run the same command again and the points that ended are skipped and
an interrupted one resumes. --nproc N runs each point with torchrun on N local ranks.

  fusion-train -m optim.lr=1e-3,1e-2 model.qk_norm=true,false trainer.run_dir=runs/lr_sweep
  fusion-train -m +experiment=stability
"""


def _train_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fusion-train", usage=TRAIN_USAGE, add_help=False)
    parser.add_argument("--config-dir", "-cd", action="append", default=[])
    parser.add_argument("--help", "-h", action="store_true")
    parser.add_argument("--plan", action="store_true")
    parser.add_argument("--cfg", "-c", choices=("job", "hydra", "all"))
    parser.add_argument("--package", "-p")
    parser.add_argument("--resolve", action="store_true")
    parser.add_argument("--multirun", "-m", action="store_true")
    parser.add_argument("--nproc", type=int, default=1)
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
    from fusion_train.lab.sweep import SweepInterrupted
    from fusion_train.train import failure
    from fusion_train.train.checkpoint import CheckpointError
    from fusion_train.train.config import ConfigError, gradient_accumulation_steps, load_config, validate
    from fusion_train.train.config_help import describe
    from fusion_train.train.run_lock import RunFolderInUse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Deprecations inside torchdata and DeepSpeed, repeated by every rank, that a user cannot act on.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor. is deprecated")
    args = _train_arguments(sys.argv[1:] if argv is None else argv)
    try:
        if args.help:
            print(f"{TRAIN_USAGE}\n{describe(args.config_dir)}")
            return 0
        if args.cfg:
            return _print_config(args)
        if args.multirun:
            return _multirun(args)
        cfg = load_config(args.overrides, args.config_dir)
        validate(cfg)
        if args.plan:
            return _print_plan(cfg, args.gpus)
        gradient_accumulation_steps(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before anything is allocated
    except (ConfigError, DataError, ValueError, HydraException, OmegaConfBaseException, SweepInterrupted) as err:
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


def _print_config(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from fusion_train.train.config import ConfigError, compose_config

    composed = compose_config(args.overrides, args.config_dir, hydra_node=args.cfg != "job")
    parts = {"job": [k for k in composed if k != "hydra"], "hydra": ["hydra"], "all": list(composed)}[args.cfg]
    config = OmegaConf.masked_copy(composed, parts)
    if args.package:
        config = OmegaConf.select(config, args.package, default=None)
        if config is None:
            raise ConfigError(f"-p {args.package}: the composed config has no such key")
    print(OmegaConf.to_yaml(config, resolve=args.resolve) if OmegaConf.is_config(config) else config)
    return 0


def _multirun(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from fusion_train.lab.sweep import default_launcher, expand, fixed_overrides, run_sweep
    from fusion_train.train.config import compose_config, load_config, validate

    composed = compose_config(fixed_overrides(args.overrides), args.config_dir, hydra_node=True)
    params = OmegaConf.to_container(composed.hydra.sweeper.params) if composed.hydra.sweeper.params else {}
    common, points = expand(args.overrides, {k: str(v) for k, v in params.items()})
    for point in points:  # every point composes and validates before the first one runs
        validate(load_config([*common, *point.overrides], args.config_dir))
    config_dirs = [f"--config-dir={d}" for d in args.config_dir]
    records = run_sweep(Path(composed.trainer.run_dir), common, points, [*default_launcher(args.nproc), *config_dirs])
    failed = [r["name"] for r in records if r["returncode"] != 0]
    print(f"{len(records)} sweep points in {composed.trainer.run_dir}; {len(failed)} ended with an error: {failed}")
    return 0


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
