"""The SFT stage: `+stage=sft` from a pretrained checkpoint, the loss on answers only, resume."""

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, read_metrics, torchrun, train_overrides
from fusion_train.data.loader import DataConfig, build_loader
from fusion_train.data.packing import IGNORE_INDEX
from fusion_train.model.chameleon import Chameleon
from fusion_train.train.config import load_config
from fusion_train.train.schedule import warmup_cosine
from fusion_train.weights.training_checkpoint import consolidated_state_dict

SFT_SOURCES = ("text", "visual_chat", "image_generation", "sound")


def sft_overrides(demo_data, run_dir, *extra):
    """The SFT preset on the demo's SFT shards, at the tests' batch size and a short warm-up."""
    shards = demo_data["shards"]
    pretraining = [o for o in train_overrides(demo_data, run_dir) if o.startswith("data.sources.") or o == "optim=demo"]
    return [o for o in train_overrides(demo_data, run_dir) if o not in pretraining] + [
        "+stage=sft", "data=demo_sft", "data.seq_len=128", "data.micro_batch_size=4", "optim.warmup_steps=4",
        *[f"data.sources.{name}.path={shards['sft_' + name]}" for name in SFT_SOURCES], *extra,
    ]  # fmt: skip


def test_the_preset_sets_the_papers_sft_recipe():
    cfg = load_config(["+stage=sft"])
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.weight_decay) == (1e-5, "warmup_cosine", 0.1)
    assert (cfg.model.dropout, cfg.model.z_loss) == (0.05, 1e-5)
    assert set(cfg.data.sources) == {"text", "code", "visual_chat", "image_generation", "interleaved", "safety"}
    assert cfg.data.mixture_unit == "tokens" and cfg.trainer.global_batch_tokens == 128 * 4096


def test_sft_loss_is_the_cross_entropy_of_the_answers_alone(demo_data):
    shards = demo_data["shards"]
    cfg = DataConfig(
        sources={name: {"path": shards["sft_" + name], "weight": 1.0} for name in SFT_SOURCES},
        seq_len=128, micro_batch_size=4, num_workers=0,
    )  # fmt: skip
    loader = build_loader(cfg, rank=0, world_size=1)
    vocab = loader.dataset.vocab
    batch = next(iter(loader))
    inputs, labels = batch["input_ids"], batch["labels"]
    # Prompts and their separators carry no target; the answers after them do, and so does their </s>.
    # (A chat longer than the row is cut: its separator may be the row's last real token.)
    after_separator = torch.roll(inputs == vocab.sft_separator, 1, dims=1) & (inputs != vocab.pad)
    assert (labels[inputs == vocab.sft_separator] == IGNORE_INDEX).all()
    assert (labels[inputs == vocab.bos] == IGNORE_INDEX).all()
    assert (labels[after_separator] == inputs[after_separator]).all() and after_separator.sum() >= 4
    trained = labels != IGNORE_INDEX
    assert 0 < trained.sum() < (inputs != vocab.pad).sum()

    torch.manual_seed(0)
    model = Chameleon(load_config(["model.vocab_size=4608"]).model).eval()
    with torch.no_grad():
        loss = model(inputs, labels=labels).ce
        logits = model(inputs)[:, :-1]
    targets = labels[:, 1:]
    answers_only = F.cross_entropy(logits[targets != IGNORE_INDEX], targets[targets != IGNORE_INDEX])
    torch.testing.assert_close(loss, answers_only)
    # Targets on the prompts (as a loss on every token would have) change nothing once masked by the
    # shards' loss mask; a changed answer target changes the loss.
    every_token = F.cross_entropy(logits.flatten(0, 1), inputs[:, 1:].flatten(), ignore_index=vocab.pad)
    assert not torch.isclose(every_token, answers_only)
    changed = labels.clone()
    first_answer = trained.nonzero()[1]
    changed[tuple(first_answer)] = (changed[tuple(first_answer)] + 1) % vocab.vocab_size
    with torch.no_grad():
        assert not torch.isclose(model(inputs, labels=changed).ce, loss)


def test_an_sft_run_starts_from_the_pretrained_weights_with_a_fresh_optimizer_and_resumes_itself(
    demo_data, pretrained_checkpoint, tmp_path
):
    init = f"trainer.init_from={pretrained_checkpoint}"
    common = ["trainer.steps=4", "trainer.checkpoint_every=100", init]
    # Before its first step: the pretrained weights, Adam's moments empty, step 0.
    start = tmp_path / "start.pt"
    torchrun(REPO / "tests" / "scripts" / "resumed_engine.py", "--out", str(start), "--write", "optimizer_state",
             *sft_overrides(demo_data, tmp_path / "start", *common))  # fmt: skip
    state = torch.load(start, weights_only=True)
    pretrained = consolidated_state_dict(pretrained_checkpoint)
    assert state["step"] == 0
    for name, values in state["state"].items():
        assert torch.equal(values["fp32"], pretrained[name]), name
        assert values["exp_avg"] is None and values["exp_avg_sq"] is None, name

    whole = torchrun("-m fusion_train.train", *sft_overrides(demo_data, tmp_path / "whole", *common))
    # the stage's own change (dropout) is information, not a warning
    assert "this run changes {'dropout': 0.05} as its stage means to" in whole.stderr
    warned = [line for line in whole.stderr.splitlines() if "WARNING fusion_train.train.init_from" in line]
    assert all("converting the training checkpoint" in line for line in warned), warned
    torchrun(
        "-m fusion_train.train", *sft_overrides(demo_data, tmp_path / "split", *common, "trainer.stop_after_steps=2")
    )
    second = torchrun("-m fusion_train.train", *sft_overrides(demo_data, tmp_path / "split", *common))
    assert f"resumed from {tmp_path / 'split' / 'checkpoints' / 'step_2'} at step 2" in second.stderr
    assert "starting from the weights of" not in second.stderr
    assert (
        "trainer.init_from=" in second.stderr
        and "is not used: the run resumes from its own checkpoint" in second.stderr
    )
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    keys = ("step", "loss/total", "loss/image", "grad/norm", "optim/lr", "data/checksum")
    assert [[m.get(k) for k in keys] for m in whole] == [[m.get(k) for k in keys] for m in split]
    # The schedule starts afresh: step 1 runs at the first warm-up fraction of SFT's peak LR.
    schedule = warmup_cosine(4, 4)
    assert [m["optim/lr"] for m in whole] == pytest.approx([1e-5 * schedule(step) for step in range(4)])
