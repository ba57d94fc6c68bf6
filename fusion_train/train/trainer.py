"""The training loop: micro-batches through the DeepSpeed engine up to each accumulation boundary,
checkpoints on a schedule and on preemption, automatic resume from the run's own latest
checkpoint. Everything else is an observer of the loop (`monitor/observer.py`, built in
`observers.py`): the metrics, kept on the device and reduced across ranks only on logged steps;
the monitors, which never change a step's maths; the divergence guard's actions; validation and
samples on their schedule."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from fusion_train.data.loader import build_loader
from fusion_train.model.size import parameter_counts
from fusion_train.monitor.loggers import Loggers
from fusion_train.monitor.observer import ROLLED_BACK, STOP, Window
from fusion_train.storage import WriteFailed, writing
from fusion_train.train import failure
from fusion_train.train.checkpoint import Checkpointer, restore_rng_states
from fusion_train.train.config import (
    ConfigError,
    TrainConfig,
    as_dict,
    bind_to_vocabulary,
    gradient_accumulation_steps,
    to_yaml,
)
from fusion_train.train.engine import announce_op_builds, build_engine, build_model, restart_adam, use_bf16
from fusion_train.train.expert_parallel import ExpertParallelError
from fusion_train.train.expert_parallel import check_layout as check_expert_layout
from fusion_train.train.expert_parallel import check_resume as check_expert_resume
from fusion_train.train.init_from import check_compatible, model_folder
from fusion_train.train.observers import build_observers
from fusion_train.train.plan import checkpoint_bytes
from fusion_train.train.run_lock import hold_run_folder
from fusion_train.train.sequence_parallel import SequenceParallel, SequenceParallelError
from fusion_train.train.signals import PreemptionFlag, requeue_slurm_job
from fusion_train.train.watchdog import COMPUTE, DATA, OPTIMIZER, Timeouts, Watchdog
from fusion_train.vocab import loss_group
from fusion_train.weights.training_checkpoint import read_trainer_state

log = logging.getLogger(__name__)
GUARD_EXIT = 3  # the divergence guard stopped the run


def per_sequence(sequence_parallel: int) -> str:
    return f" ({sequence_parallel} per sequence)" if sequence_parallel > 1 else ""


class Trainer:
    def __init__(self, cfg: TrainConfig, loader=None):
        """`loader`: batches from elsewhere than `cfg.data` (benchmarks feed synthetic ones); it needs
        the TokenLoader's iteration, state_dict/load_state_dict, stalled_read and `dataset.vocab`,
        `.names` and `.fingerprints`."""
        self.cfg = cfg
        if torch.cuda.is_available():  # one GPU per local rank, before any collective picks one
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        announce_op_builds()
        self.run_dir = Path(cfg.trainer.run_dir)
        timeouts = Timeouts(cfg.trainer.collective_timeout_s, cfg.trainer.long_operation_timeout_s)
        self.watchdog = Watchdog(
            self.run_dir, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), timeouts,
            stalled_read=lambda: self.loader.stalled_read(), resume_advice=lambda: self.checkpoints.resume_advice(),
        )  # fmt: skip
        deepspeed.init_distributed(timeout=timeouts.process_group())
        self.watchdog.connect()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        try:
            seq_lens = {"data.seq_len": cfg.data.seq_len}
            if cfg.eval_data.sources:
                seq_lens["eval_data.seq_len"] = cfg.eval_data.seq_len
            self.sequence = SequenceParallel.start(cfg.trainer.sequence_parallel, cfg.model, seq_lens)
            check_expert_layout(cfg.trainer.expert_parallel, self.world_size, cfg.model, cfg.deepspeed)
        except (SequenceParallelError, ExpertParallelError) as error:
            raise ConfigError(str(error)) from None
        # Each group of sequence-parallel ranks reads one stream of batches: the data-parallel split.
        self.data_rank, self.data_ranks = self.sequence.data_rank(self.rank), self.sequence.data_ranks(self.world_size)
        self.grad_accum = gradient_accumulation_steps(cfg, self.data_ranks)
        # The shards' vocabulary binds the model config before config.yaml records it.
        self.loader = loader or build_loader(cfg.data, self.data_rank, self.data_ranks)
        self.vocab = self.loader.dataset.vocab
        bind_to_vocabulary(cfg.model, self.vocab)
        self.run_lock = hold_run_folder(self.run_dir, self.rank, self.device, self._start_run_folder)

        estimated_size = checkpoint_bytes(parameter_counts(cfg.model).total, use_bf16(cfg))
        self.checkpoints = Checkpointer(
            self.run_dir / "checkpoints", self.rank, cfg.trainer.keep_last, cfg.trainer.keep_every, estimated_size
        )
        self.checkpoints.remove_leftovers()
        resume_from = Path(cfg.trainer.resume_from) if cfg.trainer.resume_from else self.checkpoints.latest()
        saved = read_trainer_state(resume_from) if resume_from else None
        if saved is not None:
            self.checkpoints.check_intact(resume_from, saved)
            try:
                check_expert_resume(saved, self.world_size, cfg.trainer.expert_parallel)
            except ExpertParallelError as error:
                raise ConfigError(f"{resume_from}: {error}") from None
        other_split = saved is not None and saved["world_size"] != self.world_size
        torch.manual_seed(cfg.trainer.seed)  # the same dropout on every run of this seed
        model = build_model(cfg, self.grad_accum, None if resume_from else self._pretrained())
        self.engine, self.optimizer, self.scheduler = build_engine(
            model, cfg, self.grad_accum, other_split, self.sequence
        )
        self.preemption = PreemptionFlag()
        self.model_inputs = ("input_ids", "labels", "in_video") + (("doc_ids",) if cfg.data.document_mask else ())
        self.loggers = Loggers()  # opened below, once the W&B run to continue is known
        self.observers = build_observers(self)
        self.step, self.tokens_seen, self.wandb_run_id = 0, 0, None
        if resume_from and cfg.trainer.init_from and self.rank == 0:
            log.warning(
                "trainer.init_from=%s is not used: the run resumes from its own checkpoint", cfg.trainer.init_from
            )
        self._resume(resume_from, saved)
        if self.rank == 0:
            self.wandb_run_id = self.loggers.open(
                self.run_dir, cfg.logging, as_dict(cfg), self.step, resume_from, self.wandb_run_id
            )

    def _start_run_folder(self) -> None:
        failure.clear(self.run_dir)
        with writing(self.run_dir, "config.yaml", setting="trainer.run_dir"):
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))

    # --- resume -------------------------------------------------------------------------------

    def _pretrained(self) -> Path | None:
        """The model folder whose weights a new run starts from (trainer.init_from), if any."""
        init_from = self.cfg.trainer.init_from
        if not init_from:
            return None
        folder = model_folder(Path(init_from), self.run_dir, self.rank)
        check_compatible(
            folder, self.cfg.model, self.vocab, self.loader.dataset.fingerprints, self.cfg.trainer.init_changes
        )
        if self.rank == 0:
            log.info("starting from the weights of %s, with a fresh optimizer, schedule and data order", folder)
        return folder

    def _resume(self, path: Path | None, saved: dict | None) -> None:
        """Continue from the checkpoint at `path`, if any. On another number of ranks the engine
        loads it through DeepSpeed's universal format, Adam's moments included; in another layout
        (ranks or sequence parallelism) the data goes on from every old data-parallel rank's
        position (the first rank of each old sequence-parallel group: the group read one stream)."""
        if path is None:
            return
        same_ranks = saved["world_size"] == self.world_size
        old_sequence_parallel = saved.get("sequence_parallel", 1)
        same_layout = same_ranks and old_sequence_parallel == self.sequence.size
        started = time.perf_counter()
        self.checkpoints.load_engine(self.engine, path if same_ranks else self.checkpoints.universal(path))
        if self.cfg.trainer.restart_optimizer:
            restart_adam(self.optimizer)
            if self.rank == 0:
                log.warning("trainer.restart_optimizer: Adam's moments start afresh at step %d", saved["step"])
        old_data_ranks = range(0, saved["world_size"], old_sequence_parallel)
        every_rank = lambda: [self.checkpoints.load_rank_state(path, r)["loader"] for r in old_data_ranks]  # noqa: E731
        if same_layout:
            rank_state = self.checkpoints.load_rank_state(path)
            self.loader.load_state_dict(rank_state["loader"], every_rank)
            restore_rng_states(rank_state["rng"])
        else:
            old_ranks = every_rank()
            # Its own old stream where the data-parallel split is unchanged (the loader checks which).
            self.loader.load_state_dict(old_ranks[self.data_rank % len(old_ranks)], lambda: old_ranks)
            if self.rank == 0:
                data = "starts anew" if self.cfg.data.restart_data_order else "continues the epoch (no sample repeated)"
                weights = "as saved" if same_ranks else "from its universal form"
                log.warning(
                    "%s was written by %d ranks%s and this run has %d%s: weights and optimizer state loaded %s, and "
                    "the data order %s", path, saved["world_size"], per_sequence(old_sequence_parallel),
                    self.world_size, per_sequence(self.sequence.size), weights, data,
                )  # fmt: skip
        self.step, self.tokens_seen, self.wandb_run_id = saved["step"], saved["tokens_seen"], saved["wandb_run_id"]
        for observer in self.observers:
            if observer.state_key and saved.get(observer.state_key):
                observer.load_state_dict(saved[observer.state_key])
        if self.rank == 0:
            seconds = time.perf_counter() - started
            log.warning(
                "resumed from %s at step %d (%d tokens seen) in %.2f s", path, self.step, self.tokens_seen, seconds
            )

    # --- the loop -----------------------------------------------------------------------------

    def train(self) -> int:
        """0 when the steps are done or a preemption was handled; GUARD_EXIT when the guard stops the run."""
        try:
            return self._train()
        except WriteFailed as failed:
            raise WriteFailed(f"{failed}. {self.checkpoints.resume_advice()}") from None
        finally:
            for observer in self.observers:
                observer.close()

    def _train(self) -> int:
        cfg = self.cfg.trainer
        batches = iter(self.loader)
        window = Window(self.observers, self.device, self.grad_accum)
        stop_at = min(cfg.steps, self.step + (cfg.stop_after_steps or cfg.steps))
        while self.step < stop_at:
            step = self.step + 1
            logged = step % self.cfg.logging.log_every == 0 or step == stop_at
            self._optimizer_step(step, logged, batches, window)
            self.watchdog.step_ended(step)
            self.step, self.tokens_seen = step, self.tokens_seen + cfg.global_batch_tokens
            window.steps += 1
            asked = [o.step_ended(step, sums) for o, sums in zip(self.observers, window.sums, strict=True)]
            if logged or any(asked):  # an observer asks for an unscheduled log: the guard, on an event
                self._log(window)
            verdict = self._after_step(step, window)
            if verdict == STOP:
                return GUARD_EXIT
            if verdict == ROLLED_BACK:
                continue  # from the rewritten checkpoint; the abandoned step is not saved
            preempted = self.preemption.anywhere(self.device)
            scheduled = cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == stop_at)
            if preempted or scheduled:
                self.save()
            if preempted:
                if self.rank == 0:
                    received = self.preemption.received
                    log.warning("stopping at step %d on %s", step, received.name if received else "a peer's signal")
                    requeue_slurm_job()
                break
        return 0

    def _optimizer_step(self, step: int, logged: bool, batches, window: Window) -> None:
        """The micro-batches of one optimizer step, the observers told of each."""
        for observer in self.observers:
            observer.step_started(step, logged)
        for micro in range(self.grad_accum):
            self.watchdog.beat(step, DATA, micro)
            batch = self._next_batch(batches)
            self.watchdog.beat(step, COMPUTE, micro)
            out = self._forward(batch)
            for observer, sums in zip(self.observers, window.sums, strict=True):
                observer.micro_batch(batch, out, sums)
            self.engine.backward(out.loss)
            if micro == self.grad_accum - 1:
                self.watchdog.beat(step, OPTIMIZER, micro)
                for observer in self.observers:
                    observer.before_optimizer_step()
            self.engine.step()  # applies the optimizer only at the accumulation boundary

    def _next_batch(self, batches) -> dict:
        """The next batch, its model inputs on the device, with the time this rank waited for it."""
        started = time.perf_counter()
        batch = next(batches)
        return {**self._on_device(batch), "data_wait_s": time.perf_counter() - started}

    def _on_device(self, batch: dict) -> dict:
        return {**batch, **{key: batch[key].to(self.device, non_blocking=True) for key in self.model_inputs}}

    def _forward(self, batch: dict):
        """The model's LossOutput for a batch whose inputs are on the device (this rank's part of its
        sequences under sequence parallelism; the loss is the whole sequences')."""
        doc_ids = batch["doc_ids"] if self.cfg.data.document_mask else None
        labels = batch["labels"]
        groups = loss_group(self.vocab.modality_of(labels), batch["in_video"])
        inputs = self.sequence.model_inputs(batch["input_ids"], labels, doc_ids, groups)
        return self.sequence.sequence_loss(self.engine(**inputs))

    def score(self, batch: dict):
        """The LossOutput of a batch as the loader gives it (validation scores held-out batches so)."""
        return self._forward(self._on_device(batch))

    def _log(self, window: Window) -> None:
        reduced, log_step = window.reduce(self.step, self.tokens_seen, self.world_size)
        metrics = {}
        for observer, sums in zip(self.observers, reduced, strict=True):
            metrics.update(observer.metrics(sums, log_step))
        self.loggers.log(metrics, self.step)
        window.reset()

    def _after_step(self, step: int, window: Window) -> str | None:
        """The observers' work after the step (the guard's actions, validation, samples), up to the
        first that ends the step; its time is not the window's training time."""
        started = time.perf_counter()
        try:
            for observer in self.observers:
                with self.watchdog.long_operation(step, f"in {type(observer).__name__}'s work after the step"):
                    verdict = observer.after_step(step)
                if verdict is not None:
                    return verdict
            return None
        finally:
            window.exclude(time.perf_counter() - started)

    # --- checkpoints and the end ----------------------------------------------------------------

    def save(self) -> Path:
        started = time.perf_counter()
        trainer_state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": self.world_size,
            "sequence_parallel": self.sequence.size,
            "expert_parallel": self.cfg.trainer.expert_parallel,
            "wandb_run_id": self.wandb_run_id,
            **{o.state_key: o.state_dict() for o in self.observers if o.state_key},
            "config": as_dict(self.cfg),
            # What a conversion needs, so that it needs neither the shards nor the tokenizers.
            "vocab": dataclasses.asdict(self.vocab),
            "tokenizer_fingerprints": self.loader.dataset.fingerprints,
        }
        with self.watchdog.long_operation(self.step, f"writing checkpoint step_{self.step}"):
            path = self.checkpoints.save(self.engine, self.step, {"loader": self.loader.state_dict()}, trainer_state)
        if self.rank == 0:
            log.info("checkpoint %s written in %.2f s", path, time.perf_counter() - started)
        return path

    def close_loggers(self) -> None:
        self.loggers.close()

    def close(self, keep_process_group: bool = False) -> None:
        """Tear down in an order that lets gloo's threads end before the interpreter does.
        `keep_process_group`: for a process that goes on with other work over the same ranks (the
        peer benchmarks train several systems in one launch)."""
        with self.watchdog.long_operation(self.step, "closing"):
            dist.barrier()
        self.watchdog.close()
        self.close_loggers()
        self.engine.destroy()
        del self.engine, self.optimizer, self.scheduler, self.loader
        gc.collect()
        if not keep_process_group:
            dist.destroy_process_group()
        if self.run_lock is not None:
            self.run_lock.release()
