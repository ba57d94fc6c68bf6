"""Sequence parallelism (DeepSpeed-Ulysses): the same loss and gradients as one unsplit model, and
training runs that resume exactly, in the same layout and in another."""

import re

import pytest
import torch

from conftest import (
    REPO,
    ended,
    last_logged_step,
    rank_processes,
    read_metrics,
    start_training,
    torchrun,
    train_overrides,
    wait_for,
)
from fusion_train.train.config import load_config
from fusion_train.train.sequence_parallel import SequenceParallelError, check_layout

TRAIN = "-m fusion_train.train"
SP2 = "trainer.sequence_parallel=2"

# Tolerances for fp32 sums taken in another order: the attention's all-to-all changes none of the
# maths, only where each part of it runs.
LOSS_TOLERANCE = dict(rtol=1e-6, atol=1e-6)
GRADIENT_TOLERANCE = dict(rtol=1e-5, atol=1e-7)


def test_sequence_parallel_gives_the_unsplit_loss_and_gradients(tmp_path):
    """ZeRO-1, 2 and 3; causal and document mask; SDPA and FlexAttention; GQA with fewer key/value
    heads than ranks; the untied model; activation checkpointing: 2 ranks sharing each sequence
    give the loss, the per-modality sums and every parameter's gradient of the model on one process."""
    out = tmp_path / "equivalence.pt"
    torchrun(REPO / "tests/scripts/sequence_parallel_equivalence.py", "--out", str(out), timeout=400)
    results = torch.load(out, weights_only=False)
    assert len(results) == 6
    for case, r in results.items():
        torch.testing.assert_close(r["loss"], r["reference_loss"], **LOSS_TOLERANCE, msg=case)
        assert r["n_tokens"] == r["reference_n_tokens"], case
        for key, value in r["by_modality"].items():
            torch.testing.assert_close(value, r["reference_by_modality"][key], rtol=1e-5, atol=1e-3, msg=case)
        assert r["grads"].keys() == r["reference_grads"].keys(), case
        for name, reference in r["reference_grads"].items():
            torch.testing.assert_close(r["grads"][name], reference, **GRADIENT_TOLERANCE, msg=f"{case}: {name}")


def test_a_sequence_parallel_run_trains_as_one_rank_and_resumes_exactly_in_any_layout(demo_data, demo_videos, tmp_path):
    """2 ranks sharing each sequence (sequence_parallel=2, one data-parallel stream) train as one
    rank alone does: the same batches, the same losses within fp32 rounding. SIGKILL of rank 1
    mid-run, and the same command resumes bit-exactly. Its checkpoint of step 8 goes on at
    sequence_parallel=1 on one rank (DeepSpeed's universal format), and the one rank's on 2 ranks at
    sequence_parallel=2: each continues the same epoch, the same tokens in the same order. The data:
    the demo's four kinds and video shards (clips with captions, chats about clips), each video
    longer than a sequence: every run packs videos across sequences."""
    videos = demo_videos["shards"]
    common = ["trainer.steps=12", "trainer.checkpoint_every=4", "trainer.keep_last=3",
              f"+data.sources.video_text.path={videos['video_text']}", f"+data.sources.video_chat.path={videos['video_chat']}"]  # fmt: skip
    one_rank, shared = tmp_path / "one_rank", tmp_path / "shared"
    torchrun(TRAIN, *train_overrides(demo_data, one_rank, *common), nproc=1)

    process = start_training(demo_data, shared, SP2, *common)
    wait_for(lambda: last_logged_step(shared) >= 6, process)
    rank_processes(process)[1].kill()
    assert "lost a peer" in ended(process, timeout=120)
    torchrun(TRAIN, *train_overrides(demo_data, shared, SP2, *common, "trainer.stop_after_steps=4"))
    redone = {}
    for record in read_metrics(shared):
        redone.setdefault(record["step"], []).append(record["loss/total"])
    assert [len(redone[s]) for s in range(5, 9)][:2] == [2, 2]  # steps 5 and 6, before the kill and after
    assert all(len(set(values)) == 1 for values in redone.values()), redone  # and again, bit for bit

    torchrun(TRAIN, *train_overrides(demo_data, shared, *common), nproc=1)
    from_one_rank = tmp_path / "from_one_rank"
    torchrun(TRAIN, *train_overrides(demo_data, from_one_rank, SP2, f"trainer.resume_from={one_rank}/checkpoints/step_8",
                                     *common))  # fmt: skip
    reference = by_step(one_rank)
    for run, steps in ((shared, range(1, 13)), (from_one_rank, range(9, 13))):
        records = by_step(run)
        assert [records[s]["data/checksum"] for s in steps] == [reference[s]["data/checksum"] for s in steps]
        for s in steps:
            assert abs(records[s]["loss/total"] - reference[s]["loss/total"]) < 1e-5, (run.name, s)
    # Video frames and their sound are logged apart from still images, and add up with them.
    logged = [m for m in by_step(shared).values() if "loss/video_image" in m and "loss/still_image" in m]
    assert logged and all(min(m["loss/video_image"], m["loss/still_image"]) <= m["loss/image"]
                          <= max(m["loss/video_image"], m["loss/still_image"]) for m in logged)  # fmt: skip


def by_step(run) -> dict[int, dict]:
    """The last record of each step (a resumed run logs the steps after its checkpoint again)."""
    return {m["step"]: m for m in read_metrics(run) if "loss/total" in m}


def test_a_layout_ulysses_cannot_run_is_refused_naming_the_setting():
    tiny = load_config(["model=tiny"]).model  # 4 heads, 2 key/value heads
    cases = [
        (3, 4, {"data.seq_len": 96}, "the 4 ranks must be a multiple of it"),
        (2, 2, {"data.seq_len": 128, "eval_data.seq_len": 129}, "eval_data.seq_len=129 must be a multiple of it"),
        (8, 8, {"data.seq_len": 128}, "model.n_heads=4 must be a multiple of it"),
        (0, 2, {"data.seq_len": 128}, "it must be at least 1"),
    ]
    for size, ranks, seq_lens, problem in cases:
        with pytest.raises(SequenceParallelError, match=re.escape(f"trainer.sequence_parallel={size}: {problem}")):
            check_layout(size, ranks, tiny, seq_lens)
    check_layout(4, 8, tiny, {"data.seq_len": 128})  # 2 key/value heads, each copied to 2 of the 4 ranks
    check_layout(4, 8, load_config(["model=tiny", "model.n_kv_heads=1"]).model, {"data.seq_len": 128})
