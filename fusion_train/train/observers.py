"""The observers of a run, in the order the loop calls them: the faults first (their hooks run
before the monitors' on the same modules), then the metrics, the monitors the config turns on,
the guard's actions (after the norms they read; before validation, which a rollback skips), the
scheduled evaluations (validation, samples, downstream tasks), the progress bar, and the user's own (`monitor.observers`)."""

from __future__ import annotations

import importlib
import sys

from fusion_train.data.trained_with import TrainedWith, recorded_tokenizer_paths
from fusion_train.model.size import flops_per_token
from fusion_train.monitor.activations import ActivationMonitor
from fusion_train.monitor.experts import RouterMonitor
from fusion_train.monitor.metrics import DataMetrics, LossMetrics, OptimizerMetrics
from fusion_train.monitor.observer import Observer, RunInfo
from fusion_train.monitor.parameters import ParameterMonitor
from fusion_train.monitor.progress import ProgressBar
from fusion_train.monitor.samples import TrainingSamples
from fusion_train.monitor.throughput import Throughput
from fusion_train.train.config import ConfigError, weights_spread_over_ranks
from fusion_train.train.downstream import ScheduledDownstream
from fusion_train.train.faults import FaultInjector
from fusion_train.train.guard_actions import GuardActions
from fusion_train.train.validation import ScheduledValidation


def build_observers(trainer) -> list[Observer]:
    cfg, monitor, model = trainer.cfg, trainer.cfg.monitor, trainer.engine.module
    on = monitor.enabled
    observers = [
        FaultInjector(cfg.faults, model.layers[-1], model.output),
        LossMetrics(),
        DataMetrics(trainer.loader.dataset.names, trainer.device, trainer.sequence.counts_data),
        OptimizerMetrics(trainer.engine, trainer.scheduler.optimizer),
    ]
    activations = None
    if on and monitor.activations:
        untied = bool(cfg.model.untie_modalities)
        activations = ActivationMonitor(model.layers, trainer.device, monitor.attention_logits, untied)
        observers.append(activations)
    if on and monitor.parameters:
        observers.append(ParameterMonitor(model, trainer.rank))
    routers = RouterMonitor(model.layers) if on and cfg.model.experts else None
    if routers:
        observers.append(routers)
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    observers.append(Throughput(trainer.device, cfg.trainer.global_batch_tokens, flops, monitor.peak_tflops))
    if on and monitor.guard.enabled:
        observers.append(GuardActions(trainer, activations, routers))
    if cfg.eval_data.sources and cfg.trainer.eval_every:
        observers.append(ScheduledValidation(trainer))
    if cfg.eval_samples.prompts and cfg.trainer.eval_every:
        observers.append(_training_samples(trainer))
    if cfg.trainer.eval_tasks:
        observers.append(ScheduledDownstream(trainer))
    if trainer.rank == 0 and cfg.trainer.progress_bar and sys.stderr.isatty():
        observers.append(ProgressBar(cfg.trainer.steps))
    run = RunInfo(cfg, model, trainer.vocab, trainer.device, trainer.rank, trainer.world_size)
    return observers + [user_observer(path, run) for path in monitor.observers]


def _training_samples(trainer) -> TrainingSamples:
    cfg, dataset = trainer.cfg, trainer.loader.dataset
    trained_with = TrainedWith(trainer.vocab, recorded_tokenizer_paths(cfg.data), dataset.fingerprints)
    try:  # the prompts are encoded now: a missing image or tokenizer is an error before any step
        model = trainer.engine.module
        return TrainingSamples(cfg.eval_samples, trained_with, model, trainer.loggers, cfg.trainer.eval_every,
                               trainer.device, trainer.rank, weights_spread_over_ranks(cfg),
                               lambda: trainer.sequence.unsharded(model))  # fmt: skip
    except ValueError as err:
        raise ConfigError(f"eval_samples: {err}") from None


def user_observer(path: str, run: RunInfo) -> Observer:
    """`package.module:Class`, made with the run's RunInfo."""
    module_name, _, class_name = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name) if class_name else None
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"monitor.observers: {path} cannot be loaded ({err}): is its module on PYTHONPATH?") from None
    if not (isinstance(found, type) and issubclass(found, Observer)):
        raise ConfigError(
            f"monitor.observers: {path} is not an Observer class (fusion_train.monitor.observer.Observer): "
            "name one as package.module:Class"
        )
    return found(run)
