"""Validation on the held-out sources, every rank together: the loss per source and per target
modality, and over all of them (per target token: `eval/loss` is cross-entropy without z-loss);
every `trainer.eval_every` steps as an observer of the loop (`ScheduledValidation`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

from fusion_train.data.held_out import HeldOutSet
from fusion_train.data.manifest import DataError
from fusion_train.monitor.metrics import add_modality_sums, modality_metrics, modality_sums
from fusion_train.monitor.observer import Observer, reduce_sums
from fusion_train.train import failure

log = logging.getLogger(__name__)


class ValidationError(RuntimeError):
    """Validation failed; raised on every rank together, after the training state is saved."""


class Validator:
    def __init__(self, eval_data, eval_batches: int | None, training_data, score: Callable[[dict], object],
                 rank: int, world_size: int, device: torch.device, data_split: tuple[int, int] | None = None,
                 counts_reads: bool = True):  # fmt: skip
        """`training_data`: the training mixture, whose vocabulary and tokenizers the held-out shards
        must share; `score(batch)`: the model's LossOutput for a batch, with label modalities.
        `data_split`: (this rank's, of how many) shares of the held-out data, if not (rank,
        world_size): the ranks that share sequences read the same batches, and only the first of
        them counts the samples read (`counts_reads`)."""
        data_rank, data_ranks = data_split or (rank, world_size)
        self.held_out = HeldOutSet(eval_data, data_rank, data_ranks, training_data.vocab, training_data.fingerprints,
                                   eval_batches)  # fmt: skip
        self.score, self.eval_data, self.eval_batches = score, eval_data, eval_batches
        self.rank, self.world_size, self.device = rank, world_size, device
        self.counts_reads = counts_reads
        self.coverage_logged = False

    def evaluate(self, engine, step: int) -> dict:
        """The metrics of every held-out source in turn, with the engine in eval mode meanwhile."""
        engine.eval()
        try:
            by_source = {name: self._score_source(name, step) for name in self.held_out.names}
        finally:
            engine.train()
        totals = {key: sum(r[key] for r in by_source.values()) for key in ("ce", "logz", "count")}
        metrics = held_out_metrics("eval", totals)
        for name, reduced in by_source.items():
            metrics.update(held_out_metrics(f"eval/{name}", reduced))
            metrics[f"eval/{name}/samples"] = reduced["read"][0].item()
        if self.rank == 0 and not self.coverage_logged:
            for name, reduced in by_source.items():
                scored, skipped = (int(v) for v in reduced["read"].tolist())
                coverage = self.held_out.coverage(name, scored, skipped)
                log.info("validation of held-out source %s: %s", name, coverage.describe(self.eval_batches))
            self.coverage_logged = True
        return metrics

    def _score_source(self, name: str, step: int) -> dict:
        """Cross-entropy sums of one held-out source over all ranks. A rank whose share has ended
        scores a padding batch while others go on; any rank's error ends it on every rank."""
        sums = {
            name: torch.zeros(d.size, dtype=torch.float64, device=self.device) for name, d in modality_sums().items()
        }
        batches, error = self.held_out.batches(name), None
        while True:
            batch = None
            if error is None:
                try:
                    batch = next(batches, None)
                except Exception as err:  # noqa: BLE001 - any rank's failure must reach all of them
                    error = err
            if not self._any_rank_goes_on(batch is not None, error, name, step):
                break
            try:
                with torch.no_grad():
                    add_modality_sums(self.score(batch or self.held_out.padding_batch()), sums)
            except Exception as err:  # noqa: BLE001
                log.exception("rank %d: scoring a batch of held-out source %s failed", self.rank, name)
                error = err
        read = self.held_out.read_counts(name) if self.counts_reads else (0, 0)
        sums["read"] = torch.tensor(read, dtype=torch.float64, device=self.device)
        return reduce_sums(sums)

    def _any_rank_goes_on(self, has_batch: bool, error: Exception | None, name: str, step: int) -> bool:
        """Whether any rank has a held-out batch left; raises ValidationError on every rank when
        any rank failed. The ranks agree before each forward (ZeRO-3 gathers parameters inside
        it): one host sync per held-out micro-batch."""
        status = torch.tensor([has_batch, error is not None], dtype=torch.float64, device=self.device)
        dist.all_reduce(status, op=dist.ReduceOp.MAX)
        goes_on, failed = status.tolist()
        if failed:
            messages = [None] * self.world_size
            dist.all_gather_object(messages, describe(error) if error else None)
            rank, message = next((r, m) for r, m in enumerate(messages) if m)
            path = self.eval_data.sources[name].path
            raise ValidationError(
                f"validation at step {step} failed on held-out source {name} ({path}), rank {rank}: {message}"
            )
        return bool(goes_on)


class ScheduledValidation(Observer):
    """Validation after every `trainer.eval_every`-th step. A failed validation loses no training:
    the state is saved before the error ends the run."""

    def __init__(self, trainer):
        cfg = trainer.cfg
        self.trainer, self.every = trainer, cfg.trainer.eval_every
        self.validator = Validator(cfg.eval_data, cfg.trainer.eval_batches, trainer.loader.dataset, trainer.score,
                                   trainer.rank, trainer.world_size, trainer.device,
                                   (trainer.data_rank, trainer.data_ranks), trainer.sequence.counts_data)  # fmt: skip

    def after_step(self, step: int) -> None:
        if step % self.every:
            return
        try:
            metrics = self.validator.evaluate(self.trainer.engine, step)
        except ValidationError as error:
            path = self.trainer.save()
            raise ValidationError(
                f"{error}. The training state of step {step} is saved in {path}: fix the held-out data "
                "(eval_data) and start again to resume, or resume without validation (trainer.eval_every=0)"
            ) from None
        self.trainer.loggers.log({**metrics, "data/tokens_seen": self.trainer.tokens_seen}, step)


def describe(error: Exception) -> str:
    """The data's errors say what is wrong with it; anything else is named by its type (a bare
    KeyError says only 'doc_ids'), its traceback in the failing rank's log."""
    message = failure.user_message(error)
    return message if isinstance(error, DataError | OSError) else f"{type(error).__name__}: {message}"


def held_out_metrics(prefix: str, reduced: dict) -> dict:
    count = reduced["count"].sum().item()
    metrics = {f"{prefix}/loss": reduced["ce"].sum().item() / count} if count else {}
    metrics.update({f"{prefix}/{k.replace('/', '_')}": v for k, v in modality_metrics(reduced).items()})
    return metrics
