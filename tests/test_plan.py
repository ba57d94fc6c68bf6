"""`fusion-train --plan`: the model-state memory is DeepSpeed's own estimate, and a 34B plan is made
from the config alone."""

import dataclasses
import json

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage3 import model_to_params as parameters_and_largest_module
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from fusion_train.commands.train import main as train_main
from fusion_train.model.chameleon import Chameleon
from fusion_train.model.size import largest_module_parameters, parameter_counts
from fusion_train.train.config import load_config
from fusion_train.train.plan import make_plan, memory, model_state_bytes


@pytest.mark.parametrize("gpus_per_node, nodes", [(1, 1), (8, 1), (8, 16)])
def test_model_states_are_deepspeeds_estimate_for_every_stage(gpus_per_node, nodes):
    cfg = load_config(["model=tiny"]).model
    total, largest = parameters_and_largest_module(Chameleon(cfg))
    assert (total, largest) == (parameter_counts(cfg).total, largest_module_parameters(cfg))
    ranks = gpus_per_node * nodes
    plan = {stage: sum(model_state_bytes(total, largest, stage, ranks).values()) for stage in (1, 2, 3)}
    _, zero2 = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes, cpu_offload=False)
    assert plan[2] == pytest.approx(zero2, abs=1) and plan[3] == pytest.approx(zero3, abs=1)
    # DeepSpeed has no ZeRO-1 estimate: stage 1 is stage 2 with the bf16 gradients whole on every rank.
    assert plan[1] == pytest.approx(zero2 + 2 * total * (1 - 1 / ranks), abs=1)


def test_a_34b_plan_on_8_gpus_from_the_config_alone(tmp_path, capsys):
    """The 34B preset never exists here (137 GB in fp32): the plan needs only its config."""
    overrides = ["--plan", "--gpus", "8", "model=34b", "deepspeed=zero3", "data=chameleon_stage1",
                 "trainer.global_batch_tokens=12582912", "trainer.gpu=a100", f"trainer.run_dir={tmp_path}"]  # fmt: skip
    assert train_main(overrides) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["parameters"] == parameter_counts(load_config(["model=34b"]).model).total
    assert plan["gradient_accumulation_steps"] == 12582912 // (4096 * 8)
    assert not plan["fits"] and plan["first_change"].startswith("more GPUs: 16 with trainer.activation_checkpointing")
    assert plan["memory_gb_per_gpu_total"] == pytest.approx(sum(plan["memory_gb_per_gpu"].values()), abs=0.01)
    printed = capsys.readouterr().out
    assert "does NOT fit: change first more GPUs: 16" in printed
    # A checkpoint: bf16 weights, fp32 master weights and Adam's two moments (test_faults.py
    # checks the arithmetic against a real checkpoint's bytes).
    assert plan["checkpoint_gb"] == pytest.approx(plan["parameters"] * 14 / 1e9, abs=0.01)
    assert f"one checkpoint: {plan['checkpoint_gb']:,.2f} GB on disk" in printed

    assert train_main([*overrides[:2], "64", *overrides[3:]]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["first_change"] == "trainer.activation_checkpointing=true"
    # The time is the FLOPs over the GPUs at the stated MFU.
    expected = 12582912 * plan["flops_per_token"] / (64 * 312e12 * 0.4)
    assert plan["seconds_per_step"] == pytest.approx(expected, abs=0.01)


def test_document_masking_through_sdpa_counts_its_dense_mask():
    settings = ["model=1b", "data.seq_len=4096", "data.micro_batch_size=8", "data.document_mask=true"]
    dense = memory(load_config(settings), ranks=1)["attention_mask"]
    assert dense == pytest.approx(8 * 4096**2 / 1e9, abs=0.01)  # 0.13 GB of booleans
    assert memory(load_config([*settings, "model.attention=flex"]), ranks=1)["attention_mask"] == 0


def test_a_flag_without_its_mode_is_an_error_and_the_rank_entry_takes_only_overrides(capsys):
    from fusion_train.train.run import main as rank_entry

    cases = [
        (["--gpus", "8", "model=34b"], "--gpus applies to --plan: add --plan, or leave --gpus out"),
        (["--nproc", "2"], "--nproc applies to -m/--multirun"),
        (["-p", "model"], "-p/--package applies to --cfg"),
        (["--resolve"], "--resolve applies to --cfg"),
    ]
    for argv, message in cases:
        assert train_main(argv) == 2
        assert f"fusion-train: error: {message}" in capsys.readouterr().err
    # `python -m fusion_train.train`, what torchrun starts on each rank, trains: the rest is fusion-train's.
    assert rank_entry(["--plan", "model=34b"]) == 2
    assert "--plan is an option of fusion-train, not of the per-rank entry" in capsys.readouterr().err


def test_sequence_parallelism_splits_the_activations_and_counts_its_all_to_all(tmp_path, capsys):
    """7b at 128K tokens per sequence on 8 GPUs: each holds 1/N of every sequence's activations
    and sends (N-1)/N of its q, k, v and attention output per block; one GPU per sequence does not
    fit and the plan says to share each over 2; a layout Ulysses cannot run is one clear error."""
    settings = ["model=7b", "deepspeed=zero3", "+stage=long_context", "data.seq_len=131072", "data.micro_batch_size=1",
                "model.max_seq_len=131072", "trainer.activation_checkpointing=true", "trainer.gpu=a100",
                "trainer.global_batch_tokens=1048576"]  # fmt: skip
    alone, shared = (
        make_plan(load_config(settings), 8),
        make_plan(load_config([*settings, "trainer.sequence_parallel=4"]), 8),
    )
    assert shared["memory_gb_per_gpu"]["activations"] == pytest.approx(
        alone["memory_gb_per_gpu"]["activations"] / 4, rel=0.01
    )
    assert (alone["data_parallel"], shared["data_parallel"], shared["tokens_per_gpu"]) == (8, 2, 32768)
    # bf16 q and output (32 heads of 128) and k and v (32 heads) for 32,768 tokens, 3/4 of them sent.
    assert alone["all_to_all_gb_per_layer"] == 0
    assert shared["all_to_all_gb_per_layer"] == pytest.approx(
        2 * 128 * (2 * 32 + 2 * 32) * 32768 * 3 / 4 / 1e9, abs=1e-3
    )
    # Forward, recomputed forward and backward of 32 blocks in each of 4 micro-steps.
    assert shared["all_to_all_gb_per_step"] == pytest.approx(shared["all_to_all_gb_per_layer"] * 3 * 32 * 4, abs=0.1)
    assert not alone["fits"] and alone["first_change"] == "trainer.sequence_parallel=2"

    assert (
        train_main(["--plan", "--gpus", "8", *settings, "trainer.sequence_parallel=3", f"trainer.run_dir={tmp_path}"])
        == 2
    )
    assert "trainer.sequence_parallel=3: the 8 ranks must be a multiple of it" in capsys.readouterr().err


def test_an_untied_plan_on_the_demo_shards_counts_a_copy_per_modality_they_have(demo_data, tmp_path):
    """The demo's shards have text, image and audio codes: each untied part counts three times."""
    from conftest import train_overrides

    overrides = ["--plan", "--gpus", "2", *train_overrides(demo_data, tmp_path), "+untie=all"]
    assert train_main(overrides) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    cfg = load_config(["model=tiny", "model.vocab_size=4608", "+untie=all"]).model
    three = dataclasses.replace(cfg, image_token_ids=[4, 516], audio_token_ids=[4096, 4608])
    assert plan["parameters"] == parameter_counts(three).total == sum(p.numel() for p in Chameleon(three).parameters())


def test_an_expert_parallel_plan_spreads_the_experts_states_and_counts_their_exchanges(tmp_path, capsys):
    """7B with 4 text + 4 image experts per block on 8 GPUs, spread over 4: a GPU holds a quarter of
    the experts' weights and gradients; Adam's states are an eighth of everything either way."""
    settings = ["model=7b", "+experts=modality", "model.image_token_ids=[4,8196]", "data=chameleon_stage1",
                "data.seq_len=4096",
                "data.micro_batch_size=1", "trainer.global_batch_tokens=262144", f"trainer.run_dir={tmp_path}"]  # fmt: skip
    whole, spread = (make_plan(load_config([*settings, f"trainer.expert_parallel={n}"]), 8) for n in (1, 4))
    cfg = load_config(settings).model
    experts = cfg.n_layers * 2 * 4 * 3 * cfg.dim * cfg.ffn_dim
    assert spread["expert_parameters"] == whole["expert_parameters"] == experts
    held = whole["memory_gb_per_gpu"]["weights_bf16"] - spread["memory_gb_per_gpu"]["weights_bf16"]
    assert held == pytest.approx(2 * experts * 3 / 4 / 1e9, abs=0.02)
    assert spread["memory_gb_per_gpu"]["master_and_adam_fp32"] == whole["memory_gb_per_gpu"]["master_and_adam_fp32"]
    # Each of a GPU's 4,096 tokens' top-1 route goes out and comes back, 3/4 of them to other GPUs.
    assert spread["expert_all_to_all_gb_per_layer"] == pytest.approx(2 * 2 * cfg.dim * 4096 * 3 / 4 / 1e9, abs=1e-3)
    assert whole["expert_all_to_all_gb_per_layer"] == 0
    assert train_main(["--plan", "--gpus", "8", *settings, "trainer.expert_parallel=4"]) == 0
    assert "experts: 34.63B parameters spread over 4 GPUs (8.66B on each); all-to-all" in capsys.readouterr().out
    assert train_main(["--plan", "--gpus", "8", *settings, "trainer.expert_parallel=4", "deepspeed=zero3"]) == 2
    assert "trainer.expert_parallel=4: deepspeed.zero_stage=3: DeepSpeed 0.19.8 refuses" in capsys.readouterr().err


def test_a_plan_on_video_shards_says_what_a_second_of_video_costs_and_a_chunk_that_cannot_fit(
    demo_data, demo_videos, tmp_path, capsys
):
    """The video demo's clips: 2 frames a second of a 66-id frame and 52 ids of sound; at
    data.seq_len=1024 a sequence holds 4.3 s and a clip with its caption about one sequence; at 100
    a chunk does not fit, which the plan says before any training."""
    from conftest import train_overrides

    video = f"+data.sources.video.path={demo_videos['shards']['video_text']}"
    for seq_len in (1024, 100):
        overrides = ["--plan", "--gpus", "2", *train_overrides(demo_data, tmp_path), video, f"data.seq_len={seq_len}",
                     f"trainer.global_batch_tokens={16 * seq_len}"]  # fmt: skip
        assert train_main(overrides) == 0
        [lengths] = json.loads((tmp_path / "plan.json").read_text())["videos"]
        assert lengths["chunk_tokens"] == 118 and lengths["tokens_per_second_of_video"] == 236
        assert lengths["frames_per_video"] == 8 and lengths["chunk_fits"] == (seq_len == 1024)
    assert lengths["seconds_per_sequence"] == round(100 / 236, 2)
    printed = capsys.readouterr().out
    assert (
        "video source video: 2 fps, a chunk (frame and its sound) 118 tokens = 236 tokens a second of video" in printed
    )
    assert "A CHUNK DOES NOT FIT data.seq_len=100" in printed
