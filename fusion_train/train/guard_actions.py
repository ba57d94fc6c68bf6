"""What the trainer does about the divergence guard's findings (`monitor/guard.py` decides; this
observer acts): after every optimizer step the guard checks the step's loss, gradient norm and
final-layer norm, the same on every rank; on an event the step is logged and, by
`monitor.guard.action`, the run

- warns: an alert on the first step of each episode (the same kind on consecutive steps), and goes on;
- stops: a checkpoint (unless the weights are no longer finite), then the loop ends with GUARD_EXIT;
- rolls back (PaLM's recipe): reloads the last checkpoint before the event, skips the data read
  since, optionally at a lower LR for a while; with no checkpoint before, or after
  `max_rollbacks`, it stops instead.

The guard's windows and rollbacks are part of every checkpoint (`state_key`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from fusion_train.monitor.activations import ActivationMonitor
from fusion_train.monitor.experts import RouterMonitor
from fusion_train.monitor.guard import DivergenceGuard, GuardEvent
from fusion_train.monitor.observer import ROLLED_BACK, STOP, LogStep, Observer
from fusion_train.weights.training_checkpoint import read_trainer_state

log = logging.getLogger(__name__)


class GuardActions(Observer):
    state_key = "guard"

    def __init__(self, trainer, activations: ActivationMonitor | None, routers: RouterMonitor | None = None):
        """`trainer`: the Trainer it acts on; `activations`: where the final-layer norm comes from;
        `routers`: where the experts' loads come from."""
        self.trainer, self.cfg, self.activations = trainer, trainer.cfg.monitor.guard, activations
        self.routers = routers
        self.guard = DivergenceGuard(self.cfg)
        self.step_loss = torch.zeros((), dtype=torch.float64, device=trainer.device)
        self.event: GuardEvent | None = None
        self.last_event: tuple[str, int] | None = None  # (kind, step): alerts go out once per episode

    def state_dict(self) -> dict:
        return self.guard.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.guard.load_state_dict(state)
        self.apply_lr_factor(self.trainer.step + 1)

    def step_started(self, step: int, logged: bool) -> None:
        self.step_loss = torch.zeros_like(self.step_loss)

    def micro_batch(self, batch: dict, out, sums: dict) -> None:
        self.step_loss += out.loss.detach()

    def step_ended(self, step: int, sums: dict) -> bool:
        self.apply_lr_factor(step + 1)
        self.event = self.guard.check(step, *self._shared_values())
        return self.event is not None

    def _shared_values(self) -> tuple:
        """The step's loss, gradient norm, final-layer norm and experts' load, the same on every
        rank: the one host sync per optimizer step that a decision at that step needs."""
        device, final_norm = self.trainer.device, self.activations.final_norm if self.activations else None
        grad_norm = self.trainer.engine.get_global_grad_norm()  # a device tensor or a float; None before any step
        grad_norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, device=device)
        norm = final_norm if final_norm is not None else torch.zeros((), device=device)
        step_loss = self.step_loss / self.trainer.grad_accum
        means = torch.stack([v.double().reshape(()) for v in (step_loss, grad_norm, norm)])
        load = self.routers.step_load if self.routers and self.routers.step_load is not None else None
        values = means if load is None else torch.cat([means, load.double().flatten()])
        dist.all_reduce(values)  # the means' sums, the loads' totals
        values = values.cpu()  # the one host sync
        loss, grad, norm = (values[:3] / self.trainer.world_size).tolist()
        load_max = None if load is None else RouterMonitor.load_max(values[3:].view_as(load))
        return loss, grad, (norm if final_norm is not None else None), load_max

    def apply_lr_factor(self, next_step: int) -> None:
        """After a rollback the guard may lower the scheduled LR for a while."""
        if self.cfg.rollback_lr_factor == 1.0:
            return
        factor, scheduler = self.guard.lr_factor(next_step), self.trainer.scheduler
        for group, scheduled in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = scheduled * factor

    def metrics(self, reduced: dict, log: LogStep) -> dict:
        if self.event is None:
            return {}
        return {f"guard/{self.event.kind}": self.event.value, "guard/rollbacks": len(self.guard.rollbacks)}

    def after_step(self, step: int) -> str | None:
        event, self.event = self.event, None
        return self._act_on(event) if event else None

    def _act_on(self, event: GuardEvent) -> str | None:
        action = self.cfg.action
        episode_goes_on = self.last_event == (event.kind, event.step - 1)
        self.last_event = (event.kind, event.step)
        if action != "warn" or not episode_goes_on:  # every step of an episode is logged, its first alerted
            self._alert(f"{event.kind} at step {event.step}", f"{event.message}; action: {action}", event.step)
        if action == "warn":
            return None
        if action == "rollback":
            target = self.trainer.checkpoints.latest_before(event.step)
            if target is not None and self.guard.can_roll_back():
                self._roll_back(event, target)
                return ROLLED_BACK
            reason = (
                f"the run has rolled back {len(self.guard.rollbacks)} times, monitor.guard.max_rollbacks="
                f"{self.cfg.max_rollbacks}: the run looks hopeless, change the LR, data or recipe"
                if target is not None
                else f"there is no checkpoint before step {event.step} to roll back to"
            )
            return self._stop(event, reason, save=False)
        return self._stop(event, "monitor.guard.action=stop", save=event.kind != "nonfinite")

    def _stop(self, event: GuardEvent, reason: str, save: bool) -> str:
        path = self.trainer.save() if save else self.trainer.checkpoints.latest()
        if self.trainer.rank == 0:
            state = "written" if save else "left as the last good checkpoint (this step's state is not saved)"
            log.error("divergence guard stops the run: %s; %s. Checkpoint %s %s", event.message, reason, path, state)
        return STOP

    def _roll_back(self, event: GuardEvent, target: Path) -> None:
        trainer = self.trainer
        saved = read_trainer_state(target)
        trainer.checkpoints.load_engine(trainer.engine, target)
        skipped_batches = (trainer.step - saved["step"]) * trainer.grad_accum
        self.guard.rolled_back(event, saved["step"], skipped_batches)
        trainer.step, trainer.tokens_seen = saved["step"], saved["tokens_seen"]
        self.apply_lr_factor(trainer.step + 1)
        # Rewrite it with the data position past the skipped batches: a later resume skips them too.
        trainer.save()
        if trainer.rank == 0:
            log.warning(
                "rolled back to %s (rollback %d of at most %d): %d micro-batches per rank skipped",
                target, len(self.guard.rollbacks), self.cfg.max_rollbacks, skipped_batches,
            )  # fmt: skip

    def _alert(self, title: str, text: str, step: int) -> None:
        if self.trainer.rank == 0:
            log.warning("divergence guard: %s", text)
        self.trainer.loggers.alert(title, text, step)
