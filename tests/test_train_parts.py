"""The trainer's parts that need no processes: checkpoint retention, LR schedules, weight-decay groups."""

import math
import re

import pytest

from fusion_train.model.chameleon import Chameleon
from fusion_train.train.checkpoint import Checkpointer
from fusion_train.train.config import ConfigError
from fusion_train.train.engine import parameter_groups
from fusion_train.train.schedule import warmup_cosine, warmup_exponential
from fusion_train.weights.training_checkpoint import TRAINER_STATE, CheckpointError, read_trainer_state
from helpers import small_config


def _checkpoint(folder, name, marked=True):
    (folder / name).mkdir()
    if marked:
        (folder / name / TRAINER_STATE).write_text("{}")


def test_keeps_the_last_k_and_every_m_th_checkpoint(tmp_path):
    for step in range(1, 11):
        _checkpoint(tmp_path, f"step_{step}")
    _checkpoint(tmp_path, "step_11.partial")
    _checkpoint(tmp_path, "step_12", marked=False)  # emptied by an older version's interrupted prune
    _checkpoint(tmp_path, "step_2.pruning")  # a prune killed between its rename and its deletion
    checkpointer = Checkpointer(tmp_path, rank=0, keep_last=3, keep_every=4)
    checkpointer._prune()
    assert [step for step, _ in checkpointer.complete()] == [4, 8, 9, 10]
    assert checkpointer.latest().name == "step_10" and checkpointer.latest_before(9).name == "step_8"
    checkpointer.remove_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_12", "step_4", "step_8", "step_9"]
    with pytest.raises(CheckpointError, match="no trainer_state.json, the marker written last"):
        read_trainer_state(tmp_path / "step_12")


def test_the_newest_checkpoint_is_never_pruned(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        Checkpointer(tmp_path, rank=0, keep_last=0, keep_every=0)
    for step in (5, 10):
        _checkpoint(tmp_path, f"step_{step}")
    Checkpointer(tmp_path, rank=0, keep_last=1, keep_every=0)._prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10"]


def test_warmup_then_exponential_decay_toward_zero():
    schedule = warmup_exponential(warmup_steps=4, total_steps=104, final_lr_ratio=0.01)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(54) == pytest.approx(0.1)  # halfway through the decay: sqrt(0.01)
    assert schedule(104) == pytest.approx(0.01) and schedule(500) == pytest.approx(0.01)
    decay = [schedule(s) for s in range(4, 105)]
    assert all(b < a for a, b in zip(decay, decay[1:], strict=False))
    assert decay[1] / decay[0] == pytest.approx(decay[51] / decay[50])  # a constant ratio: exponential


def test_warmup_then_cosine_to_zero():
    schedule = warmup_cosine(warmup_steps=10, total_steps=110)
    assert schedule(9) == 1.0 and schedule(60) == pytest.approx(0.5) and schedule(110) == pytest.approx(0.0)
    assert schedule(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_no_weight_decay_on_norms_and_biases():
    model = Chameleon(small_config())
    decayed, not_decayed = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert {names[id(p)] for p in not_decayed["params"]} == {
        n for n in names.values() if "norm" in n or n.endswith("bias")
    }
    assert any("tok_embeddings" in names[id(p)] for p in decayed["params"])
    assert len(decayed["params"]) + len(not_decayed["params"]) == len(list(model.parameters()))


def test_an_observer_of_ones_own_is_a_loadable_observer_class(tmp_path, monkeypatch):
    from fusion_train.train.observers import user_observer

    (tmp_path / "mine.py").write_text(
        "from fusion_train.monitor.observer import Observer\n"
        "class Counts(Observer):\n    def __init__(self, run):\n        self.run = run\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert user_observer("mine:Counts", "the run").run == "the run"
    for path, message in [
        ("absent_module:Counts", "absent_module:Counts cannot be loaded (No module named 'absent_module')"),
        ("mine:Absent", "mine:Absent cannot be loaded"),
        ("mine", "mine is not an Observer class"),
        ("fusion_train.vocab:VocabLayout", "fusion_train.vocab:VocabLayout is not an Observer class"),
    ]:
        with pytest.raises(ConfigError, match=f"^monitor.observers: {re.escape(message)}"):
            user_observer(path, None)
