"""Validation: every held-out source scored on its own, each sample once; a failure there loses no
training."""

import json
import shutil

import pytest
import torch

from conftest import assert_one_clean_error, read_metrics, torchrun
from fusion_train.data.held_out import HeldOutSet
from fusion_train.data.loader import DataConfig, SourceConfig, read_manifests
from fusion_train.data.manifest import DataError
from fusion_train.model.loss import IGNORE_INDEX
from fusion_train.train.checkpoint import is_complete
from fusion_train.train.config import ConfigError, load_config, validate
from fusion_train.train.validation import describe

TRAIN = "-m fusion_train.train"


def held_out_config(demo_data) -> DataConfig:
    shards = demo_data["shards"]
    sources = {"pairs": SourceConfig(shards["held_out"]), "prose": SourceConfig(shards["text"])}
    return DataConfig(sources=sources, seq_len=128, micro_batch_size=4, num_workers=0)


def rank_batches(cfg: DataConfig, name: str, max_batches: int | None, world_size: int = 2) -> list[list[dict]]:
    vocab = next(iter(read_manifests(cfg).values())).vocab
    return [list(HeldOutSet(cfg, r, world_size, vocab, {}, max_batches).batches(name)) for r in range(world_size)]


@pytest.mark.parametrize("name", ["pairs", "prose"])
def test_a_full_pass_scores_every_held_out_token_once_over_the_ranks(demo_data, name):
    cfg = held_out_config(demo_data)
    per_rank = rank_batches(cfg, name, max_batches=None)
    assert all(b["input_ids"].shape == (4, 128) for batches in per_rank for b in batches)
    scored = sum(int((b["labels"] != IGNORE_INDEX).sum()) for batches in per_rank for b in batches)
    manifest = read_manifests(cfg)[name]
    # Every token has a label but each document's first, which nothing before it predicts.
    assert scored == sum(s.tokens for s in manifest.shards) - manifest.samples


def test_a_capped_pass_scores_the_same_first_batches_each_time(demo_data):
    cfg = held_out_config(demo_data)
    first, again = rank_batches(cfg, "prose", max_batches=2), rank_batches(cfg, "prose", max_batches=2)
    assert [len(batches) for batches in first] == [2, 2]
    assert all(
        torch.equal(a["input_ids"], b["input_ids"])
        for x, y in zip(first, again, strict=True)
        for a, b in zip(x, y, strict=True)
    )
    held = HeldOutSet(cfg, 0, 2, read_manifests(cfg)["prose"].vocab, {}, 2)
    list(held.batches("prose"))
    scored, skipped = held.read_counts("prose")
    coverage = held.coverage("prose", scored, skipped)
    assert not coverage.full_pass and "the first 2 micro-batches per rank" in coverage.describe(2)
    assert (held.padding_batch()["labels"] == IGNORE_INDEX).all()


def test_eval_batches_is_positive_or_null():
    validate(load_config(["trainer.eval_batches=null"]))
    with pytest.raises(ConfigError, match="trainer.eval_batches must be positive, or null"):
        validate(load_config(["trainer.eval_batches=0"]))


def test_one_training_source_two_held_out_and_a_failed_validation_that_loses_no_step(demo_data, tmp_path):
    """Sources given on the command line alone (`~data`, `+data.sources...`); two held-out sources
    of the same samples score alike; then one of them goes bad between invocations: the
    validation that meets it saves the state, ends with one message, and a resume goes on."""
    shards, run, copy = demo_data["shards"], tmp_path / "run", tmp_path / "pairs_copy"
    shutil.copytree(shards["held_out"], copy)
    overrides = [
        "model.vocab_size=4608", "optim=demo", "optim.warmup_steps=5", "~data", f"+data.sources.pairs.path={shards['image_text']}",
        "data.seq_len=128", "data.micro_batch_size=4", "data.num_workers=0", "trainer.global_batch_tokens=1024",
        f"trainer.run_dir={run}", "trainer.progress_bar=false", "logging.wandb=false", "trainer.steps=5",
        "trainer.checkpoint_every=100", "trainer.eval_every=2", "eval_data=demo", f"eval_data.sources.held_out.path={shards['held_out']}",
        f"+eval_data.sources.copy.path={copy}", "eval_data.seq_len=128", "eval_data.micro_batch_size=4",
    ]  # fmt: skip
    first = torchrun(TRAIN, *overrides, "trainer.stop_after_steps=2")
    assert "validation of held-out source copy: one full pass, 20 samples" in first.stderr
    (validation,) = [m for m in read_metrics(run) if "eval/loss" in m]
    # The same samples, read in another seeded order (a source's order follows its name), so packed
    # with other neighbours and cut at other places: the same loss to within a percent.
    for key in ("loss", "loss_image", "loss_text"):
        assert validation[f"eval/held_out/{key}"] == pytest.approx(validation[f"eval/copy/{key}"], rel=1e-2)
    assert validation["eval/loss"] == pytest.approx(validation["eval/copy/loss"], rel=1e-2)
    assert validation["eval/held_out/samples"] == validation["eval/copy/samples"] == 20

    for shard in copy.glob("shard-*.tar"):
        shard.write_bytes(b"not a tar file" * 100)
    failed = torchrun(TRAIN, *overrides, check=False)
    assert failed.returncode != 0
    message = "validation at step 4 failed on held-out source copy"
    assert_one_clean_error(failed.stdout + failed.stderr, message)
    assert "The training state of step 4 is saved in" in failed.stderr and "fusion-data verify" in failed.stderr
    assert is_complete(run / "checkpoints" / "step_4")
    assert message in json.loads((run / "failure.json").read_text())["message"]

    resumed = torchrun(TRAIN, *overrides, "trainer.eval_every=0")
    assert "resumed from" in resumed.stderr and "step_4 at step 4" in resumed.stderr
    assert [m["step"] for m in read_metrics(run) if "loss/total" in m][-1] == 5


def test_a_fault_that_is_not_the_datas_is_named_by_its_type():
    assert describe(DataError("shard-000001.tar is damaged")) == "shard-000001.tar is damaged"
    assert describe(KeyError("doc_ids")) == "KeyError: 'doc_ids'"
