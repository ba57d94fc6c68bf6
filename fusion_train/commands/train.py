"""`fusion-train`: train, plan a run, print its config, or sweep: see TRAIN_USAGE."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from fusion_train.lab.sweep import SweepInterrupted, default_launcher, expand, fixed_overrides, run_sweep
from fusion_train.train import failure
from fusion_train.train.config import ConfigError, compose_config, load_config, validate
from fusion_train.train.config_help import describe
from fusion_train.train.plan import bind_to_shards_here, make_plan, render, video_lengths, write_plan
from fusion_train.train.run import START_ERRORS, prepare_process, run_training

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
    parser.add_argument("--nproc", type=int)
    parser.add_argument("--gpus", type=int)
    parser.add_argument("overrides", nargs="*")
    return parser.parse_intermixed_args(argv)


# Flags that belong to one mode; given without it they are an error rather than silently ignored.
MODE_OF = {"gpus": "plan", "nproc": "multirun", "package": "cfg", "resolve": "cfg"}
SPELLED = {"gpus": "--gpus", "nproc": "--nproc", "package": "-p/--package", "resolve": "--resolve",
           "plan": "--plan", "multirun": "-m/--multirun", "cfg": "--cfg"}  # fmt: skip


def _check_modes(args: argparse.Namespace) -> None:
    for flag, mode in MODE_OF.items():
        if getattr(args, flag) not in (None, False) and not getattr(args, mode):
            raise ConfigError(
                f"{SPELLED[flag]} applies to {SPELLED[mode]}: add {SPELLED[mode]}, or leave {SPELLED[flag]} out"
            )


def main(argv: list[str] | None = None) -> int:
    """`fusion-train [--config-dir DIR] [HYDRA OVERRIDES...]`: see TRAIN_USAGE."""
    prepare_process()
    args = _train_arguments(sys.argv[1:] if argv is None else argv)
    try:
        _check_modes(args)
        if args.help:
            print(f"{TRAIN_USAGE}\n{describe(args.config_dir)}")
            return 0
        if args.cfg:
            return _print_config(args)
        if args.multirun:
            return _multirun(args)
        if args.plan:
            cfg = load_config(args.overrides, args.config_dir)
            validate(cfg)
            return _print_plan(cfg, args.gpus or int(os.environ.get("WORLD_SIZE", "1")))
    except (*START_ERRORS, SweepInterrupted) as err:
        return failure.fail_at_start(err)
    return run_training(args.overrides, args.config_dir)


def _print_config(args: argparse.Namespace) -> int:
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
    composed = compose_config(fixed_overrides(args.overrides), args.config_dir, hydra_node=True)
    params = OmegaConf.to_container(composed.hydra.sweeper.params) if composed.hydra.sweeper.params else {}
    common, points = expand(args.overrides, {k: str(v) for k, v in params.items()})
    for point in points:  # every point composes and validates before the first one runs
        validate(load_config([*common, *point.overrides], args.config_dir))
    config_dirs = [f"--config-dir={d}" for d in args.config_dir]
    records = run_sweep(
        Path(composed.trainer.run_dir), common, points, [*default_launcher(args.nproc or 1), *config_dirs]
    )
    failed = [r["name"] for r in records if r["returncode"] != 0]
    print(f"{len(records)} sweep points in {composed.trainer.run_dir}; {len(failed)} ended with an error: {failed}")
    return 0


def _print_plan(cfg, gpus: int) -> int:
    bind_to_shards_here(cfg)
    plan = {**make_plan(cfg, gpus), "videos": video_lengths(cfg)}
    print(render(plan))
    print(f"wrote {write_plan(plan, Path(cfg.trainer.run_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
