"""`fusion-train` on 2 CPU ranks through DeepSpeed, on the demo pipeline's real shards."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from itertools import islice
from pathlib import Path

import psutil
import pytest
import torch
from wandb_records import history as wandb_history

from conftest import (
    REPO,
    assert_one_clean_error,
    read_metrics,
    read_records,
    torchrun,
    torchrun_command,
    train_overrides,
)
from fusion_train.cli import train_main
from fusion_train.data.elastic import Layer
from fusion_train.data.loader import build_loader, reader_states
from fusion_train.data.manifest import MANIFEST, Manifest
from fusion_train.monitor.parameters import GROUPS, parameter_group
from fusion_train.train.checkpoint import consolidated_state_dict
from fusion_train.train.config import load_config

TRAIN = "-m fusion_train.train"


def losses(run_dir):
    return [m["loss/total"] for m in read_metrics(run_dir) if "loss/total" in m]


def checkpoints(run_dir):
    """Checkpoint folder names, oldest step first."""
    found = (run_dir / "checkpoints").glob("step_*")
    return sorted((p.name for p in found), key=lambda n: (n.endswith(".partial"), int(n.split("_")[1].split(".")[0])))


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank (torchrun starts its workers in sessions of their own)."""
    victims = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for victim in victims:
        victim.kill()
    process.wait()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_zero_stage_trains_the_tiny_model(demo_data, tmp_path, stage):
    run = tmp_path / "run"
    held_out, text = demo_data["shards"]["held_out"], demo_data["shards"]["text"]
    # Two held-out sources. Under ZeRO-3, whose forward gathers parameters, each read once in full:
    # the prose's shares differ between the ranks (151 and 100 micro-batches), so one rank scores
    # padding while the other goes on. Elsewhere the first 2 micro-batches per rank and source.
    full_pass = stage == 3
    validation = [
        "eval_data=demo", f"eval_data.sources.held_out.path={held_out}", f"+eval_data.sources.prose.path={text}",
        "eval_data.seq_len=128", "eval_data.micro_batch_size=4", "trainer.eval_every=6",
        f"trainer.eval_batches={'null' if full_pass else 2}",
    ]  # fmt: skip
    overrides = train_overrides(
        demo_data, run, f"deepspeed=zero{stage}", "trainer.steps=12", "trainer.checkpoint_every=6"
    )
    torchrun(TRAIN, *overrides, *validation)
    history = losses(run)
    assert len(history) == 12
    assert sum(history[-3:]) / 3 < 0.9 * sum(history[:3]) / 3, history
    evaluations = [m for m in read_metrics(run) if "eval/loss" in m]
    assert [m["step"] for m in evaluations] == [6, 12]
    for source, samples in [("held_out", 20), ("prose", 199)]:
        assert (evaluations[0][f"eval/{source}/samples"] == samples) == full_pass
        assert evaluations[1][f"eval/{source}/loss"] < evaluations[0][f"eval/{source}/loss"]
    assert {"eval/held_out/loss_image", "eval/prose/loss_text", "eval/loss_image", "eval/loss_text"} <= set(
        evaluations[0]
    )
    assert checkpoints(run) == ["step_6", "step_12"]
    assert (run / "config.yaml").is_file() and list((run / "wandb").glob("offline-run-*"))
    # The per-group statistics read through this stage's partitioning: the group gradient norms make
    # up the global one, and the weight norms are those of the consolidated checkpoint.
    last = [m for m in read_metrics(run) if "loss/total" in m][-1]
    group_grads = math.sqrt(sum(last[f"grad/norm_{group}"] ** 2 for group in GROUPS))
    assert group_grads == pytest.approx(last["grad/norm"], rel=1e-4)
    weights = consolidated_state_dict(run / "checkpoints" / "step_12")
    for group in GROUPS:
        norm = math.sqrt(sum(t.double().pow(2).sum().item() for n, t in weights.items() if parameter_group(n) == group))
        assert last[f"params/norm_{group}"] == pytest.approx(norm, rel=1e-5), group


def test_zero3_builds_the_model_partitioned_with_the_weights_of_any_other_stage(demo_data, tmp_path):
    """Under ZeRO-3 each of the 2 ranks holds half of the parameters from construction on, and the
    first step's loss is ZeRO-2's from the same seed: the initial weights do not depend on how the
    model is built."""
    first_losses = {}
    for stage in (2, 3):
        run = tmp_path / f"zero{stage}"
        result = torchrun(TRAIN, *train_overrides(demo_data, run, f"deepspeed=zero{stage}", "trainer.steps=1"))
        first_losses[stage] = losses(run)
    held = re.findall(r"rank (\d) holds ([\d.]+)% of the model's parameters", result.stderr)
    assert sorted(rank for rank, _ in held) == ["0", "1"], result.stderr[-3000:]
    assert all(float(share) == pytest.approx(50, abs=0.5) for _, share in held), held
    assert first_losses[3] == pytest.approx(first_losses[2], rel=1e-6)


MONITORING_KEYS = [
    "loss/total", "loss/z", "loss/text", "loss/image", "loss/special",
    "logits/logZ_mean_text", "logits/logZ_mean_image", "logits/logZ_mean_special",
    "norms/block_0_out", "norms/block_1_out", "norms/final_out",
    "attn/qk_logit_max_0", "attn/qk_logit_max_1", "attn/qk_logit_max",
    "grad/norm", *(f"{prefix}_{group}" for prefix in ("grad/norm", "params/norm", "optim/update_ratio")
                   for group in ("embeddings", "attention", "ffn", "norms", "output")),
    "optim/update_ratio", "optim/lr",
    "perf/step_time_s", "perf/tokens_per_s", "perf/tflops", "perf/mfu", "perf/mem_gb", "perf/data_wait_s",
    "data/tokens_seen", "data/skipped", "data/checksum",
    "data/source_text_frac", "data/source_image_text_frac", "data/source_interleaved_frac",
]  # fmt: skip


def test_exact_resume_after_the_process_exits(demo_data, tmp_path):
    common = ["trainer.steps=10", "trainer.checkpoint_every=100"]
    torchrun(TRAIN, *train_overrides(demo_data, tmp_path / "whole", *common))
    torchrun(TRAIN, *train_overrides(demo_data, tmp_path / "split", *common, "trainer.stop_after_steps=4"))
    assert checkpoints(tmp_path / "split") == ["step_4"]
    torchrun(TRAIN, *train_overrides(demo_data, tmp_path / "split", *common))
    # The resumed invocation continued the same W&B run (its id came back from the checkpoint).
    wandb_runs = sorted((tmp_path / "split" / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in wandb_runs}) == 1
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    # Every monitor's figures, not only the loss, come out the same: observing changed nothing.
    keys = (
        "step", "loss/total", "loss/text", "loss/image", "loss/z", "logits/logZ_mean_image", "grad/norm", "optim/lr",
        "data/tokens_seen", "data/checksum", "data/source_text_frac", "norms/block_0_out", "norms/final_out",
        "attn/qk_logit_max_1", "grad/norm_attention", "params/norm_ffn", "optim/update_ratio_output",
    )  # fmt: skip
    assert [[m.get(k) for k in keys] for m in whole] == [[m.get(k) for k in keys] for m in split]
    # A step without image targets has no loss/image, one where no document starts no source fractions.
    assert set(MONITORING_KEYS) <= set().union(*split), set(MONITORING_KEYS) - set().union(*split)
    assert all(
        {k for k in MONITORING_KEYS if k.split("/")[0] in ("norms", "attn", "params", "perf")} <= set(m) for m in split
    )
    # W&B holds what metrics.jsonl holds, across both invocations.
    logged = wandb_history(tmp_path / "split")
    assert [row["trainer/step"] for row in logged] == [m["step"] for m in split]
    for row, metrics in zip(logged, split, strict=True):
        assert {k: row[k] for k in metrics if k != "step"} == {k: v for k, v in metrics.items() if k != "step"}


def _start(demo_data, run_dir, *extra, env=None):
    command = torchrun_command(TRAIN, *train_overrides(demo_data, run_dir, *extra))
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _wait_for(condition, process, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def _logged_steps(run_dir):
    """Lines counted, not parsed: the last may be half written."""
    path = run_dir / "metrics.jsonl"
    return sum('"resumed_from"' not in line for line in path.read_text().splitlines()) if path.is_file() else 0


def _kill_launcher(process: subprocess.Popen) -> None:
    """SIGKILL torchrun alone, as `kill -9 PID` does: its ranks must not go on without it."""
    processes = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    processes[0].kill()
    process.wait()
    deadline = time.time() + 10
    while alive := [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        assert time.time() < deadline, f"still running after their launcher died: {alive}"
        time.sleep(0.2)


def _wait_for_path(run, pattern, process):
    _wait_for(lambda: list((run / "checkpoints").glob(pattern)), process)
    return next((run / "checkpoints").glob(pattern))


def test_kills_of_the_launcher_anywhere_lose_nothing_and_one_writer_holds_the_run(demo_data, tmp_path):
    """kill -9 of torchrun mid-training, inside a checkpoint write and inside pruning: the ranks die
    with it, a second invocation meanwhile is refused, and the resumed run equals an uninterrupted one."""
    common = ["trainer.steps=16", "trainer.checkpoint_every=4", "trainer.keep_last=1"]
    torchrun(TRAIN, *train_overrides(demo_data, tmp_path / "reference", *common))
    reference = losses(tmp_path / "reference")

    run = tmp_path / "run"
    process = _start(demo_data, run, *common)
    _wait_for(lambda: _logged_steps(run) >= 6, process)
    _kill_launcher(process)  # mid-training
    logged = (run / "metrics.jsonl").read_text()
    time.sleep(2)
    assert (run / "metrics.jsonl").read_text() == logged  # nobody writes on
    assert checkpoints(run)[-1] in ("step_4", "step_8") and read_metrics(run)[-1]["step"] < 16

    # Inside the writing of the next checkpoint; meanwhile a second invocation is refused.
    env = {**os.environ, "FUSION_TRAIN_CHECKPOINT_PAUSE_S": "60"}
    process = _start(demo_data, run, *common, env=env)
    partial = _wait_for_path(run, "step_*.partial", process)
    second = torchrun(TRAIN, *train_overrides(demo_data, run, *common), check=False)
    output = second.stdout + second.stderr
    assert second.returncode != 0 and "exitcode  : 2" in output
    assert_one_clean_error(output, f"{run} is in use by another training invocation")
    assert '"pid": ' in output  # the holder, named
    _kill_launcher(process)
    assert partial.is_dir() and partial.name.removesuffix(".partial") not in checkpoints(run)

    # Inside pruning the previous checkpoint: it is renamed before it is deleted.
    env = {**os.environ, "FUSION_TRAIN_PRUNE_PAUSE_S": "60"}
    process = _start(demo_data, run, *common, env=env)
    pruning = _wait_for_path(run, "step_*.pruning", process)
    _kill_launcher(process)
    assert pruning.is_dir() and pruning.name.removesuffix(".pruning") not in checkpoints(run)

    torchrun(TRAIN, *train_overrides(demo_data, run, *common))
    assert checkpoints(run) == ["step_16"]
    by_step = {m["step"]: m["loss/total"] for m in read_metrics(run)}  # the last logging of each step
    assert [by_step[s] for s in range(1, 17)] == reference
    # Each invocation marked where it started; the refused one wrote nothing.
    starts = [r for r in read_records(run) if "resumed_from" in r]
    assert len(starts) == 4 and starts[0] == {**starts[0], "step": 0, "resumed_from": None}
    assert all(r["resumed_from"].endswith(f"step_{r['step']}") for r in starts[1:])


def test_config_and_data_errors_under_torchrun_end_with_one_clean_message(demo_data, tmp_path):
    result = torchrun(TRAIN, *train_overrides(demo_data, tmp_path / "run", "trainer.keep_last=0"), check=False)
    assert_one_clean_error(result.stdout + result.stderr, "trainer.keep_last=0, trainer.keep_every=0: keep_last must")

    # Every shard of a source unreadable: the loader workers find out during training.
    source, broken = Path(demo_data["shards"]["text"]), tmp_path / "broken_text"
    broken.mkdir()
    shutil.copy(source / MANIFEST, broken)
    for shard in Manifest.read(source).shards:
        (broken / shard.name).write_bytes(b"not a tar file " * 100)
    overrides = train_overrides(demo_data, tmp_path / "run", "trainer.steps=4", f"data.sources.text.path={broken}")
    result = torchrun(TRAIN, *overrides, check=False)
    message = f"source text ({broken}): no usable sample in a whole epoch of this reader"
    assert_one_clean_error(result.stdout + result.stderr, message)
    assert json.loads((tmp_path / "run" / "failure.json").read_text())["message"] == message


def test_sigterm_writes_a_final_checkpoint_and_exits_0(demo_data, tmp_path):
    run = tmp_path / "run"
    process = _start(demo_data, run, "trainer.steps=200", "trainer.checkpoint_every=100")
    _wait_for(lambda: _logged_steps(run) >= 3, process)
    for worker in psutil.Process(process.pid).children():
        worker.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, process.stdout.read().decode()[-3000:]
    last_logged = read_metrics(run)[-1]["step"]
    assert checkpoints(run) == [f"step_{last_logged}"]
    assert 3 <= last_logged < 200


def checksum(input_ids: torch.Tensor) -> float:
    """The trainer's data/checksum of one micro-batch."""
    positions = torch.arange(1, input_ids.numel() + 1, dtype=torch.float64)
    return ((input_ids.flatten().double() * positions).sum() % 2**40).item()


def read_positions(reader_state: dict, reader: int, readers: int) -> set[tuple[str, int]]:
    """(source, order position) of every sample a reader consumed in epoch 0."""
    read = set()
    for name, stream in reader_state["streams"].items():
        assert stream["epoch"] == 0
        layer = Layer.from_state(stream["layers"]["0"]) if "0" in stream.get("layers", {}) else Layer()
        read |= {(name, layer.element(reader + k * readers)) for k in range(stream["position"])}
    return read


def test_two_ranks_resumed_on_one_continue_the_data_and_read_no_sample_twice(demo_data, tmp_path):
    """Resumed on 1 rank without restart_data_order: the weights load, the optimizer restarts, and
    the data goes on from both ranks' positions. The 1-rank run's logged data checksums are those
    of the continued loader's batches, and the samples it read are none of those read before."""
    run = tmp_path / "run"
    torchrun(TRAIN, *train_overrides(demo_data, run, "trainer.steps=4", "trainer.stop_after_steps=2"))
    # 1 rank: the global batch needs 2 micro-steps of 4 x 128 tokens more than with 2 ranks.
    one_rank = torchrun(TRAIN, *train_overrides(demo_data, run, "trainer.steps=4"), nproc=1)
    assert "written by 2 ranks and this run has 1: weights and optimizer state loaded" in one_rank.stderr
    assert "and the data order continues the epoch" in one_rank.stderr

    checkpoint = run / "checkpoints" / "step_2"
    old = [torch.load(checkpoint / f"rank{r:05d}_state.pt", weights_only=True)["loader"] for r in range(2)]
    cfg = load_config(train_overrides(demo_data, run)).data
    continued = build_loader(cfg, 0, 1)
    continued.load_state_dict(old[0], every_rank=lambda: old)
    batches = list(islice(iter(continued), 8))  # 4 micro-steps a step on 1 rank
    logged = {m["step"]: m["data/checksum"] for m in read_metrics(run) if "data/checksum" in m}
    for step, micro_batches in zip((3, 4), (batches[:4], batches[4:]), strict=True):
        assert logged[step] == pytest.approx(sum(checksum(b["input_ids"]) for b in micro_batches), rel=1e-12)

    before = set().union(*(read_positions(reader_states(state)[0], r, 2) for r, state in enumerate(old)))
    after = read_positions(reader_states(continued.state_dict())[0], 0, 1)
    assert before and after and not before & after


def test_a_zero3_run_moves_from_2_ranks_to_1_and_back_with_adams_moments_and_no_sample_twice(demo_data, tmp_path):
    """2 ranks, then 1, then 2 again under ZeRO-3, each change through DeepSpeed's universal form
    of the checkpoint: the 1-rank engine's fp32 weights and Adam moments equal those gathered from
    the 2 ranks' partitions, the losses go on as in an uninterrupted run, and no sample of the
    epoch is read in two of the three parts."""
    run, reference = tmp_path / "run", tmp_path / "reference"
    zero3_steps = ("deepspeed=zero3", "trainer.steps=6")
    torchrun(TRAIN, *train_overrides(demo_data, reference, *zero3_steps))
    torchrun(TRAIN, *train_overrides(demo_data, run, *zero3_steps, "trainer.stop_after_steps=2"))
    script = (REPO / "tests" / "scripts" / "resumed_engine.py", "--write", "optimizer_state")
    for out, ranks, extra in [("2", 2, ()), ("1", 1, ()), ("restarted", 1, ("trainer.restart_optimizer=true",))]:
        overrides = train_overrides(demo_data, run, *zero3_steps, *extra)
        torchrun(*script, "--out", str(tmp_path / f"{out}.pt"), *overrides, nproc=ranks)
    two, one, restarted = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in (2, 1, "restarted"))
    assert two["step"] == one["step"] == 2 and two["state"].keys() == one["state"].keys()
    for name, states in two["state"].items():
        for key, tensor in states.items():
            assert torch.equal(one["state"][name][key], tensor), (name, key)
            assert key == "fp32" or tensor.abs().sum() > 0, (name, key)  # the moments are there, not zeros
            # trainer.restart_optimizer: the same weights, Adam's moments at zero.
            assert torch.equal(restarted["state"][name][key], tensor if key == "fp32" else torch.zeros_like(tensor))

    torchrun(TRAIN, *train_overrides(demo_data, run, *zero3_steps, "trainer.stop_after_steps=2"), nproc=1)
    back = torchrun(TRAIN, *train_overrides(demo_data, run, *zero3_steps))
    assert "written by 1 ranks and this run has 2: weights and optimizer state loaded" in back.stderr
    history, uninterrupted = losses(run), losses(reference)
    assert history[:2] == uninterrupted[:2] and len(history) == 6
    # After a change the batches hold other documents (the rest of the epoch in another split's
    # order, and other mixture draws), so the losses differ by batch noise: up to 3.3% here.
    assert history == pytest.approx(uninterrupted, rel=0.05)

    def read_by(step: int, ranks: int) -> set:
        states = [torch.load(run / "checkpoints" / f"step_{step}" / f"rank{r:05d}_state.pt", weights_only=True)
                  for r in range(ranks)]  # fmt: skip
        return set().union(*(read_positions(reader_states(s["loader"])[0], r, ranks) for r, s in enumerate(states)))

    parts = [read_by(2, 2), read_by(4, 1), read_by(6, 2)]
    assert all(parts) and sum(map(len, parts)) == len(set().union(*parts)), [len(p) for p in parts]


def test_batch_arithmetic_errors_say_what_to_change(demo_data, tmp_path, capsys):
    assert train_main(train_overrides(demo_data, tmp_path, "trainer.global_batch_tokens=3000")) == 2
    message = capsys.readouterr().err
    assert "trainer.global_batch_tokens=3,000 is not a positive multiple of" in message
    assert "4 x 128 x 1 = 512" in message and "set trainer.global_batch_tokens to 2,560 or 3,072" in message
    assert train_main(train_overrides(demo_data, tmp_path, "data.seq_len=8192")) == 2
    assert "exceeds model.max_seq_len" in capsys.readouterr().err
    assert train_main(train_overrides(demo_data, tmp_path, "trainer.stepz=3")) == 2


def test_zero3_checkpoint_consolidates_to_the_live_engines_loss(demo_data, tmp_path, capsys):
    from fusion_train.cli import convert_main
    from fusion_train.model.chameleon import Chameleon
    from fusion_train.model.convert import load_native

    run = tmp_path / "run"
    overrides = train_overrides(demo_data, run, "deepspeed=zero3", "trainer.steps=3")
    torchrun(TRAIN, *overrides)
    torchrun(REPO / "tests" / "scripts" / "resumed_engine.py", "--out", str(tmp_path / "live.pt"), *overrides)
    live = torch.load(tmp_path / "live.pt", weights_only=True)

    # The shards moved away since: the checkpoint itself says what the conversion needs.
    checkpoint = run / "checkpoints" / "step_3"
    trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
    for source in trainer_state["config"]["data"]["sources"].values():
        source["path"] = str(tmp_path / "moved_away")
    (checkpoint / "trainer_state.json").write_text(json.dumps(trainer_state))
    assert convert_main(["zero-to-safetensors", str(checkpoint), str(tmp_path / "model")]) == 0
    state, cfg, vocab = load_native(tmp_path / "model")
    assert vocab == Manifest.read(demo_data["shards"]["text"]).vocab
    fingerprints = json.loads((tmp_path / "model" / "config.json").read_text())["tokenizer_fingerprints"]
    assert fingerprints == {k: v for k, v in Manifest.read(demo_data["shards"]["image_text"]).fingerprints.items() if v}
    model = Chameleon(cfg)
    model.load_state_dict(state)
    with torch.no_grad():
        loss = model(live["input_ids"], labels=live["labels"]).loss
    torch.testing.assert_close(loss, live["loss"], rtol=1e-5, atol=1e-5)
    assert convert_main(["to-hf", str(checkpoint), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "from_hf")]) == 0

    # New runs start from those weights (trainer.init_from): from the ZeRO-3 checkpoint under
    # ZeRO-1, and from the HF export imported back under ZeRO-3. Their first batch's loss is the
    # source model's.
    for name, init_from, stage in [("from_checkpoint", checkpoint, 1), ("from_hf", tmp_path / "from_hf", 3)]:
        started = tmp_path / f"{name}.pt"
        new_run = train_overrides(
            demo_data, tmp_path / name, f"deepspeed=zero{stage}", f"trainer.init_from={init_from}"
        )
        torchrun(REPO / "tests" / "scripts" / "resumed_engine.py", "--out", str(started), *new_run)
        first = torch.load(started, weights_only=True)
        with torch.no_grad():
            expected = model(first["input_ids"], labels=first["labels"]).loss
        torch.testing.assert_close(first["loss"], expected, rtol=1e-5, atol=1e-5)
        fresh = Chameleon(cfg, seed=0)(first["input_ids"], labels=first["labels"]).loss
        assert not torch.allclose(fresh, expected, rtol=1e-3), "the trained weights must differ from a fresh start"
    # A checkpoint from before the layout was stored in it needs its shards, and says so.
    del trainer_state["vocab"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(trainer_state))
    assert convert_main(["zero-to-safetensors", str(checkpoint), str(tmp_path / "old")]) == 2
    assert "put the shards back at their training paths" in capsys.readouterr().err
