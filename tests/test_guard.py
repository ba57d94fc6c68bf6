"""The divergence guard's decisions, on synthetic histories."""

import json
import math

import numpy as np
import pytest
import torch

from fusion_train.monitor.config import GuardConfig
from fusion_train.monitor.experts import RouterMonitor
from fusion_train.monitor.guard import DivergenceGuard, GuardError, fitted_growth, robust_zscore


def run(guard: DivergenceGuard, losses, norms, start: int = 1):
    """The events, by step, of feeding these per-step values to the guard."""
    events = {}
    for step, (loss, norm) in enumerate(zip(losses, norms, strict=True), start=start):
        event = guard.check(step, loss, 1.0, norm)
        if event:
            events[step] = event
    return events


def healthy_run(steps: int, seed: int = 0):
    """A decreasing, noisy loss and a final-layer norm that creeps up 0.1% a step."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    losses = 2.0 + 6.0 * np.exp(-t / 300) + rng.normal(0, 0.03, steps)
    norms = 1.0 * 1.001**t * np.exp(rng.normal(0, 0.02, steps))
    return losses.tolist(), norms.tolist()


def test_a_healthy_run_raises_nothing():
    for seed in range(5):
        assert run(DivergenceGuard(GuardConfig()), *healthy_run(2000, seed)) == {}


def test_a_loss_spike_is_caught_at_its_step():
    losses, norms = healthy_run(400)
    losses[299] += 2.0  # step 300: the loss jumps by half
    events = run(DivergenceGuard(GuardConfig()), losses, norms)
    assert list(events) == [300] and events[300].kind == "loss_spike"
    assert events[300].value > 8 and "robust standard deviations" in events[300].message


def test_a_lasting_level_shift_alarms_for_a_while_then_becomes_the_norm():
    losses, norms = healthy_run(400)
    losses[300:] = [x + 2.0 for x in losses[300:]]  # e.g. a new data mixture from step 301 on
    events = run(DivergenceGuard(GuardConfig()), losses, norms)
    assert min(events) == 301 and max(events) < 301 + GuardConfig().spike_window // 2


@pytest.mark.parametrize("bad", ["loss", "grad", "norm"])
def test_non_finite_values_are_caught(bad):
    guard = DivergenceGuard(GuardConfig())
    values = {"loss": 3.0, "grad": 1.0, "norm": 2.0} | {bad: math.nan if bad != "grad" else math.inf}
    event = guard.check(7, values["loss"], values["grad"], values["norm"])
    assert event.kind == "nonfinite" and event.step == 7


def test_sustained_norm_growth_is_caught_and_slow_growth_is_not():
    fast = [2.0 * 1.02**i for i in range(200)]  # +2% a step: doubles in 35 steps
    slow = [2.0 * 1.003**i for i in range(200)]  # +35% over the 100-step window
    events = run(DivergenceGuard(GuardConfig(norm_start_step=0)), [3.0] * 200, fast)
    first = min(events)
    assert events[first].kind == "norm_growth" and 30 <= first <= 60
    assert run(DivergenceGuard(GuardConfig(norm_start_step=0)), [3.0] * 200, slow) == {}


def test_norm_growth_is_not_tested_before_norm_start_step():
    fast = [2.0 * 1.02**i for i in range(300)]
    events = run(DivergenceGuard(GuardConfig(norm_start_step=250)), [3.0] * 300, fast)
    assert 250 + 20 <= min(events) <= 300  # min_history steps from norm_start_step on


def test_a_norm_jump_is_caught_from_the_first_steps_and_a_fresh_models_growth_is_not():
    # The stability lab's LR-1 runs: the final RMS goes 0.024 -> 0.22 -> 6.6 -> 123 in three steps,
    # the loss rises above its initial value at the fourth. Its best learning rate grows ~15x in 6 steps.
    blow_up = [0.024, 0.22, 6.6, 123.0, 580.0]
    events = run(DivergenceGuard(GuardConfig()), [8.3] * 5, blow_up)
    assert min(events) == 3 and events[3].kind == "norm_jump" and "learning rate is too high" in events[3].message
    fresh = [0.024 * 1.6**i for i in range(30)]
    assert run(DivergenceGuard(GuardConfig()), [8.3] * 30, fresh) == {}


def test_a_router_collapse_is_a_lasting_lopsided_load_and_a_fresh_routers_moment_is_not():
    """moe/load_max above router_collapse_max for router_collapse_steps steps in a row; the count
    survives a restart (the guard's state) and starts again below the limit."""
    cfg = GuardConfig(router_collapse_max=0.8, router_collapse_steps=3)
    guard, events = DivergenceGuard(cfg), {}
    for step, load_max in enumerate([0.95, 0.9, 0.5, 0.85, 0.9], start=1):
        events[step] = guard.check(step, 3.0, 1.0, 1.0, load_max)
    restarted = DivergenceGuard(cfg)
    restarted.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    for step, load_max in enumerate([0.95, 0.97, 0.6], start=6):
        events[step] = restarted.check(step, 3.0, 1.0, 1.0, load_max)
    assert [step for step, event in events.items() if event] == [6, 7]
    assert events[6].kind == "router_collapse" and events[6].value == 0.95
    assert "one expert has taken 95% of its group's routes" in events[6].message
    assert "raise model.experts.aux_loss" in events[6].message
    assert all(DivergenceGuard(cfg).check(1, 3.0, 1.0, 1.0, None) is None for _ in range(5))  # no experts
    loads = torch.tensor([[6.0, 1, 1, 0], [0, 0, 0, 0], [2, 2, 2, 2]])  # a cell without routes is left out
    assert RouterMonitor.load_max(loads) == 0.75


def test_a_sudden_blow_up_raises_the_fitted_trend():
    assert fitted_growth([1.0] * 7 + [1000.0]) > 20
    assert fitted_growth([1.0] * 7 + [1.3]) < 0.2
    assert fitted_growth([2.0**i for i in range(10)]) == pytest.approx(2.0**9 - 1)


def test_robust_zscore_survives_a_flat_history():
    assert robust_zscore([2.0] * 30, 2.0) == 0
    assert robust_zscore([2.0] * 30, 2.01) == pytest.approx(5.0)  # against 0.1% of the median


def test_rollback_forgets_the_abandoned_history_and_lowers_the_lr():
    guard = DivergenceGuard(
        GuardConfig(rollback_lr_factor=0.5, rollback_lr_steps=10, max_rollbacks=1, norm_start_step=0)
    )
    losses, norms = healthy_run(30)
    run(guard, losses, norms)
    event = guard.check(31, math.nan, 1.0, 1.0)
    guard.rolled_back(event, to_step=20, skipped_batches=22)
    assert max(step for step, _ in guard.losses) == 20 and max(step for step, _ in guard.final_norms) == 20
    assert guard.rollbacks == [{"event": "nonfinite", "detected_at": 31, "to_step": 20, "skipped_batches": 22}]
    assert guard.lr_factor(21) == 0.5 and guard.lr_factor(30) == 0.5
    assert guard.lr_factor(31) == 1.0
    assert not guard.can_roll_back()


def test_state_survives_a_json_checkpoint():
    guard = DivergenceGuard(GuardConfig())
    run(guard, *healthy_run(60))
    restored = DivergenceGuard(GuardConfig())
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.state_dict() == guard.state_dict()
    assert restored.check(61, 50.0, 1.0, 1.0).kind == guard.check(61, 50.0, 1.0, 1.0).kind == "loss_spike"
    assert restored.state_dict() == guard.state_dict()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"action": "retry"}, "choose one of"),
        ({"min_history": 2}, "at least 3"),
        ({"spike_window": 5}, "at least"),
        ({"norm_window": 20}, "norm_window more than min_history"),
        ({"norm_jump_max": 1.0}, "norm_jump_max more than 1"),
        ({"router_collapse_max": 1.5}, "router_collapse_max in"),
    ],
)
def test_bad_settings_name_the_setting(change, message):
    with pytest.raises(GuardError, match=message):
        DivergenceGuard(GuardConfig(**change))
