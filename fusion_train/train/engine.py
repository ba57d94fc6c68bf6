"""The DeepSpeed engine around the plain model: our optimizer and schedule, ZeRO and precision
from our config, activation checkpointing and regional torch.compile applied from outside."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import has_moe_layers, split_params_into_different_moe_groups_for_optimizer
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from fusion_train.model.chameleon import Chameleon, HeadLayerNorm, RMSNorm
from fusion_train.train.config import TrainConfig
from fusion_train.train.expert_parallel import place_experts
from fusion_train.train.init_from import pretrained_values
from fusion_train.train.schedule import build_schedule
from fusion_train.train.sequence_parallel import SequenceParallel

log = logging.getLogger(__name__)
SHM_COMM_OP = "deepspeed_shm_comm"


def announce_op_builds() -> None:
    """On a CPU, DeepSpeed's process-group setup JIT-compiles its shared-memory collective op the
    first time in each environment (minutes, without a word). Say so first, on one rank per node.
    The build is cached under the torch-extensions folder; another virtualenv's DeepSpeed sources
    sit elsewhere, so its first launch compiles again (ninja sees other source paths)."""
    if torch.cuda.is_available() or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    from torch.utils.cpp_extension import _get_build_directory

    build = Path(_get_build_directory(SHM_COMM_OP, verbose=False))
    ninja = build / "build.ninja"
    sources = str(Path(deepspeed.__file__).parent)
    if (build / f"{SHM_COMM_OP}.so").is_file() and ninja.is_file() and sources in ninja.read_text():
        return
    log.warning(
        "first launch in this environment: DeepSpeed compiles its CPU communication op %s (1-3 minutes, once; "
        "cached in %s)", SHM_COMM_OP, build,
    )  # fmt: skip


def use_bf16(cfg: TrainConfig) -> bool:
    """bf16 with fp32 master weights on GPU; on a CPU bf16 is slower than fp32, so fp32 there."""
    return cfg.deepspeed.bf16 and torch.cuda.is_available()


def zero_settings(cfg: TrainConfig, data_parallel_size: int) -> dict:
    """ZeRO's section of the DeepSpeed config. `overlap_comm` and `contiguous_gradients` left unset
    are on with several data-parallel ranks and off with one: with no peer to reduce with, the
    contiguous bucket and partition buffers are only copies of every gradient each step (on a CPU
    into fresh pages; docs/performance.md), and there is no communication to overlap."""
    zero = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage > 0:
        several = data_parallel_size > 1
        zero.update(
            overlap_comm=several if cfg.deepspeed.overlap_comm is None else cfg.deepspeed.overlap_comm,
            contiguous_gradients=several if cfg.deepspeed.contiguous_gradients is None
            else cfg.deepspeed.contiguous_gradients,
            reduce_bucket_size=cfg.deepspeed.reduce_bucket_size,
            allgather_bucket_size=cfg.deepspeed.allgather_bucket_size,
        )  # fmt: skip
    return zero


def deepspeed_config(cfg: TrainConfig, gradient_accumulation_steps: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config of this process group's run."""
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero_settings(cfg, dist.get_world_size()),
        "bf16": {"enabled": use_bf16(cfg)},
        "steps_per_print": 2**31 - 1,  # our monitors log
        "checkpoint": {"load_universal": load_universal},
    }


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the projection and embedding matrices; none on norm weights or biases.
    Experts spread over ranks get groups of their own (DeepSpeed's ZeRO partitions them over the
    ranks holding the same experts)."""
    no_decay = {id(p) for m in model.modules() if isinstance(m, RMSNorm | HeadLayerNorm) for p in m.parameters()}
    no_decay |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    params = list(model.parameters())
    param_groups = [
        {"name": "decay", "params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    return (
        split_params_into_different_moe_groups_for_optimizer(param_groups) if has_moe_layers(model)[0] else param_groups
    )


def build_model(cfg: TrainConfig, gradient_accumulation_steps: int, pretrained: Path | None = None) -> Chameleon:
    """The model with its initial weights: those of the `pretrained` model folder, else a function
    of trainer.seed alone. Under ZeRO-3 it is built inside deepspeed.zero.Init, which partitions
    each module's parameters over the ranks as soon as the module is made, so no rank ever holds
    more than its share plus one module's tensors; then each rank writes its slice of every
    parameter's initial value, one parameter at a time."""
    partitioned = cfg.deepspeed.zero_stage == 3
    if not partitioned and pretrained is None:
        return Chameleon(cfg.model, seed=cfg.trainer.seed)
    if partitioned:
        # mem_efficient_linear would replace torch.nn.functional.linear for the whole process.
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, gradient_accumulation_steps),
                                 mem_efficient_linear=False):  # fmt: skip
            model = Chameleon(cfg.model, seed=None)
    else:
        model = Chameleon(cfg.model, seed=None)
    if pretrained is None:
        values = lambda name, shape: model.initial_value(name, shape, cfg.trainer.seed)  # noqa: E731
    else:
        values = pretrained_values(pretrained, [name for name, _ in model.named_parameters()])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if partitioned:
                _write_partition(param, values(name, param.ds_shape))
            else:
                param.copy_(values(name, param.shape))
    if partitioned:
        held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
        whole = sum(p.ds_numel * p.ds_tensor.element_size() for p in model.parameters())
        log.info("rank %d holds %.1f%% of the model's parameters (%.3g of %.3g GB), built partitioned (ZeRO-3)",
                 dist.get_rank(), 100 * held / whole, held / 1e9, whole / 1e9)  # fmt: skip
    return model


def _write_partition(param: nn.Parameter, whole: torch.Tensor) -> None:
    """This rank's part of a ZeRO-3 parameter: the slice of the flattened whole value that its
    ds_tensor holds (the layout DeepSpeed's own consolidation reads). Every rank has the whole
    value, one parameter at a time, rather than gathering: no collective, no buffer beyond it."""
    part = param.ds_tensor
    start = dist.get_rank() * part.numel()
    values = whole.reshape(-1)[start : start + part.numel()]
    part[: values.numel()].copy_(values)


def prepare_model(model: Chameleon, cfg: TrainConfig, sequence: SequenceParallel | None = None) -> Chameleon:
    """Sequence parallelism's attention, experts spread over ranks, activation checkpointing and
    compilation, per block, from outside the model."""
    if sequence is not None:
        sequence.wrap_attention(model)
    if cfg.trainer.expert_parallel > 1:
        place_experts(model, cfg.trainer.expert_parallel)
    for i, block in enumerate(model.layers):
        if cfg.trainer.activation_checkpointing:
            block = checkpoint_wrapper(block)
        if cfg.trainer.compile:
            block = torch.compile(block)
        model.layers[i] = block
    return model


@torch.no_grad()
def restart_adam(optimizer) -> None:
    """Adam's moments and step count back to zero, in place, in whatever partition of them this
    rank holds (DeepSpeed's ZeRO optimizers wrap the torch AdamW and keep links to its state)."""
    adam = getattr(optimizer, "optimizer", optimizer)
    for state in adam.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()
        if not torch.is_tensor(state.get("step", 0)):
            state["step"] = 0


def build_engine(
    model: Chameleon,
    cfg: TrainConfig,
    gradient_accumulation_steps: int,
    load_universal: bool = False,
    sequence: SequenceParallel | None = None,
):
    """`load_universal`: the checkpoint to resume comes in DeepSpeed's universal format (another
    number of ranks wrote it). `sequence`: the sequence-parallel layout, if any (DeepSpeed is not
    told of it: sequence_parallel.py says why)."""
    # Fused on a CPU too: the per-tensor path makes temporaries the size of ZeRO's whole flat
    # partition (sqrt, div) each step, 30% of a step at the CPU peer comparison's shape.
    model = prepare_model(model, cfg, sequence)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=True,
    )
    schedule = build_schedule(cfg.optim.schedule, cfg.optim.warmup_steps, cfg.trainer.steps, cfg.optim.final_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, gradient_accumulation_steps, load_universal),
    )
    return engine, optimizer, scheduler
