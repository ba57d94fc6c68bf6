"""The training loop: micro-batches through the DeepSpeed engine up to each accumulation boundary,
metrics accumulated on the device and reduced across ranks only when logged, the divergence guard
after every optimizer step, checkpoints on a schedule and on preemption, automatic resume from the
run's own latest checkpoint. The monitors observe through hooks and never change a step's maths."""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from fusion_train.data.loader import build_loader
from fusion_train.generate.load import TrainedWith, recorded_tokenizer_paths
from fusion_train.model.size import flops_per_token
from fusion_train.monitor.activations import ActivationMonitor
from fusion_train.monitor.guard import DivergenceGuard, GuardEvent
from fusion_train.monitor.loggers import JsonlLogger, TensorBoardLogger, WandbLogger
from fusion_train.monitor.parameters import ParameterMonitor
from fusion_train.monitor.samples import TrainingSamples
from fusion_train.monitor.throughput import achieved_tflops, peak_memory_gb, reset_peak_memory
from fusion_train.train import failure
from fusion_train.train.checkpoint import Checkpointer, read_trainer_state, restore_rng_states
from fusion_train.train.config import ConfigError, TrainConfig, as_dict, gradient_accumulation_steps, to_yaml
from fusion_train.train.engine import announce_op_builds, build_engine, build_model, restart_adam
from fusion_train.train.faults import FaultInjector
from fusion_train.train.init_from import check_compatible, model_folder
from fusion_train.train.run_lock import hold_run_folder
from fusion_train.train.signals import PreemptionFlag, requeue_slurm_job
from fusion_train.train.sums import N_MODALITIES, add_modality_sums, modality_metrics, reduce_sums
from fusion_train.train.validation import ValidationError, Validator
from fusion_train.vocab import VocabLayout

log = logging.getLogger(__name__)
GUARD_EXIT = 3  # the divergence guard stopped the run


def image_token_ids(configured: list[int] | None, vocab: VocabLayout) -> list[int]:
    """The ids an untied model routes to its image copies: the shards' image codes."""
    ids = [vocab.image_code_start, vocab.image_code_end]
    if configured is not None and list(configured) != ids:
        raise ConfigError(
            f"model.image_token_ids={list(configured)} but the shards' image codes are ids {ids[0]}..{ids[1] - 1}: "
            "leave it unset, and the trainer takes it from the shards"
        )
    return ids


class Trainer:
    def __init__(self, cfg: TrainConfig, loader=None):
        """`loader`: batches from elsewhere than `cfg.data` (benchmarks feed synthetic ones); it needs
        the TokenLoader's iteration, state_dict/load_state_dict and `dataset.vocab`, `.names` and
        `.fingerprints`."""
        self.cfg = cfg
        if torch.cuda.is_available():  # one GPU per local rank, before any collective picks one
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        announce_op_builds()
        deepspeed.init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.grad_accum = gradient_accumulation_steps(cfg, self.world_size)
        self.run_dir = Path(cfg.trainer.run_dir)
        self.run_lock = hold_run_folder(self.run_dir, self.rank, self.device, self._start_run_folder)

        self.loader = loader or build_loader(cfg.data, self.rank, self.world_size)
        self.vocab = self.loader.dataset.vocab
        self.validator = (
            Validator(cfg.eval_data, cfg.trainer.eval_batches, self.loader.dataset, lambda batch: self._model_out(batch)[1],
                      self.rank, self.world_size, self.device)
            if cfg.eval_data.sources and cfg.trainer.eval_every
            else None
        )  # fmt: skip
        if self.vocab.vocab_size != cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} but the shards' vocabulary has {self.vocab.vocab_size} ids: "
                f"set model.vocab_size={self.vocab.vocab_size}"
            )
        if cfg.model.untie_modalities:
            cfg.model.image_token_ids = image_token_ids(cfg.model.image_token_ids, self.vocab)
        self.checkpoints = Checkpointer(
            self.run_dir / "checkpoints", self.rank, cfg.trainer.keep_last, cfg.trainer.keep_every
        )
        self.checkpoints.remove_leftovers()
        resume_from = Path(cfg.trainer.resume_from) if cfg.trainer.resume_from else self.checkpoints.latest()
        saved = read_trainer_state(resume_from) if resume_from else None
        other_split = saved is not None and saved["world_size"] != self.world_size
        torch.manual_seed(cfg.trainer.seed)  # the same dropout on every run of this seed
        model = build_model(cfg, self.grad_accum, None if resume_from else self._pretrained())
        self.engine, self.optimizer, self.scheduler = build_engine(model, cfg, self.grad_accum, other_split)
        self.preemption = PreemptionFlag()
        self._monitors(cfg)
        self.samples = self._training_samples()
        self.step, self.tokens_seen, self.wandb_run_id = 0, 0, None
        self.applied_lr = cfg.optim.lr  # the LR the last step ran with, for the log
        if resume_from and cfg.trainer.init_from and self.rank == 0:
            log.warning(
                "trainer.init_from=%s is not used: the run resumes from its own checkpoint", cfg.trainer.init_from
            )
        self.loggers = self._loggers(resumed_from=self._resume(resume_from, saved))

    def _start_run_folder(self) -> None:
        failure.clear(self.run_dir)
        (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))

    def _monitors(self, cfg: TrainConfig) -> None:
        model, monitor = self.engine.module, cfg.monitor
        # Faults first: their hooks run before the monitors' on the same block.
        self.faults = FaultInjector(cfg.faults, model.layers[-1], model.output)
        on = monitor.enabled
        self.activations = (
            ActivationMonitor(model.layers, self.device, monitor.attention_logits)
            if on and monitor.activations
            else None
        )
        self.parameters = ParameterMonitor(model, self.rank) if on and monitor.parameters else None
        self.guard = DivergenceGuard(monitor.guard) if on and monitor.guard.enabled else None
        self.last_event: tuple[str, int] | None = None  # (kind, step): alerts go out once per episode
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)

    # --- resume -------------------------------------------------------------------------------

    def _pretrained(self) -> Path | None:
        """The model folder whose weights a new run starts from (trainer.init_from), if any."""
        init_from = self.cfg.trainer.init_from
        if not init_from:
            return None
        folder = model_folder(Path(init_from), self.run_dir, self.rank)
        check_compatible(folder, self.cfg.model, self.vocab, self.loader.dataset.fingerprints)
        if self.rank == 0:
            log.warning("starting from the weights of %s, with a fresh optimizer, schedule and data order", folder)
        return folder

    def _resume(self, path: Path | None, saved: dict | None) -> Path | None:
        """Continue from the checkpoint at `path`, if any. On another number of ranks the engine
        loads it through DeepSpeed's universal format, Adam's moments included, and the data goes
        on from every old rank's position."""
        if path is None:
            return None
        same_ranks = saved["world_size"] == self.world_size
        started = time.perf_counter()
        self.checkpoints.load_engine(self.engine, path if same_ranks else self.checkpoints.universal(path))
        if self.cfg.trainer.restart_optimizer:
            restart_adam(self.optimizer)
            if self.rank == 0:
                log.warning("trainer.restart_optimizer: Adam's moments start afresh at step %d", saved["step"])
        every_rank = lambda: [self.checkpoints.load_rank_state(path, r)["loader"] for r in range(saved["world_size"])]  # noqa: E731
        if same_ranks:
            rank_state = self.checkpoints.load_rank_state(path)
            self.loader.load_state_dict(rank_state["loader"], every_rank)
            restore_rng_states(rank_state["rng"])
        else:
            old_ranks = every_rank()
            self.loader.load_state_dict(old_ranks[0], lambda: old_ranks)
            if self.rank == 0:
                data = "starts anew" if self.cfg.data.restart_data_order else "continues the epoch (no sample repeated)"
                log.warning(
                    "%s was written by %d ranks and this run has %d: weights and optimizer state loaded from its "
                    "universal form, and the data order %s", path, saved["world_size"], self.world_size, data,
                )  # fmt: skip
        self.step, self.tokens_seen, self.wandb_run_id = saved["step"], saved["tokens_seen"], saved["wandb_run_id"]
        if self.guard and saved.get("guard"):
            self.guard.load_state_dict(saved["guard"])
            self._apply_lr_factor(self.step + 1)
        if self.rank == 0:
            seconds = time.perf_counter() - started
            log.warning(
                "resumed from %s at step %d (%d tokens seen) in %.2f s", path, self.step, self.tokens_seen, seconds
            )
        return path

    def _loggers(self, resumed_from: Path | None) -> list:
        if self.rank != 0:
            return []
        jsonl = JsonlLogger(self.run_dir)
        jsonl.mark_start(self.step, resumed_from)
        loggers = [jsonl]
        if self.cfg.logging.wandb:
            c = self.cfg.logging
            wandb_logger = WandbLogger(
                self.run_dir, c.project, c.entity, c.group, c.tags, as_dict(self.cfg), self.wandb_run_id
            )
            self.wandb_run_id = wandb_logger.run_id
            loggers.append(wandb_logger)
        if self.cfg.logging.tensorboard:
            loggers.append(TensorBoardLogger(self.run_dir))
        return loggers

    # --- the loop -----------------------------------------------------------------------------

    def train(self) -> int:
        """0 when the steps are done or a preemption was handled; GUARD_EXIT when the guard stops the run."""
        cfg = self.cfg.trainer
        batches = iter(self.loader)
        show_progress = self.rank == 0 and cfg.progress_bar and sys.stderr.isatty()
        progress = tqdm(total=cfg.steps, initial=self.step, desc="training", disable=not show_progress)
        window, last_log = self._zero_sums(), time.perf_counter()
        stop_at = min(cfg.steps, self.step + (cfg.stop_after_steps or cfg.steps))
        while self.step < stop_at:
            logged = (self.step + 1) % self.cfg.logging.log_every == 0 or self.step + 1 == stop_at
            step_loss, parameter_metrics = self._optimizer_step(batches, window, logged)
            self.step += 1
            self.tokens_seen += cfg.global_batch_tokens
            self._apply_lr_factor(self.step + 1)
            progress.update()
            final_norm = self._end_of_step_norms(window)
            event = self.guard.check(self.step, *self._guard_values(step_loss, final_norm)) if self.guard else None
            if logged or event:
                self._log(window, time.perf_counter() - last_log, parameter_metrics, event)
                window, last_log = self._zero_sums(), time.perf_counter()
            verdict = self._act_on(event) if event else "go_on"
            if verdict == "stop":
                return GUARD_EXIT
            if verdict == "rolled_back":
                continue  # from the rewritten checkpoint; the abandoned step is neither validated nor saved
            if cfg.eval_every and self.step % cfg.eval_every == 0 and (self.validator or self.samples):
                if self.validator is not None:
                    self._validate()
                if self.samples is not None:
                    self._log_samples()
                last_log = time.perf_counter()
            preempted = self.preemption.anywhere(self.device)
            scheduled = cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == stop_at)
            if preempted or scheduled:
                self.save()
            if preempted:
                if self.rank == 0:
                    received = self.preemption.received
                    log.warning(
                        "stopping at step %d on %s", self.step, received.name if received else "a peer's signal"
                    )
                    requeue_slurm_job()
                break
        progress.close()
        return 0

    def _optimizer_step(self, batches, window: dict, logged: bool) -> tuple[torch.Tensor, dict]:
        """The micro-batches of one optimizer step; returns their mean loss (on the device) and, on
        logged steps, the per-group parameter statistics."""
        self.faults.begin_step(self.step + 1)
        self.applied_lr = self.scheduler.optimizer.param_groups[0]["lr"]
        if self.activations:
            self.activations.sample_attention_logits(logged)
        step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(self.grad_accum):
            if micro == 1 and self.activations:
                self.activations.sample_attention_logits(False)
            out = self._forward(self._next_batch(batches, window), window)
            step_loss += out.loss.detach()
            self.engine.backward(out.loss)
            if logged and self.parameters and micro == self.grad_accum - 1:
                self.parameters.before_step()
            self.engine.step()  # applies the optimizer only at the accumulation boundary
        self.faults.end_step()
        parameter_metrics = self.parameters.after_step() if logged and self.parameters else {}
        return step_loss / self.grad_accum, parameter_metrics

    def _next_batch(self, batches, window: dict) -> dict:
        started = time.perf_counter()
        batch = next(batches)
        window["data_wait_s"] += time.perf_counter() - started
        return batch

    def _zero_sums(self) -> dict[str, torch.Tensor]:
        """Per-log-window sums, kept on the device so that no step waits for the host."""
        zeros = lambda n=1: torch.zeros(n, dtype=torch.float64, device=self.device)  # noqa: E731
        sums = {
            "loss": zeros(), "z": zeros(), "micro_steps": zeros(), "skipped": zeros(), "checksum": zeros(),
            "ce": zeros(N_MODALITIES), "logz": zeros(N_MODALITIES), "count": zeros(N_MODALITIES),
            "documents": zeros(len(self.loader.dataset.names)), "data_wait_s": zeros(),
        }  # fmt: skip
        if self.activations:
            sums["block_rms"] = zeros(len(self.engine.module.layers))
        if self.activations and self.cfg.model.untie_modalities:
            sums["modality_rms"], sums["modality_micro_batches"] = zeros(2 * len(self.engine.module.layers)), zeros(2)
        return sums

    def _model_out(self, batch: dict) -> tuple[torch.Tensor, dict]:
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        doc_ids = batch["doc_ids"].to(self.device, non_blocking=True) if self.cfg.data.document_mask else None
        label_modality = self.vocab.modality_of(labels)
        return input_ids, self.engine(input_ids, labels=labels, doc_ids=doc_ids, label_modality=label_modality)

    def _forward(self, batch: dict, sums: dict):
        input_ids, out = self._model_out(batch)
        sums["loss"] += out.loss.detach()
        sums["z"] += out.z
        sums["micro_steps"] += 1
        sums["skipped"] += batch["skipped_samples"].sum().to(self.device)
        sums["documents"] += batch["documents_per_source"].sum(0).to(self.device)
        # Which tokens, in which order: equal checksums say two runs read the same data.
        positions = torch.arange(1, input_ids.numel() + 1, device=self.device, dtype=torch.float64)
        sums["checksum"] += (input_ids.flatten().double() * positions).sum() % 2**40
        add_modality_sums(out, sums)
        return out

    def _end_of_step_norms(self, window: dict) -> torch.Tensor | None:
        """This step's block-output RMS joins the window; the last block's is the guard's."""
        if not self.activations:
            return None
        block_rms = self.activations.take_block_rms()
        window["block_rms"] += block_rms
        if "modality_rms" in window:
            modality_rms, micro_batches = self.activations.take_modality_rms()
            window["modality_rms"] += modality_rms.flatten()
            window["modality_micro_batches"] += micro_batches
        return block_rms[-1]

    def _guard_values(self, step_loss: torch.Tensor, final_norm: torch.Tensor | None) -> tuple:
        """The step's loss, gradient norm and final-layer norm, the same on every rank: the one host
        sync per optimizer step that a decision at that step needs."""
        grad_norm = self.engine.get_global_grad_norm()  # a device tensor or a float; None before any step
        grad_norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, device=self.device)
        norm = final_norm if final_norm is not None else torch.zeros((), device=self.device)
        values = torch.stack([v.double().reshape(()) for v in (step_loss, grad_norm, norm)])
        dist.all_reduce(values)
        loss, grad, norm = (values / self.world_size).tolist()
        return loss, grad, (norm if final_norm is not None else None)

    def _apply_lr_factor(self, next_step: int) -> None:
        """After a rollback the guard may lower the scheduled LR for a while."""
        if not self.guard or self.cfg.monitor.guard.rollback_lr_factor == 1.0:
            return
        factor = self.guard.lr_factor(next_step)
        for group, scheduled in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = scheduled * factor

    # --- the guard's actions --------------------------------------------------------------------

    def _act_on(self, event: GuardEvent) -> str:
        """warn: alert and go on; stop: checkpoint (unless the weights are no longer finite), then
        "stop"; rollback: reload the checkpoint before the event, skip the data read since, then
        "rolled_back" (or "stop" when there is none, or too many rollbacks)."""
        action = self.cfg.monitor.guard.action
        episode_goes_on = self.last_event == (event.kind, event.step - 1)
        self.last_event = (event.kind, event.step)
        if action != "warn" or not episode_goes_on:  # every step of an episode is logged, its first alerted
            self._alert(f"{event.kind} at step {event.step}", f"{event.message}; action: {action}", event.step)
        if action == "warn":
            return "go_on"
        if action == "rollback":
            target = self.checkpoints.latest_before(event.step)
            if target is not None and self.guard.can_roll_back():
                self._roll_back(event, target)
                return "rolled_back"
            reason = (
                f"the run has rolled back {len(self.guard.rollbacks)} times, monitor.guard.max_rollbacks="
                f"{self.cfg.monitor.guard.max_rollbacks}: the run looks hopeless, change the LR, data or recipe"
                if target is not None
                else f"there is no checkpoint before step {event.step} to roll back to"
            )
            return self._stop(event, reason, save=False)
        return self._stop(event, "monitor.guard.action=stop", save=event.kind != "nonfinite")

    def _stop(self, event: GuardEvent, reason: str, save: bool) -> str:
        path = self.save() if save else self.checkpoints.latest()
        if self.rank == 0:
            state = "written" if save else "left as the last good checkpoint (this step's state is not saved)"
            log.error("divergence guard stops the run: %s; %s. Checkpoint %s %s", event.message, reason, path, state)
        return "stop"

    def _roll_back(self, event: GuardEvent, target: Path) -> None:
        saved = read_trainer_state(target)
        self.checkpoints.load_engine(self.engine, target)
        skipped_batches = (self.step - saved["step"]) * self.grad_accum
        self.guard.rolled_back(event, saved["step"], skipped_batches)
        self.step, self.tokens_seen = saved["step"], saved["tokens_seen"]
        self._apply_lr_factor(self.step + 1)
        # Rewrite it with the data position past the skipped batches: a later resume skips them too.
        self.save()
        if self.rank == 0:
            log.warning(
                "rolled back to %s (rollback %d of at most %d): %d micro-batches per rank skipped",
                target, len(self.guard.rollbacks), self.cfg.monitor.guard.max_rollbacks, skipped_batches,
            )  # fmt: skip

    def _alert(self, title: str, text: str, step: int) -> None:
        if self.rank == 0:
            log.warning("divergence guard: %s", text)
        for logger in self.loggers:
            logger.alert(title, text, step)

    # --- validation and samples ------------------------------------------------------------------

    def _training_samples(self) -> TrainingSamples | None:
        if not (self.cfg.eval_samples.prompts and self.cfg.trainer.eval_every):
            return None
        trained_with = TrainedWith(
            self.vocab, recorded_tokenizer_paths(self.cfg.data), self.loader.dataset.fingerprints
        )
        try:  # the prompts are encoded now: a missing image or tokenizer is an error before any step
            return TrainingSamples(
                self.cfg.eval_samples, trained_with, self.device, self.rank, self.cfg.deepspeed.zero_stage
            )
        except ValueError as err:
            raise ConfigError(f"eval_samples: {err}") from None

    def _log_samples(self) -> None:
        samples, seconds = self.samples.generate(self.engine.module)
        for logger in self.loggers:
            logger.log_samples(samples, self.step)
            logger.log({"samples/seconds": seconds}, self.step)

    def _validate(self) -> None:
        """A failed validation loses no training: the state is saved before the error ends the run."""
        try:
            metrics = self.validator.evaluate(self.engine, self.step)
        except ValidationError as error:
            path = self.save()
            raise ValidationError(
                f"{error}. The training state of step {self.step} is saved in {path}: fix the held-out data "
                "(eval_data) and start again to resume, or resume without validation (trainer.eval_every=0)"
            ) from None
        for logger in self.loggers:
            logger.log({**metrics, "data/tokens_seen": self.tokens_seen}, self.step)

    def _log(self, window: dict, seconds: float, parameter_metrics: dict, event: GuardEvent | None) -> None:
        reduced = reduce_sums(window)
        micro_steps = reduced["micro_steps"].item()
        steps = micro_steps / self.grad_accum / self.world_size
        tokens_per_s = steps * self.cfg.trainer.global_batch_tokens / seconds
        tflops = achieved_tflops(tokens_per_s, self.flops_per_token, self.world_size)
        metrics = {
            "loss/total": reduced["loss"].item() / micro_steps,
            "loss/z": reduced["z"].item() / micro_steps,
            **modality_metrics(reduced),
            "grad/norm": float(self.engine.get_global_grad_norm() or 0.0),
            **parameter_metrics,
            "optim/lr": self.applied_lr,  # the logged step's
            "data/tokens_seen": self.tokens_seen,
            "data/skipped": reduced["skipped"].item(),
            "data/checksum": reduced["checksum"].item(),
            **self._source_fractions(reduced["documents"]),
            "perf/step_time_s": seconds / steps,
            "perf/tokens_per_s": tokens_per_s,
            "perf/tflops": tflops,
            "perf/mfu": tflops / self.cfg.monitor.peak_tflops,
            **self._maxima(window, steps),
        }
        if self.activations:
            block_rms = (reduced["block_rms"] / (steps * self.world_size)).tolist()
            metrics.update({f"norms/block_{i}_out": v for i, v in enumerate(block_rms)})
            metrics["norms/final_out"] = block_rms[-1]
        if "modality_rms" in reduced:
            metrics.update(self._modality_norms(reduced["modality_rms"], reduced["modality_micro_batches"]))
        if event:
            metrics.update({f"guard/{event.kind}": event.value, "guard/rollbacks": len(self.guard.rollbacks)})
        for logger in self.loggers:
            logger.log(metrics, self.step)

    @staticmethod
    def _modality_norms(sums: torch.Tensor, micro_batches: torch.Tensor) -> dict:
        """norms/block_{i}_out_{text,image} of an untied model: each modality's copies' output RMS."""
        means, counts = (sums.view(-1, 2) / micro_batches.clamp(min=1)).tolist(), micro_batches.tolist()
        return {
            f"norms/block_{i}_out_{modality}": row[m]
            for i, row in enumerate(means)
            for m, modality in enumerate(("text", "image"))
            if counts[m] > 0
        }

    def _source_fractions(self, documents: torch.Tensor) -> dict:
        total = documents.sum().item()
        names = self.loader.dataset.names
        return (
            {f"data/source_{name}_frac": n / total for name, n in zip(names, documents.tolist(), strict=True)}
            if total
            else {}
        )

    def _maxima(self, window: dict, steps: float) -> dict:
        """The largest over ranks: memory, data wait, attention logits (sampled on this step)."""
        values = {
            "perf/mem_gb": torch.tensor([peak_memory_gb(self.device)], dtype=torch.float64, device=self.device),
            "perf/data_wait_s": window["data_wait_s"] / steps,
        }
        if self.activations and self.cfg.monitor.attention_logits:
            values["attn"] = self.activations.take_qk_logit_max().double()
        reduced = {k: v.tolist() for k, v in reduce_sums(values, dist.ReduceOp.MAX).items()}
        reset_peak_memory(self.device)
        metrics = {"perf/mem_gb": reduced["perf/mem_gb"][0], "perf/data_wait_s": reduced["perf/data_wait_s"][0]}
        if "attn" in reduced and all(math.isfinite(v) for v in reduced["attn"]):
            metrics.update({f"attn/qk_logit_max_{i}": v for i, v in enumerate(reduced["attn"])})
            metrics["attn/qk_logit_max"] = max(reduced["attn"])
        return metrics

    # --- checkpoints and the end ----------------------------------------------------------------

    def save(self) -> Path:
        started = time.perf_counter()
        trainer_state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": self.world_size,
            "wandb_run_id": self.wandb_run_id,
            "guard": self.guard.state_dict() if self.guard else None,
            "config": as_dict(self.cfg),
            # What a conversion needs, so that it needs neither the shards nor the tokenizers.
            "vocab": dataclasses.asdict(self.vocab),
            "tokenizer_fingerprints": self.loader.dataset.fingerprints,
        }
        path = self.checkpoints.save(self.engine, self.step, {"loader": self.loader.state_dict()}, trainer_state)
        if self.rank == 0:
            log.info("checkpoint %s written in %.2f s", path, time.perf_counter() - started)
        return path

    def close_loggers(self) -> None:
        for logger in self.loggers:
            logger.close()  # before any exit, or an offline W&B run loses its history
        self.loggers = []

    def close(self) -> None:
        """Tear down in an order that lets gloo's threads end before the interpreter does."""
        dist.barrier()
        self.close_loggers()
        self.engine.destroy()
        del self.engine, self.optimizer, self.scheduler, self.loader
        gc.collect()
        dist.destroy_process_group()
        if self.run_lock is not None:
            self.run_lock.release()
