"""Expert parallelism: each modality group's experts spread over N ranks (`trainer.expert_parallel`),
each rank holding per_modality / N of them; routers and everything else stay data-parallel.

Which DeepSpeed part, and why (0.19.8's source): its native MoE layer (deepspeed/moe/layer.py)
gates with TopKGate, which drops a token over capacity by its position (and, by default, a random
one: RTS), cannot route a token among its own modality's experts only, and needs the same number of
tokens on every rank (its all-to-all moves fixed [experts, capacity, dim] blocks). AutoEP
(module_inject/auto_ep_layer.py) is dropless and takes ZeRO-3, but replaces the MoE blocks of
Hugging Face models it has presets for. So the routing is the model's own (model/experts.py), and
the experts are handed to DeepSpeed as its MoE layer: `ExpertParallelGroup` is a
`deepspeed.moe.layer.MoE` to the engine, which then
- makes the expert-parallel and expert-data-parallel groups (`set_deepspeed_parallelism`),
- reduces the experts' gradients over the ranks holding the same experts only, divided by the
  whole data-parallel size (the all-to-all's backward has already summed the other ranks' tokens'
  contributions), so the gradients equal those of the same run without expert parallelism,
- partitions their Adam state in ZeRO-1/2 over the expert-data-parallel group, and
- checkpoints each expert in its own file under its global number (layer_L_expert_E_...), the
  rest as usual. Its MoE checkpoint code finds experts by name, hence the state-dict names
  `deepspeed_moe.experts.deepspeed_experts.N` inside the group.
What that costs: DeepSpeed refuses its MoE layer under ZeRO-3, ZeRO-2 with it needs contiguous
gradients, and the universal conversion does not handle its expert files, so a checkpoint resumes
with the same ranks and expert parallelism only (`check_resume`).

A forward moves each kept route's token to the rank of its expert and the expert's output back:
two variable-size all-to-alls per modality group per block (their split sizes are exchanged
first, a third, small one). Every rank takes part for every group, with or without tokens of it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as differentiable
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from fusion_train.model.chameleon import ChameleonConfig
from fusion_train.model.experts import ExpertGroup, ModalityExperts, Routes, route
from fusion_train.train.config import DeepSpeedConfig


class ExpertParallelError(ValueError):
    pass


def check_layout(size: int, world_size: int, model: ChameleonConfig, zero: DeepSpeedConfig) -> None:
    """Refuse an expert-parallel layout DeepSpeed or the model cannot run, saying what to change."""
    if size < 1:
        raise ExpertParallelError(f"trainer.expert_parallel={size}: it must be at least 1")
    if size == 1:
        return
    experts = model.experts_config
    problems = [
        (experts is not None, "model.experts is not set: there are no experts to place (+experts=modality adds them)"),
        (world_size % size == 0, f"the {world_size} ranks must be a multiple of it"),
        (experts is None or experts.per_modality % size == 0,
         f"model.experts.per_modality={experts and experts.per_modality} must be a multiple of it (each rank "
         "holds per_modality / N experts of each modality)"),
        (zero.zero_stage != 3, "deepspeed.zero_stage=3: DeepSpeed 0.19.8 refuses its MoE layer under ZeRO-3 "
                               "(engine._validate_zero3_moe_compatibility); use deepspeed=zero1 or zero2"),
        (zero.zero_stage != 2 or zero.contiguous_gradients is not False,
         "deepspeed.contiguous_gradients=false: DeepSpeed's ZeRO-2 takes its MoE layer with contiguous gradients "
         "only; leave it null"),
    ]  # fmt: skip
    for ok, problem in problems:
        if not ok:
            raise ExpertParallelError(f"trainer.expert_parallel={size}: {problem}")


def check_resume(saved: dict, world_size: int, size: int) -> None:
    """A checkpoint with experts spread over ranks resumes in its own layout only: DeepSpeed's
    universal conversion, which carries a checkpoint to another number of ranks, does not read
    the expert files of its MoE layer, and another expert-parallel size names the experts' weights
    differently."""
    old_size = saved.get("expert_parallel", 1)
    if max(old_size, size) == 1 or (old_size, saved["world_size"]) == (size, world_size):
        return
    raise ExpertParallelError(
        f"the checkpoint was written by {saved['world_size']} ranks at trainer.expert_parallel={old_size} and this "
        f"run has {world_size} at trainer.expert_parallel={size}: a checkpoint with expert parallelism resumes on "
        "as many ranks with the same trainer.expert_parallel (DeepSpeed's universal conversion does not handle "
        "its MoE expert files); resume it so, or start a new run in this layout from its weights with "
        "trainer.init_from=<the checkpoint> (a fresh optimizer and data order)"
    )


class _Holder(nn.Module):
    """A named level of the path DeepSpeed's MoE checkpoints expect."""

    def __init__(self, **children: nn.Module):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class ExpertParallelGroup(MoE):
    """One modality's router (replicated) and this rank's share of its experts: global experts
    [rank * local, (rank + 1) * local) of the expert-parallel group. MoE.__init__ is not called: it
    would build DeepSpeed's own gate and dispatcher, whose routing is not the model's."""

    def __init__(self, group: ExpertGroup, size: int, rank: int):
        nn.Module.__init__(self)
        self.cfg = group.cfg
        self.ep_size, self.ep_rank = size, rank
        self.num_experts = group.cfg.per_modality
        self.num_local_experts = self.num_experts // size
        self.expert_group_name = f"ep_size_{size}"
        self.enable_expert_tensor_parallelism = False
        self.router = group.router
        first = rank * self.num_local_experts
        local = nn.ModuleList(group.experts[first : first + self.num_local_experts])
        self.deepspeed_moe = _Holder(experts=_Holder(deepspeed_experts=local))
        for param in local.parameters():  # how DeepSpeed tells expert parameters apart (moe/experts.py)
            param.allreduce = False
            param.group_name = self.expert_group_name
        self.ep_group = None

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine at construction; the groups exist already (`place_experts`)."""
        self.ep_group = groups._get_expert_parallel_group(self.expert_group_name)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routes | None]:
        if x.shape[0] == 0:  # no token of this modality here, but the other ranks' may come
            routes, token, slot, expert = None, *(torch.zeros(0, dtype=torch.long, device=x.device),) * 3
        else:
            routes = route(self.router(x), self.cfg.top_k, self.cfg.capacity_factor if self.training else None)
            token, slot = routes.kept.nonzero(as_tuple=True)
            expert = routes.experts[token, slot]
            order = expert.argsort(stable=True)
            token, slot, expert = token[order], slot[order], expert[order]
        sent = torch.bincount(expert, minlength=self.num_experts).view(self.ep_size, self.num_local_experts)
        received = torch.empty_like(sent)  # [source rank, local expert]: routes coming here
        dist.all_to_all_single(received, sent, group=self.ep_group)
        send_splits, receive_splits = sent.sum(1).tolist(), received.sum(1).tolist()
        arrived = _exchange(x[token], receive_splits, send_splits, self.ep_group)
        outputs = self._run_local_experts(arrived, received)
        back = _exchange(outputs, send_splits, receive_splits, self.ep_group)
        if routes is None:  # `back` has no rows either; returned (with the unused router, for ZeRO-2's
            return back + self.router(x).sum(), None  # sake: model/experts.py), its exchange's backward runs here too
        weights = routes.weights[token, slot].unsqueeze(-1).to(x.dtype)
        return torch.zeros_like(x).index_add(0, token, back * weights), routes

    def _run_local_experts(self, arrived: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        """Each local expert on the rows sent to it; rows come by source rank, then by expert. Every
        expert runs, on no rows if none came, so that the outputs always depend on the rows that
        arrived: each rank's backward then takes part in the reverse of every exchange."""
        expert_of_row = torch.arange(self.num_local_experts, device=arrived.device).repeat(self.ep_size)
        order = expert_of_row.repeat_interleave(received.flatten()).argsort(stable=True)
        chunks = arrived[order].split(received.sum(0).tolist())
        outputs = torch.cat([expert(chunk) for expert, chunk in zip(self.local_experts, chunks, strict=True)])
        return torch.empty_like(outputs).index_copy(0, order, outputs)


def _exchange(rows: torch.Tensor, receive_splits: list[int], send_splits: list[int], group) -> torch.Tensor:
    """All-to-all of variable row counts, differentiable (its backward is the reverse exchange)."""
    received = rows.new_empty(sum(receive_splits), rows.shape[1])
    return differentiable.all_to_all_single(received, rows.contiguous(), receive_splits, send_splits, group)


def place_experts(model: nn.Module, size: int) -> None:
    """Replace every expert group of the model by its expert-parallel form, this rank keeping its
    share of the experts (the others' weights are dropped). Makes DeepSpeed's expert groups."""
    name = f"ep_size_{size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(size)
    rank = groups._get_expert_parallel_rank(name)
    for block in model.modules():
        if isinstance(block, ModalityExperts):
            for copy in block.copies:
                block.add_module(copy, ExpertParallelGroup(getattr(block, copy), size, rank))
