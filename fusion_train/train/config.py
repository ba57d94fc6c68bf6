"""The training configuration: structured dataclasses, one per Hydra group, so that a misspelled
key or a wrong type is an error when the config is composed, and the batch arithmetic checked
before anything is allocated.

`fusion-train` composes `conf/config.yaml` with Hydra's compose API rather than `@hydra.main`:
every rank gets the same config and no per-rank, per-second output folder; the run folder is
`trainer.run_dir`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fusion_train.data.loader import DataConfig
from fusion_train.model.chameleon import ChameleonConfig
from fusion_train.monitor.config import MonitorConfig, SamplesConfig
from fusion_train.monitor.guard import check_config as check_guard_config
from fusion_train.train.checkpoint import check_retention
from fusion_train.train.faults import FaultConfig
from fusion_train.vocab import Modality, VocabLayout

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
SCHEDULES = ("warmup_exponential", "warmup_cosine")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1  # not on norms or biases
    grad_clip: float = 1.0
    schedule: str = "warmup_exponential"  # Chameleon pretraining; warmup_cosine for SFT
    warmup_steps: int = 4000
    final_lr_ratio: float = 0.01  # the exponential decay ends at this fraction of lr ("toward 0")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    bf16: bool = True  # on GPU; CPU runs train in fp32, where bf16 is slower
    # null: on with several data-parallel ranks, off with one (engine.py: zero_settings)
    overlap_comm: bool | None = None
    contiguous_gradients: bool | None = None
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000


@dataclass
class LoggingConfig:
    log_every: int = 10
    wandb: bool = True
    project: str = "fusion_train"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    tensorboard: bool = False  # RUN_DIR/tensorboard as well (pip install tensorboard)


@dataclass
class DownstreamTask:
    """A small downstream task run inside training every trainer.eval_every steps (train/downstream.py)."""

    name: str = "task"  # its metrics are downstream/NAME/...
    # multiple_choice: `path` is JSONL of {"context", "choices": [...], "answer": index}, scored by
    # log-likelihood (acc, and acc_norm per character as lm-eval's); caption: `annotations` is a
    # COCO captions file over the pictures in `images`, scored by CIDEr and BLEU-4.
    kind: str = "multiple_choice"
    path: str | None = None
    annotations: str | None = None
    images: str | None = None
    limit: int = 200  # the first N examples: a fixed subset, the same at every call
    batch_size: int = 8  # sequences per forward (multiple choice: per rank)
    shots: int = 0  # caption: examples before each picture asked about
    max_new_tokens: int = 24  # caption
    chat: bool = False  # caption: prompts end as SFT prompts do (a fine-tuning run)


@dataclass
class TrainerConfig:
    run_dir: str = "runs/default"
    steps: int = 1000
    global_batch_tokens: int = 2**23  # Chameleon-7B: 8,388,608 tokens per optimizer step
    checkpoint_every: int = 1000  # and at the end; 0: only on preemption (benchmarks)
    keep_last: int = 3  # newest checkpoints kept (at least 1) ...
    keep_every: int = 0  # ... plus every keep_every-th step (0: none)
    resume_from: str | None = None  # a checkpoint folder; default: this run's latest
    # A new run's initial weights: a fusion_train model folder or a training checkpoint (optimizer,
    # schedule, step and data order start afresh); not used once the run has its own checkpoint.
    init_from: str | None = None
    # Model settings (model.NAME) this run changes from init_from's on purpose, as a stage does
    # (+stage=sft: dropout): logged as information; any other change is warned about.
    init_changes: list[str] = field(default_factory=list)
    # On resume, Adam's moments and step count start afresh (the weights, schedule, step and data
    # go on): after changing optim.beta1/beta2/eps, say. A fresh Adam takes full-size steps at first.
    restart_optimizer: bool = False
    stop_after_steps: int | None = None  # this invocation's steps, then checkpoint and exit (time-limited jobs)
    seed: int = 0
    activation_checkpointing: bool = False
    compile: bool = False
    # Ranks that share each sequence, each holding data.seq_len / N of its positions (DeepSpeed-Ulysses,
    # train/sequence_parallel.py); data parallelism is the ranks / N.
    sequence_parallel: int = 1
    # Ranks over which each modality's experts are spread (model.experts), each holding
    # per_modality / N of them (train/expert_parallel.py); 1: every rank holds every expert.
    expert_parallel: int = 1
    progress_bar: bool = True
    # A rank that makes no progress for this long ends the invocation with every rank's stacks in
    # RUN_DIR/hang/ and exit 75 (train/watchdog.py): inside a training step, from the invocation's
    # second step on (the longest normal gap is one micro-batch's forward and backward or the
    # optimizer step, seconds even at 34B) ...
    collective_timeout_s: float = 100.0
    # ... and before that (rendezvous, building, loading and converting a checkpoint, the first
    # step's compile) and around checkpoint writes, validation, samples and rollbacks.
    long_operation_timeout_s: float = 900.0
    eval_every: int = 0  # steps between validations on `eval_data` (0: none)
    # Downstream tasks run every eval_every steps inside the training processes, logged as
    # downstream/<name>/<metric> (OLMo-core's in-loop evaluation): a few hundred examples each.
    eval_tasks: list[DownstreamTask] = field(default_factory=list)
    # Micro-batches per rank and held-out source at most: a smaller source is scored once in full,
    # a larger one on the same first batches each time; null: always in full.
    eval_batches: int | None = 50
    # What `fusion-train --plan` plans for: the GPU (a100 or h100, for its bf16 peak), its memory,
    # and the model FLOPs utilisation without activation checkpointing (with it, each forward runs
    # twice and a step takes 4/3 as long).
    gpu: str = "h100"
    gpu_memory_gb: float = 80.0
    plan_mfu: float = 0.4


@dataclass
class TrainConfig:
    model: ChameleonConfig = field(default_factory=ChameleonConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval_data: DataConfig = field(default_factory=DataConfig)  # held-out shards; no sources: no validation
    eval_samples: SamplesConfig = field(default_factory=SamplesConfig)  # prompts generated at each validation
    faults: FaultConfig = field(default_factory=FaultConfig)  # injected on purpose, to test the guard


class ConfigError(ValueError):
    pass


ConfigStore.instance().store(name="schema", node=TrainConfig)


def load_config(overrides: list[str] | None = None, user_config_dirs: list[str | Path] = ()) -> TrainConfig:
    """`conf/config.yaml` with the overrides; `user_config_dirs` are searched after `conf/` for the
    group options and files they add (Hydra's `--config-dir`, the same as `hydra.searchpath`)."""
    try:
        return OmegaConf.to_object(compose_config(overrides, user_config_dirs))
    except AttributeError as err:  # OmegaConf merging a mapping into a setting that is null
        key = re.search(r"full_key: (\S+)", str(err))
        setting = key[1] if key else "a setting"
        raise ConfigError(
            f"{setting} is null in the config and takes no mapping from the command line: set it in a config file "
            "(a group option, as +stage=long_context does)"
        ) from None


def compose_config(
    overrides: list[str] | None, user_config_dirs: list[str | Path] = (), hydra_node: bool = False
) -> DictConfig:
    """The composed config before it becomes dataclasses; with `hydra_node`, Hydra's own settings
    too (`hydra.runtime.choices`, `hydra.sweeper.params`)."""
    overrides = list(overrides or [])
    if user_config_dirs:
        overrides.append(_search_path_override(overrides, [Path(d) for d in user_config_dirs]))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_node)


def _search_path_override(overrides: list[str], folders: list[Path]) -> str:
    """A user's folder can add options, never replace ours: Hydra finds `conf/` first, so a file
    of the same name there would be ignored without a word. Refuse it instead."""
    if any(o.startswith("hydra.searchpath=") for o in overrides):
        raise ConfigError("give your config folders either as --config-dir or as hydra.searchpath=[...], not both")
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(f"--config-dir {folder}: no such folder")
        shadowed = sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*.yaml") if (CONFIG_DIR / p.relative_to(folder)).exists()
        )
        if shadowed:
            raise ConfigError(
                f"--config-dir {folder}: {', '.join(shadowed)} has the name of a fusion_train option in {CONFIG_DIR}, "
                "which Hydra finds first and would use instead: rename yours (e.g. data/my_corpus.yaml) and select it "
                "(data=my_corpus)"
            )
    return "hydra.searchpath=[" + ",".join(f"file://{f.resolve()}" for f in folders) + "]"


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def as_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def weights_spread_over_ranks(cfg: TrainConfig) -> bool:
    """Whether each rank holds only part of the weights (ZeRO-3; experts spread over ranks), so that
    every forward, in generation too, needs every rank."""
    return cfg.deepspeed.zero_stage == 3 or cfg.trainer.expert_parallel > 1


def gradient_accumulation_steps(cfg: TrainConfig, data_parallel_size: int) -> int:
    """Micro-steps per optimizer step for the global batch; any inconsistency is an error that
    says what to change."""
    seq_len, micro = cfg.data.seq_len, cfg.data.micro_batch_size
    if seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    per_micro_step = micro * seq_len * data_parallel_size
    steps, remainder = divmod(cfg.trainer.global_batch_tokens, per_micro_step)
    if remainder or steps == 0:
        lower = max(per_micro_step, steps * per_micro_step)
        raise ConfigError(
            f"trainer.global_batch_tokens={cfg.trainer.global_batch_tokens:,} is not a positive multiple of "
            f"data.micro_batch_size x data.seq_len x ranks = {micro} x {seq_len} x {data_parallel_size} = "
            f"{per_micro_step:,}: set trainer.global_batch_tokens to {lower:,} or {lower + per_micro_step:,}, "
            "or change the micro-batch, sequence length or number of ranks"
        )
    return steps


def bind_to_vocabulary(model: ChameleonConfig, vocab: VocabLayout) -> None:
    """Make the model config the shards' vocabulary's: the same size, and for an untied model (or
    one with expert groups per modality) the ids it routes to its image and audio copies, the
    vocabulary's codes (written into the config, so that checkpoints and exports carry them)."""
    if vocab.vocab_size != model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} but the shards' vocabulary has {vocab.vocab_size} ids: "
            f"set model.vocab_size={vocab.vocab_size}"
        )
    if not model.routes_by_modality:
        return
    for modality in (Modality.IMAGE, Modality.AUDIO):
        name = f"{modality.key}_token_ids"
        ids = [list(r) for r in vocab.id_ranges(modality)]
        ids = ids[0] if ids else None
        if getattr(model, name) is not None and list(getattr(model, name)) != ids:
            raise ConfigError(
                f"model.{name}={list(getattr(model, name))} but the shards' {modality.key} codes are "
                f"{'ids ' + str(ids[0]) + '..' + str(ids[1] - 1) if ids else 'none'}: leave it unset, and the "
                "trainer takes it from the shards"
            )
        setattr(model, name, ids)


def validate(cfg: TrainConfig) -> None:
    if cfg.optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={cfg.optim.schedule!r}: choose one of {SCHEDULES}")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: choose 0, 1, 2 or 3")
    if cfg.trainer.checkpoint_every < 0 or cfg.logging.log_every <= 0:
        raise ConfigError("logging.log_every must be positive and trainer.checkpoint_every positive or 0 (none)")
    if cfg.trainer.eval_tasks and not cfg.trainer.eval_every:
        raise ConfigError("trainer.eval_tasks run every trainer.eval_every steps: set trainer.eval_every")
    if cfg.eval_samples.prompts and not cfg.trainer.eval_every:
        raise ConfigError("eval_samples has prompts, generated every trainer.eval_every steps: set trainer.eval_every")
    if cfg.eval_data.document_mask:
        raise ConfigError("eval_data.document_mask: held-out data is attended as training's is; set data.document_mask")
    if not 0 < cfg.trainer.collective_timeout_s <= cfg.trainer.long_operation_timeout_s:
        raise ConfigError(
            f"trainer.collective_timeout_s={cfg.trainer.collective_timeout_s:g} must be positive and at most "
            f"trainer.long_operation_timeout_s={cfg.trainer.long_operation_timeout_s:g}"
        )
    if cfg.trainer.eval_batches is not None and cfg.trainer.eval_batches < 1:
        raise ConfigError("trainer.eval_batches must be positive, or null to score the held-out set in full")
    try:
        check_guard_config(cfg.monitor.guard)
        check_retention(cfg.trainer.keep_last, cfg.trainer.keep_every)
    except ValueError as error:
        raise ConfigError(str(error)) from error
