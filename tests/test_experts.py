"""Modality-aware experts (fusion_train/model/experts.py): one expert per modality is the untied
model, equal experts are the dense model, routes stay in their modality, capacity drops what it
says, and the load-balancing loss is the formula worked by hand."""

import dataclasses
import json
import math
import re
import shutil

import pytest
import torch

from conftest import (
    REPO,
    ended,
    last_logged_step,
    rank_processes,
    read_metrics,
    sample_overrides,
    start_training,
    torchrun,
    train_overrides,
    wait_for,
)
from fusion_train.lab.routers import COLLAPSED, final_load
from fusion_train.lab.routers import calibration as router_calibration
from fusion_train.lab.stability import read_histories
from fusion_train.model.chameleon import Chameleon, ChameleonConfig, FeedForward, ModalityRouting
from fusion_train.model.experts import ExpertsConfig, ModalityExperts, route
from fusion_train.monitor.config import GuardConfig
from fusion_train.monitor.experts import RouterMonitor
from fusion_train.monitor.observer import LogStep
from fusion_train.monitor.report import write_report
from fusion_train.train.checkpoint import Checkpointer
from fusion_train.train.config import ConfigError, load_config
from fusion_train.train.expert_parallel import ExpertParallelError
from fusion_train.train.expert_parallel import check_layout as check_expert_layout
from fusion_train.train.sequence_parallel import SequenceParallelError, check_layout
from fusion_train.weights.training_checkpoint import CheckpointError, consolidated_state_dict, read_trainer_state
from helpers import AUDIO_VOCAB, small_config

RANGES = dict(image_token_ids=[AUDIO_VOCAB.image_code_start, AUDIO_VOCAB.image_code_end],
              audio_token_ids=[AUDIO_VOCAB.audio_code_start, AUDIO_VOCAB.vocab_size])  # fmt: skip
TRAIN, EP2 = "-m fusion_train.train", "trainer.expert_parallel=2"
NO_ROUTER_LOSS = {"aux_loss": 0.0, "router_z_loss": 0.0, "capacity_factor": None}


def _config(**changes) -> ChameleonConfig:
    return dataclasses.replace(small_config(vocab_size=AUDIO_VOCAB.vocab_size, max_seq_len=64), **RANGES, **changes)


def _batch() -> torch.Tensor:
    """Text, image codes and audio codes in every row."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(AUDIO_VOCAB.text_start, AUDIO_VOCAB.text_end, (2, 12), generator=g)
    image = torch.randint(AUDIO_VOCAB.image_code_start, AUDIO_VOCAB.image_code_end, (2, 10), generator=g)
    audio = torch.randint(AUDIO_VOCAB.audio_code_start, AUDIO_VOCAB.vocab_size, (2, 10), generator=g)
    return torch.cat([text, image, text[:, :4], audio], dim=1)


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_one_expert_per_modality_is_the_untied_model_in_logits_and_gradients():
    ids = _batch()
    untied = Chameleon(_config(untie_modalities=["ffn"]))
    experts = Chameleon(_config(experts={"per_modality": 1, **NO_ROUTER_LOSS}))
    renamed = {n.replace("feed_forward.", "feed_forward.").replace(".w", ".experts.0.w", 1) if "feed_forward" in n else n: p
               for n, p in untied.state_dict().items()}  # fmt: skip
    missing, unexpected = experts.load_state_dict(renamed, strict=False)
    assert unexpected == [] and all(".router." in name for name in missing)
    torch.testing.assert_close(experts(ids), untied(ids), rtol=0, atol=0)
    (out_u, grads_u), (out_e, grads_e) = _loss_and_grads(untied, ids), _loss_and_grads(experts, ids)
    torch.testing.assert_close(out_e.loss, out_u.loss, rtol=0, atol=0)
    for name, grad in grads_u.items():
        expert_name = name.replace(".w", ".experts.0.w", 1) if "feed_forward" in name else name
        torch.testing.assert_close(grads_e[expert_name], grad, rtol=1e-6, atol=1e-9, msg=name)


def test_equal_experts_in_every_group_are_the_dense_model():
    """Top-2 of 3 equal experts per modality: the dense feed-forward, whatever the router says; each
    expert's gradient is its share of the dense one's."""
    ids = _batch()
    dense = Chameleon(_config())
    experts = Chameleon(_config(experts={"per_modality": 3, "top_k": 2, **NO_ROUTER_LOSS}), seed=1)
    state = dense.state_dict()
    for name, value in list(state.items()):
        if "feed_forward" in name:
            layer, weight = name.split(".feed_forward.")
            for group in ("text", "image", "audio"):
                for number in range(3):
                    state[f"{layer}.feed_forward.{group}.experts.{number}.{weight}"] = value
            del state[name]
    missing, _ = experts.load_state_dict(state, strict=False)
    assert all(".router." in name for name in missing)
    torch.testing.assert_close(experts(ids), dense(ids), rtol=1e-5, atol=1e-5)
    (out_d, grads_d), (out_e, grads_e) = _loss_and_grads(dense, ids), _loss_and_grads(experts, ids)
    torch.testing.assert_close(out_e.loss, out_d.loss, rtol=1e-6, atol=1e-6)
    summed = {}
    for name, grad in grads_e.items():
        if ".experts." in name:
            layer, rest = name.split(".feed_forward.")
            key = f"{layer}.feed_forward.{rest.split('.', 3)[3]}"
            summed[key] = summed.get(key, 0) + grad
        else:
            summed[name] = grad
    for name, grad in grads_d.items():
        torch.testing.assert_close(summed[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_shared_expert_goes_through_every_token_and_adds_to_the_routed_ones():
    """With the routed experts' output projections zero, a model with one shared expert is the dense
    model whose feed-forward it holds; its gradients are the dense ones."""
    ids = _batch()
    dense = Chameleon(_config())
    experts = Chameleon(_config(experts={"per_modality": 2, "shared": 1, **NO_ROUTER_LOSS}), seed=1)
    state = experts.state_dict()
    for name, value in dense.state_dict().items():
        if "feed_forward" in name:
            layer, weight = name.split(".feed_forward.")
            state[f"{layer}.feed_forward.shared.0.{weight}"] = value
        else:
            state[name] = value
    state.update({n: torch.zeros_like(v) for n, v in state.items() if ".experts." in n and n.endswith("w2.weight")})
    experts.load_state_dict(state)
    (out_d, grads_d), (out_e, grads_e) = _loss_and_grads(dense, ids), _loss_and_grads(experts, ids)
    torch.testing.assert_close(out_e.loss, out_d.loss, rtol=0, atol=0)
    for name, grad in grads_d.items():
        shared = name.replace("feed_forward.", "feed_forward.shared.0.") if "feed_forward" in name else name
        torch.testing.assert_close(grads_e[shared], grad, rtol=1e-5, atol=1e-7, msg=name)  # summed in another order


def test_routes_stay_in_their_modality_and_capacity_drops_the_least_probable():
    torch.manual_seed(0)
    cfg = ExpertsConfig(per_modality=2, top_k=1, capacity_factor=1.0)
    dim = _config().dim
    layer = ModalityExperts(lambda: FeedForward(_config()), dim, cfg, ("text", "image", "audio"))
    ids = _batch()
    routing = ModalityRouting.of(ids, [RANGES["image_token_ids"], RANGES["audio_token_ids"]])
    x = torch.randn(ids.numel(), dim)
    before = layer(x, routing)
    assert routing.counts == [32, 20, 20]
    for routes, count in zip(layer.routes, routing.counts, strict=True):
        assert int(routes.stats["load"].sum()) == count  # each token of the group routed inside it
    with torch.no_grad():
        for expert in layer.image.experts:
            expert.w2.weight.mul_(3)
    after = layer(x, routing)
    image = slice(32, 52)
    assert torch.equal(after[:32], before[:32]) and torch.equal(after[52:], before[52:])
    assert not torch.equal(after[image], before[image])

    # 10 tokens all preferring expert 0: capacity ceil(10 / 2 * 1.0) = 5 keeps the 5 most probable.
    logits = torch.stack([torch.linspace(1, 3, 10), torch.zeros(10)], dim=1)
    routes = route(logits, top_k=1, capacity_factor=1.0)
    assert routes.kept.flatten().tolist() == [False] * 5 + [True] * 5
    kept_probs = logits[5:].softmax(-1)[:, :1]  # top-1: an expert's output times its router probability
    assert torch.equal(routes.weights[:5], torch.zeros(5, 1)) and torch.allclose(routes.weights[5:], kept_probs)
    assert int(routes.stats["dropped"]) == 5 and route(logits, 1, None).kept.all()
    # A dropped token's feed-forward output is nothing: it goes on in the residual stream alone.
    group = layer.text
    with torch.no_grad():
        group.router.weight.zero_()
        group.router.weight[0] = 1.0
    tokens = torch.full((6, dim), 0.1) * torch.arange(1, 7)[:, None]
    out, routes = group(tokens)
    dropped = ~routes.kept.flatten()
    assert dropped.sum() == 3 and torch.equal(out[dropped], torch.zeros(3, dim)) and out[~dropped].abs().sum() > 0


def test_the_load_balancing_and_z_losses_are_the_formulas_worked_by_hand():
    """4 tokens, 2 experts, top-1: probabilities (0.8, 0.2), (0.6, 0.4), (0.3, 0.7), (0.9, 0.1); three
    tokens choose expert 0. aux = E^2 / k * mean_e(P_e * f_e) = 4 * ((0.65 * 0.75) + (0.35 * 0.25)) / 2."""
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    logits = probs.log()
    routes = route(logits, top_k=1, capacity_factor=None)
    assert routes.aux_loss.item() == pytest.approx(4 * (0.65 * 0.75 + 0.35 * 0.25) / 2)
    assert routes.z_loss.item() == pytest.approx(0.0, abs=1e-12)  # log-sum-exp of log-probabilities is 0
    shifted = route(logits + 2.0, top_k=1, capacity_factor=None)
    assert shifted.z_loss.item() == pytest.approx(4.0) and shifted.aux_loss.item() == pytest.approx(
        routes.aux_loss.item()
    )
    entropy = -(probs * probs.log()).sum(-1).mean().item()
    assert routes.stats["entropy"].item() == pytest.approx(entropy) and routes.stats["load"].tolist() == [3, 1]
    # In the model: the language loss plus the coefficients times each block's losses.
    model = Chameleon(_config(experts={"per_modality": 2, "aux_loss": 0.01, "router_z_loss": 0.001}))
    out = model(_batch(), labels=_batch())
    expected = sum(layer.feed_forward.router_loss(model.cfg.experts_config) for layer in model.layers)
    torch.testing.assert_close(out.loss, out.ce + out.z + expected)
    assert 0 < out.router_loss.item() < math.inf


def test_settings_that_cannot_work_are_errors_naming_them():
    cases = [
        ({"experts": {"per_modality": 2, "top_k": 3}}, "model.experts: top_k must be between 1 and per_modality"),
        ({"experts": {"per_modality": 2, "capacity_factor": 0}}, "capacity_factor must be positive or null"),
        ({"experts": {"per_modality": 2, "experts": 4}}, "model.experts: ExpertsConfig.__init__() got an unexpected"),
        ({"experts": {"per_modality": 2}, "untie_modalities": ["ffn"]}, "untie_modalities cannot also have ffn"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            _config(**changes)
    with pytest.raises(
        SequenceParallelError, match="trainer.sequence_parallel=2: model.experts cannot share a sequence"
    ):
        check_layout(2, 2, _config(experts={"per_modality": 2}), {"data.seq_len": 64})
    zero2, experts = load_config([]).deepspeed, _config(experts={"per_modality": 4})
    layouts = [
        (2, 2, _config(), zero2, "model.experts is not set"),
        (3, 4, experts, zero2, "the 4 ranks must be a multiple of it"),
        (4, 8, _config(experts={"per_modality": 6}), zero2, "model.experts.per_modality=6 must be a multiple of it"),
        (2, 2, experts, load_config(["deepspeed=zero3"]).deepspeed, "deepspeed.zero_stage=3: DeepSpeed 0.19.8 refuses"),
        (2, 2, experts, dataclasses.replace(zero2, contiguous_gradients=False), "deepspeed.contiguous_gradients=false"),
    ]  # fmt: skip
    for size, ranks, model, zero, problem in layouts:
        with pytest.raises(ExpertParallelError, match=re.escape(f"trainer.expert_parallel={size}: {problem}")):
            check_expert_layout(size, ranks, model, zero)
    check_expert_layout(2, 4, experts, load_config(["deepspeed=zero1"]).deepspeed)


def test_experts_spread_over_two_ranks_train_as_unspread_and_resume_exactly(demo_data, tmp_path):
    """2 ranks at trainer.expert_parallel=2 (each holding 2 of each modality's 4 experts) give the
    losses, router metrics, gradient and weight norms (the global one that clipping reads too) and
    weights of the same run with every expert on both ranks. SIGKILL of
    rank 1 mid-run, and the same command resumes bit-exactly from DeepSpeed's per-expert checkpoint
    files, and generates its samples with every rank in each forward; a damaged copy of its
    checkpoint is named file by file. The guard's router-collapse
    test fires in both alike; the run's report draws the loads.
    Resuming that checkpoint on one rank is refused, naming the setting."""
    # The guard's router-collapse test set to fire (a load_max above 0.3 for 2 steps in a row).
    common = ["+experts=modality", "trainer.steps=10", "trainer.checkpoint_every=4",
              "monitor.guard.router_collapse_max=0.3", "monitor.guard.router_collapse_steps=2"]  # fmt: skip
    whole, spread = tmp_path / "whole", tmp_path / "spread"
    torchrun(TRAIN, *train_overrides(demo_data, whole, *common))
    process = start_training(demo_data, spread, EP2, *common)
    wait_for(lambda: last_logged_step(spread) >= 6, process)
    rank_processes(process)[1].kill()
    assert "lost a peer" in ended(process, timeout=120)
    # Resumed with samples (every rank generates in lockstep: each holds half the experts).
    torchrun(TRAIN, *train_overrides(demo_data, spread, EP2, *common, *sample_overrides(demo_data, 5)))
    assert sorted({r["step"] for r in map(json.loads, (spread / "samples.jsonl").read_text().splitlines())}) == [5, 10]

    redone = {}
    for record in filter(lambda r: "loss/total" in r, read_metrics(spread)):
        redone.setdefault(record["step"], []).append(record)
    assert [len(redone[s]) for s in (5, 6)] == [2, 2]  # before the kill and after
    for step, records in redone.items():
        assert all(r["loss/total"] == records[0]["loss/total"] for r in records), step  # bit for bit
    reference = {r["step"]: r for r in read_metrics(whole)}
    for step, (record, *_) in redone.items():
        compared = {
            m for m in reference[step] if m.startswith(("loss/", "moe/", "guard/", "grad/", "params/", "optim/"))
        }
        assert "moe/text/block_1/entropy" in compared and compared <= record.keys(), step
        for metric in compared:
            assert record[metric] == pytest.approx(reference[step][metric], rel=1e-5, abs=1e-6), (step, metric)
    assert {s for s, r in reference.items() if "guard/router_collapse" in r} >= set(range(3, 11))
    assert "routers.png" in write_report(whole).read_text()
    spread_weights = consolidated_state_dict(spread / "checkpoints/step_10")
    whole_weights = consolidated_state_dict(whole / "checkpoints/step_10")
    assert spread_weights.keys() == whole_weights.keys()
    for name, value in whole_weights.items():
        torch.testing.assert_close(spread_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)

    # A checkpoint damaged after it was written (an expert file lost, another cut short) is named,
    # with the earlier one to resume from, before any rank starts loading.
    damaged = tmp_path / "damaged" / "step_10"
    shutil.copytree(spread / "checkpoints" / "step_10", damaged)
    shutil.copytree(spread / "checkpoints" / "step_8", damaged.parent / "step_8")
    (damaged / "layer_3_expert_1_mp_rank_00_model_states.pt").unlink()
    with open(damaged / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=re.escape(
        f"{damaged} is damaged: layer_3_expert_1_mp_rank_00_model_states.pt is missing; mp_rank_00_model_states.pt "
        f"has 100 bytes, written with ")) as error:  # fmt: skip
        Checkpointer(damaged.parent, 0, 3, 0).check_intact(damaged, read_trainer_state(damaged))
    assert str(error.value).endswith(f"Restore it, or resume from trainer.resume_from={damaged.parent / 'step_8'}")

    refused = torchrun(TRAIN, *train_overrides(demo_data, spread, "+experts=modality", "trainer.steps=12"), nproc=1,
                       check=False)  # fmt: skip
    assert "written by 2 ranks at trainer.expert_parallel=2 and this run has 1 at trainer.expert_parallel=1" in (
        refused.stderr
    ), refused.stderr[-2000:]


def test_the_experts_config_group_sets_them_and_its_fields_change_one_by_one():
    cfg = load_config(
        ["model=tiny", "+experts=modality", "model.experts.top_k=2", "model.experts.capacity_factor=null"]
    )
    assert cfg.model.experts_config == ExpertsConfig(per_modality=4, top_k=2, capacity_factor=None)


def test_the_router_monitor_sees_a_collapsed_router_and_what_capacity_drops():
    """Image router forced onto expert 0 in block 0: its load_max is 1 and, at capacity factor 1 over
    2 experts, half of its routes are dropped; the other groups' shares and entropies are a router's."""
    model = Chameleon(_config(experts={"per_modality": 2, "capacity_factor": 1.0}))
    with torch.no_grad():
        model.layers[0].feed_forward.image.router.weight.zero_()
    monitor = RouterMonitor(model.layers)
    sums = {name: torch.full((d.size,), d.start, dtype=torch.float64) for name, d in monitor.sums().items()}
    ids = _batch()
    out = model(ids, labels=ids)
    monitor.micro_batch({}, out, sums)
    metrics = monitor.metrics(sums, LogStep(1, ids.numel(), 1, 1, 1.0, 1))
    # Equal logits: top-1 takes the first expert for every token; 20 image tokens, capacity 10.
    assert metrics["moe/image/block_0/load_max"] == 1.0 and metrics["moe/image/block_0/load_min"] == 0.0
    assert metrics["moe/image/block_0/dropped"] == 0.5 and metrics["moe/image/load_max"] == 1.0
    assert (
        metrics["moe/image/block_0/entropy"] == pytest.approx(math.log(2))
        and metrics["moe/image/block_0/max_logit"] == 0
    )
    assert 0.5 <= metrics["moe/text/block_1/load_max"] < 1.0 and metrics["moe/router_loss"] == pytest.approx(
        out.router_loss.item()
    )
    assert {key.split("/")[1] for key in metrics if key.count("/") == 3} == {"text", "image", "audio"}


def test_sizes_count_every_expert_and_flops_the_top_k_a_token_goes_through():
    """4 experts a modality over 3 modalities: 12 feed-forwards and 3 routers a block, which the model
    has; a token's FLOPs are the dense model's plus one more expert at top-2, and its router's."""
    from fusion_train.model.size import active_parameters, flops_per_token, parameter_counts

    cfg = _config(experts={"per_modality": 4, "top_k": 2})
    dense = _config()
    assert parameter_counts(cfg).total == sum(p.numel() for p in Chameleon(cfg).parameters())
    extra = cfg.n_layers * (3 * cfg.dim * cfg.ffn_dim + 4 * cfg.dim)
    assert active_parameters(cfg) == parameter_counts(dense).non_embedding + extra
    assert flops_per_token(cfg, 64) - flops_per_token(dense, 64) == 6 * extra
    shared = _config(experts={"per_modality": 4, "top_k": 2, "shared": 1})
    assert parameter_counts(shared).total == sum(p.numel() for p in Chameleon(shared).parameters())
    assert active_parameters(shared) == active_parameters(cfg) + cfg.n_layers * 3 * cfg.dim * cfg.ffn_dim


def test_generation_with_the_kv_cache_equals_recomputing_every_position():
    """In eval mode capacity does not bind, so a token's routes do not depend on the batch: decoding
    one token at a time from the cache routes as the whole sequence does."""
    from fusion_train.generate.constraints import Mode
    from fusion_train.generate.generator import Generator, Request
    from fusion_train.generate.sampling import Sampling

    model = Chameleon(_config(experts={"per_modality": 3, "top_k": 2, "capacity_factor": 0.5})).eval()
    prompts = [Request(_batch()[0, :9].tolist(), Mode.INTERLEAVED), Request(_batch()[1, :14].tolist(), Mode.TEXT)]
    prompts = [Request([AUDIO_VOCAB.bos, *r.prompt], r.mode) for r in prompts]
    cached = Generator(model, AUDIO_VOCAB).generate(prompts, Sampling(), max_new_tokens=24)
    recomputed = Generator(model, AUDIO_VOCAB, use_cache=False).generate(prompts, Sampling(), max_new_tokens=24)
    assert [g.tokens for g in cached] == [g.tokens for g in recomputed]


def test_outside_formats_refuse_a_model_with_experts_naming_the_setting():
    from fusion_train.model.formats import ConversionError
    from fusion_train.model.formats.hf import to_hf_state_dict

    model = Chameleon(_config(experts={"per_modality": 2}))
    with pytest.raises(ConversionError, match=r"model.experts=\{'per_modality': 2\}: Hugging Face's Chameleon has one"):
        to_hf_state_dict(model.state_dict(), model.cfg)


def test_experts_and_null_mappings_from_the_command_line_are_set_or_refused_in_one_line():
    assert load_config(["model=tiny", "+model.experts={per_modality: 3}"]).model.experts_config.per_modality == 3
    with pytest.raises(ConfigError, match="model.rope_scaling is null in the config and takes no mapping"):
        load_config(["model=tiny", "model.rope_scaling={rope_type: linear, factor: 2}"])


def test_the_default_router_collapse_test_warns_every_collapsed_run_of_the_calibration_and_no_other():
    """The guard replayed on the stored histories of docs/experts.md's 12-run sweep (aux_loss 0, 0.001,
    0.01 x four learning rates, every step logged): at its defaults (0.9 for 20 steps) it warns
    both runs whose routers collapsed, and no other; 10 steps would false-alarm on a fresh router."""
    histories = read_histories(REPO / "tests" / "data" / "router_histories.jsonl")
    assert {h.name for h in histories if final_load(h) >= COLLAPSED} == {
        "model.experts.aux_loss=0,optim.lr=0.03",
        "model.experts.aux_loss=0,optim.lr=0.1",
    }
    rows = {
        (r["router_collapse_max"], r["router_collapse_steps"]): r for r in router_calibration(histories, GuardConfig())
    }
    default = GuardConfig()
    chosen = rows[(default.router_collapse_max, default.router_collapse_steps)]
    assert (chosen["warned"], chosen["collapsed"], chosen["false_alarms"]) == (2, 2, 0)
    assert rows[(0.9, 10)]["false_alarms"] > 0
