"""The divergence guard: decides, after every optimizer step, whether the step shows trouble.

Three tests, on values every rank shares (all-reduced), so that every rank decides the same:
- non-finite: the loss or the global gradient norm is NaN or infinite;
- loss spike: a robust z-score, (loss - median) / (1.4826 · MAD) over the last `spike_window`
  finite steps, above `spike_zscore`;
- norm growth: the least-squares trend of log(norms/final_out) over the last `norm_window` steps,
  as a relative growth across the window, above `norm_growth_max`, from `norm_start_step` on (a
  fresh model's norms grow fast while it learns). Steady growth and a sudden blow-up both raise
  the fitted trend; one noisy step barely does.
- norm jump: norms/final_out more than `norm_jump_max` times its smallest value of the last
  `norm_jump_steps` steps, from the first step on. It is the blow-up of a too-high learning rate in
  the warm-up, before the growth test may speak (the stability lab, docs/stability.md).
- router collapse (with model.experts): moe/load_max, the busiest expert's share of its group's
  routes over every block and modality (1/E balanced, 1 when one expert takes them all), above
  `router_collapse_max` for `router_collapse_steps` steps in a row. A fresh router is lopsided
  for a few steps now and then; a collapsed one stays so (calibrated in docs/experts.md).

The guard only decides; the trainer acts (warn, stop, or roll back). Its state (the windows, the
rollbacks so far and the data they skipped) is saved in every checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fusion_train.monitor.config import GUARD_ACTIONS, GuardConfig

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
MIN_RELATIVE_SCALE = 1e-3  # a flat loss has MAD ~0: spikes are measured against at least 0.1% of the median


EVENT_KINDS = ("nonfinite", "loss_spike", "norm_jump", "norm_growth", "router_collapse")


class GuardError(ValueError):
    pass


@dataclass
class GuardEvent:
    kind: str  # one of EVENT_KINDS
    step: int
    value: float  # the statistic that crossed its threshold
    threshold: float
    message: str


def check_config(cfg: GuardConfig) -> None:
    if cfg.action not in GUARD_ACTIONS:
        raise GuardError(f"monitor.guard.action={cfg.action!r}: choose one of {GUARD_ACTIONS}")
    if cfg.min_history < 3 or cfg.spike_window < cfg.min_history or cfg.norm_window <= cfg.min_history:
        raise GuardError(
            "monitor.guard: min_history must be at least 3, spike_window at least min_history, and norm_window "
            "more than min_history (the growth test needs more than min_history steps)"
        )
    if cfg.norm_jump_steps < 1 or cfg.norm_jump_max <= 1:
        raise GuardError("monitor.guard: norm_jump_steps must be at least 1 and norm_jump_max more than 1")
    if cfg.router_collapse_steps < 1 or not 0 < cfg.router_collapse_max <= 1:
        raise GuardError("monitor.guard: router_collapse_steps must be at least 1 and router_collapse_max in (0, 1]")


def robust_zscore(history: list[float], value: float) -> float:
    median = float(np.median(history))
    mad = float(np.median(np.abs(np.asarray(history) - median)))
    scale = max(MAD_TO_SIGMA * mad, MIN_RELATIVE_SCALE * abs(median), 1e-12)
    return (value - median) / scale


def fitted_growth(values: list[float]) -> float:
    """Relative growth across the window of a least-squares line through log(values)."""
    y = np.log(np.asarray(values, dtype=np.float64))
    x = np.arange(len(y), dtype=np.float64)
    x -= x.mean()
    slope = float((x * (y - y.mean())).sum() / (x * x).sum())
    return math.expm1(slope * (len(y) - 1))


class DivergenceGuard:
    def __init__(self, cfg: GuardConfig):
        check_config(cfg)
        self.cfg = cfg
        self.losses: list[tuple[int, float]] = []  # (step, loss) of good steps
        self.final_norms: list[tuple[int, float]] = []
        self.rollbacks: list[dict] = []  # what each rollback skipped, for the record and for later resumes
        self.lower_lr_until = 0  # the last step that runs with a lowered LR after a rollback
        self.lopsided_steps = 0  # steps in a row with moe/load_max above router_collapse_max

    def check(
        self, step: int, loss: float, grad_norm: float, final_norm: float | None, load_max: float | None = None
    ) -> GuardEvent | None:
        """The first test that fails at this step, or None. A finite step joins the history even when
        it is an event: a run that goes on from it (`warn`) adapts to a lasting change instead of
        alarming forever, and a rollback cuts the history back anyway."""
        event = self._nonfinite(step, loss, grad_norm, final_norm) or self._spike(step, loss)
        if event is None and final_norm is not None:
            event = self._norm_jump(step, final_norm) or self._norm_growth(step, final_norm)
        if load_max is not None:
            self.lopsided_steps = self.lopsided_steps + 1 if load_max > self.cfg.router_collapse_max else 0
            event = event or self._router_collapse(step, load_max)
        if event is None or event.kind != "nonfinite":
            self.losses = (self.losses + [(step, loss)])[-self.cfg.spike_window :]
            if final_norm is not None:
                kept = max(self.cfg.norm_window, self.cfg.norm_jump_steps)
                self.final_norms = (self.final_norms + [(step, final_norm)])[-kept:]
        return event

    def _nonfinite(self, step, loss, grad_norm, final_norm) -> GuardEvent | None:
        values = {"loss": loss, "grad/norm": grad_norm, "norms/final_out": final_norm}
        bad = [f"{name}={value}" for name, value in values.items() if value is not None and not math.isfinite(value)]
        if not bad:
            return None
        return GuardEvent("nonfinite", step, 1.0, 0.0, f"step {step}: non-finite {', '.join(bad)}")

    def _spike(self, step: int, loss: float) -> GuardEvent | None:
        if len(self.losses) < self.cfg.min_history:
            return None
        z = robust_zscore([v for _, v in self.losses], loss)
        if z <= self.cfg.spike_zscore:
            return None
        message = (
            f"step {step}: loss spike, loss {loss:.4f} is {z:.1f} robust standard deviations above the median "
            f"of the last {len(self.losses)} steps (limit monitor.guard.spike_zscore={self.cfg.spike_zscore})"
        )
        return GuardEvent("loss_spike", step, z, self.cfg.spike_zscore, message)

    def _norm_jump(self, step: int, final_norm: float) -> GuardEvent | None:
        recent = [v for _, v in self.final_norms[-self.cfg.norm_jump_steps :]]
        if not recent or final_norm <= self.cfg.norm_jump_max * min(recent):
            return None
        ratio = final_norm / min(recent)
        message = (
            f"step {step}: norms/final_out jumps to {final_norm:.4g}, {ratio:.0f} times its smallest value of the "
            f"last {len(recent)} steps (limit monitor.guard.norm_jump_max={self.cfg.norm_jump_max:g}): "
            "the learning rate is too high for this model"
        )
        return GuardEvent("norm_jump", step, ratio, self.cfg.norm_jump_max, message)

    def _norm_growth(self, step: int, final_norm: float) -> GuardEvent | None:
        if step < self.cfg.norm_start_step:
            return None
        tracked = [v for s, v in self.final_norms if s >= self.cfg.norm_start_step]
        window = tracked[-(self.cfg.norm_window - 1) :] + [final_norm]
        if len(window) <= self.cfg.min_history:
            return None
        growth = fitted_growth(window)
        if growth <= self.cfg.norm_growth_max:
            return None
        message = (
            f"step {step}: norms/final_out grows, a fitted {growth:+.0%} over the last {len(window)} steps "
            f"(now {final_norm:.4g}; limit monitor.guard.norm_growth_max={self.cfg.norm_growth_max:+.0%})"
        )
        return GuardEvent("norm_growth", step, growth, self.cfg.norm_growth_max, message)

    def _router_collapse(self, step: int, load_max: float) -> GuardEvent | None:
        if self.lopsided_steps < self.cfg.router_collapse_steps:
            return None
        message = (
            f"step {step}: router collapse, one expert has taken {load_max:.0%} of its group's routes, above "
            f"monitor.guard.router_collapse_max={self.cfg.router_collapse_max:g} for {self.lopsided_steps} steps in a "
            "row (limit router_collapse_steps): raise model.experts.aux_loss or lower the learning rate"
        )
        return GuardEvent("router_collapse", step, load_max, self.cfg.router_collapse_max, message)

    def can_roll_back(self) -> bool:
        return len(self.rollbacks) < self.cfg.max_rollbacks

    def rolled_back(self, event: GuardEvent, to_step: int, skipped_batches: int) -> None:
        """Forget the history after the step rolled back to; keep the record of what was skipped."""
        self.rollbacks.append(
            {"event": event.kind, "detected_at": event.step, "to_step": to_step, "skipped_batches": skipped_batches}
        )
        self.losses = [(s, v) for s, v in self.losses if s <= to_step]
        self.final_norms = [(s, v) for s, v in self.final_norms if s <= to_step]
        self.lopsided_steps = 0
        if self.cfg.rollback_lr_steps:
            self.lower_lr_until = to_step + self.cfg.rollback_lr_steps

    def lr_factor(self, step: int) -> float:
        """The multiplier of the scheduled LR for optimizer step `step`."""
        return self.cfg.rollback_lr_factor if step <= self.lower_lr_until else 1.0

    def state_dict(self) -> dict:
        return {
            "losses": self.losses,
            "final_norms": self.final_norms,
            "rollbacks": self.rollbacks,
            "lower_lr_until": self.lower_lr_until,
            "lopsided_steps": self.lopsided_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.losses = [tuple(x) for x in state["losses"]]
        self.final_norms = [tuple(x) for x in state["final_norms"]]
        self.rollbacks = state["rollbacks"]
        self.lower_lr_until = state["lower_lr_until"]
        self.lopsided_steps = state.get("lopsided_steps", 0)
