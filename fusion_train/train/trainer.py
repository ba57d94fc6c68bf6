"""The training loop: micro-batches through the DeepSpeed engine up to each accumulation boundary,
metrics accumulated on the device and reduced across ranks only when logged, checkpoints on a
schedule and on preemption, automatic resume from the run's own latest checkpoint."""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys
import time
from itertools import islice
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from fusion_train.data.loader import build_loader
from fusion_train.model.chameleon import Chameleon
from fusion_train.monitor.loggers import JsonlLogger, WandbLogger
from fusion_train.train.checkpoint import Checkpointer, read_trainer_state, restore_rng_states
from fusion_train.train.config import ConfigError, TrainConfig, as_dict, gradient_accumulation_steps, to_yaml
from fusion_train.train.engine import build_engine
from fusion_train.train.signals import PreemptionFlag, requeue_slurm_job
from fusion_train.vocab import Modality

log = logging.getLogger(__name__)
N_MODALITIES = len(Modality)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        deepspeed.init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.grad_accum = gradient_accumulation_steps(cfg, self.world_size)
        self.run_dir = Path(cfg.trainer.run_dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        dist.barrier()

        self.loader = build_loader(cfg.data, self.rank, self.world_size)
        # Read from its start at every validation, in the main process: the same held-out batches each time.
        self.eval_loader = (
            build_loader(dataclasses.replace(cfg.eval_data, num_workers=0), self.rank, self.world_size)
            if cfg.eval_data.sources and cfg.trainer.eval_every
            else None
        )
        self.vocab = self.loader.dataset.vocab
        if self.vocab.vocab_size != cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} but the shards' vocabulary has {self.vocab.vocab_size} ids"
            )
        torch.manual_seed(cfg.trainer.seed)  # the same initial weights on every rank
        self.engine, self.optimizer, self.scheduler = build_engine(Chameleon(cfg.model), cfg, self.grad_accum)
        self.checkpoints = Checkpointer(
            self.run_dir / "checkpoints", self.rank, cfg.trainer.keep_last, cfg.trainer.keep_every
        )
        self.checkpoints.remove_partials()
        self.preemption = PreemptionFlag()
        self.step, self.tokens_seen, self.wandb_run_id = 0, 0, None
        self._resume()
        self.loggers = self._loggers()

    # --- resume -------------------------------------------------------------------------------

    def _resume(self) -> None:
        resume_from = self.cfg.trainer.resume_from
        path = Path(resume_from) if resume_from else self.checkpoints.latest()
        if path is None:
            return
        saved = read_trainer_state(path)
        same_split = saved["world_size"] == self.world_size
        if not same_split and not self.cfg.data.restart_data_order:
            raise ConfigError(
                f"{path} was written by {saved['world_size']} ranks and this run has {self.world_size}: resume "
                "with the same number of ranks, or set data.restart_data_order=true to continue from its weights "
                "with a new data order and a fresh optimizer state"
            )
        started = time.perf_counter()
        self.checkpoints.load_engine(self.engine, path, load_optimizer=same_split)
        if same_split:
            rank_state = self.checkpoints.load_rank_state(path)
            self.loader.load_state_dict(rank_state["loader"])
            restore_rng_states(rank_state["rng"])
        self.step, self.tokens_seen, self.wandb_run_id = saved["step"], saved["tokens_seen"], saved["wandb_run_id"]
        if self.rank == 0:
            seconds = time.perf_counter() - started
            log.warning(
                "resumed from %s at step %d (%d tokens seen) in %.2f s", path, self.step, self.tokens_seen, seconds
            )

    def _loggers(self) -> list:
        if self.rank != 0:
            return []
        loggers = [JsonlLogger(self.run_dir)]
        if self.cfg.logging.wandb:
            c = self.cfg.logging
            wandb_logger = WandbLogger(
                self.run_dir, c.project, c.entity, c.group, c.tags, as_dict(self.cfg), self.wandb_run_id
            )
            self.wandb_run_id = wandb_logger.run_id
            loggers.append(wandb_logger)
        return loggers

    # --- the loop -----------------------------------------------------------------------------

    def train(self) -> int:
        cfg = self.cfg.trainer
        batches = iter(self.loader)
        show_progress = self.rank == 0 and cfg.progress_bar and sys.stderr.isatty()
        progress = tqdm(total=cfg.steps, initial=self.step, desc="training", disable=not show_progress)
        sums = self._zero_sums()
        last_log = time.perf_counter()
        stop_at = min(cfg.steps, self.step + (cfg.stop_after_steps or cfg.steps))
        while self.step < stop_at:
            for _ in range(self.grad_accum):
                self._micro_step(next(batches), sums)
            self.step += 1
            self.tokens_seen += cfg.global_batch_tokens
            progress.update()
            if self.step % self.cfg.logging.log_every == 0 or self.step == stop_at:
                self._log(sums, time.perf_counter() - last_log)
                sums, last_log = self._zero_sums(), time.perf_counter()
            if self.eval_loader is not None and self.step % cfg.eval_every == 0:
                self.evaluate()
                last_log = time.perf_counter()
            preempted = self.preemption.anywhere(self.device)
            if preempted or self.step % cfg.checkpoint_every == 0 or self.step == stop_at:
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

    def _zero_sums(self) -> dict[str, torch.Tensor]:
        """Per-log-window sums, kept on the device so that no step waits for the host."""
        zeros = lambda n=1: torch.zeros(n, dtype=torch.float64, device=self.device)  # noqa: E731
        return {
            "loss": zeros(), "z": zeros(), "micro_steps": zeros(), "skipped": zeros(), "checksum": zeros(),
            "ce": zeros(N_MODALITIES), "logz": zeros(N_MODALITIES), "count": zeros(N_MODALITIES),
        }  # fmt: skip

    def _forward(self, batch: dict, sums: dict):
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        out = self.engine(input_ids, labels=labels, label_modality=self.vocab.modality_of(labels))
        sums["loss"] += out.loss.detach()
        sums["z"] += out.z
        sums["micro_steps"] += 1
        sums["skipped"] += batch["skipped_samples"].sum().to(self.device)
        # Which tokens, in which order: equal checksums say two runs read the same data.
        positions = torch.arange(1, input_ids.numel() + 1, device=self.device, dtype=torch.float64)
        sums["checksum"] += (input_ids.flatten().double() * positions).sum() % 2**40
        sums["ce"] += out.ce_sum_by_modality
        sums["logz"] += out.logz_sum_by_modality
        sums["count"] += out.count_by_modality
        return out

    def _micro_step(self, batch: dict, sums: dict) -> None:
        out = self._forward(batch, sums)
        self.engine.backward(out.loss)
        self.engine.step()  # applies the optimizer only at the accumulation boundary

    def evaluate(self) -> None:
        sums = self._zero_sums()
        self.engine.eval()
        with torch.no_grad():
            for batch in islice(iter(self.eval_loader), self.cfg.trainer.eval_batches):
                self._forward(batch, sums)
        self.engine.train()
        reduced = self._reduce(sums)
        metrics = {"eval/loss": reduced["loss"].item() / reduced["micro_steps"].item()}
        metrics.update({f"eval/{k.replace('/', '_')}": v for k, v in self._modality_metrics(reduced).items()})
        for logger in self.loggers:
            logger.log(metrics, self.step)

    @staticmethod
    def _reduce(sums: dict) -> dict:
        flat = torch.cat(list(sums.values()))
        dist.all_reduce(flat)
        return dict(zip(sums, flat.split([len(v) for v in sums.values()]), strict=True))

    @staticmethod
    def _modality_metrics(reduced: dict) -> dict:
        metrics = {}
        for modality in Modality:
            count = reduced["count"][modality].item()
            if count:
                name = modality.name.lower()
                metrics[f"loss/{name}"] = reduced["ce"][modality].item() / count
                metrics[f"logits/logZ_mean_{name}"] = reduced["logz"][modality].item() / count
        return metrics

    def _log(self, sums: dict, seconds: float) -> None:
        reduced = self._reduce(sums)
        steps = reduced["micro_steps"].item() / self.grad_accum / self.world_size
        metrics = {
            "loss/total": reduced["loss"].item() / reduced["micro_steps"].item(),
            "loss/z": reduced["z"].item() / reduced["micro_steps"].item(),
            "optim/lr": self.scheduler.get_last_lr()[0],
            "grad/norm": float(self.engine.get_global_grad_norm() or 0.0),
            "data/tokens_seen": self.tokens_seen,
            "data/skipped": reduced["skipped"].item(),
            "data/checksum": reduced["checksum"].item(),
            "perf/step_time_s": seconds / steps,
            "perf/tokens_per_s": steps * self.cfg.trainer.global_batch_tokens / seconds,
            **self._modality_metrics(reduced),
        }
        for logger in self.loggers:
            logger.log(metrics, self.step)

    # --- checkpoints and the end ----------------------------------------------------------------

    def save(self) -> Path:
        started = time.perf_counter()
        trainer_state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": self.world_size,
            "wandb_run_id": self.wandb_run_id,
            "config": as_dict(self.cfg),
        }
        path = self.checkpoints.save(self.engine, self.step, {"loader": self.loader.state_dict()}, trainer_state)
        if self.rank == 0:
            log.info("checkpoint %s written in %.2f s", path, time.perf_counter() - started)
        return path

    def close(self) -> None:
        """Tear down in an order that lets gloo's threads end before the interpreter does."""
        dist.barrier()
        for logger in self.loggers:
            logger.close()  # before any exit, or an offline W&B run loses its history
        self.engine.destroy()
        del self.engine, self.optimizer, self.scheduler, self.loader
        gc.collect()
        dist.destroy_process_group()
