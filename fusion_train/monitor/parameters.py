"""Per-group gradient and weight norms and the update-to-weight ratio, on logged steps only.

Groups: embeddings, attention, ffn, norms (RMSNorm and QK-norm), output. Read through DeepSpeed
at the accumulation boundary, whatever the ZeRO stage:
- gradients, after backward and before the optimizer step, from the reduced gradients this rank
  owns (not `safe_get_full_grad`, which assembles every parameter's whole gradient with an
  all-reduce of its own: a data-parallel all-reduce's volume on every logged step);
- weights and updates from the fp32 master weights this rank owns: a copy of them before the step,
  made the update in place after it. The copy exists only while the step runs, when the
  activations are already freed, so it does not raise the peak memory.
The three sums of squares per group are then added across ranks in one all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import groups, safe_get_local_fp32_param, safe_get_local_grad
from torch import nn

from fusion_train.monitor.observer import LogStep, Observer

GROUPS = ("embeddings", "attention", "ffn", "norms", "output")


def parameter_group(name: str) -> str:
    if "norm" in name:  # attention_norm, ffn_norm, the final norm, q_/k_normalization
        return "norms"
    if "tok_embeddings" in name:
        return "embeddings"
    if name.startswith("output"):
        return "output"
    return "attention" if ".attention." in name else "ffn"


def local_master_weights(param: nn.Parameter, rank: int) -> torch.Tensor | None:
    """The part of this parameter's fp32 master copy that this rank owns (None: another rank's)."""
    if hasattr(param, "ds_id"):  # ZeRO-3
        return safe_get_local_fp32_param(param)
    if hasattr(param, "_hp_mapping"):
        # ZeRO-1/2 and the bf16 optimizer link each parameter to its fragment of the rank's fp32 partition.
        mapping = param._hp_mapping
        return mapping.get_hp_fragment() if mapping is not None else None
    return param if counted_here(param, rank) else None


def local_gradient(param: nn.Parameter, rank: int) -> torch.Tensor | None:
    """The part of this parameter's reduced gradient that this rank owns (None: another rank's)."""
    if hasattr(param, "ds_id"):  # ZeRO-3
        return safe_get_local_grad(param)
    if hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        if mapping is None:
            return None
        fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).flatten()
        if fragment.numel() == param.numel():  # the bf16 optimizer keeps whole gradients: this rank's part
            address = mapping.lp_fragment_address
            fragment = fragment.narrow(0, address.start, address.numel)
        return fragment
    return param.grad if counted_here(param, rank) else None


def counted_here(param: nn.Parameter, rank: int) -> bool:
    """An unpartitioned parameter is the same on every rank that holds it: counted on the first (of
    the ranks holding the same experts, for an expert spread over ranks)."""
    if is_moe_param(param):
        return groups._get_expert_data_parallel_rank(param.group_name) == 0
    return rank == 0


class ParameterMonitor(Observer):
    """Measures on logged steps only, around the optimizer step (the observer's hooks below)."""

    def __init__(self, model: nn.Module, rank: int):
        self.rank = rank
        self.logged, self.measured = False, {}
        self.named = [(parameter_group(name), p) for name, p in model.named_parameters()]
        self.device = self.named[0][1].device
        self.grad_sq: torch.Tensor | None = None
        self.before: list[torch.Tensor | None] = []

    def _group_sums(self, tensors) -> torch.Tensor:
        """Each group's sum of squares, one fused norm kernel per group rather than one per tensor."""
        by_group: list[list[torch.Tensor]] = [[] for _ in GROUPS]
        for (group, _), tensor in zip(self.named, tensors, strict=True):
            if tensor is not None:
                by_group[GROUPS.index(group)].append(tensor)
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        norms = [
            torch.stack(torch._foreach_norm(group, 2, dtype=torch.float32)) if group else zero for group in by_group
        ]
        return torch.stack([n.double().square().sum() for n in norms])

    def _read_gradients(self) -> None:
        """At the accumulation boundary, after backward: gradient norms and the weights' copy."""
        self.grad_sq = self._group_sums(local_gradient(p, self.rank) for _, p in self.named)
        self.before = [self._master(p, copy=True) for _, p in self.named]

    def _master(self, param: nn.Parameter, copy: bool = False) -> torch.Tensor | None:
        weights = local_master_weights(param, self.rank)
        return weights.detach().clone() if copy and weights is not None else weights

    def _measure(self) -> dict[str, float]:
        after = [self._master(p) for _, p in self.named]
        updates = self.before  # the copy becomes the update in place: no second copy's memory
        held = [(u, a.detach()) for u, a in zip(updates, after, strict=True) if u is not None]
        if held:  # a rank may hold none (unpartitioned weights are counted on rank 0)
            torch._foreach_sub_(*map(list, zip(*held, strict=True)))
        self.before = []
        sums = torch.stack((self.grad_sq, self._group_sums(after), self._group_sums(updates)))
        dist.all_reduce(sums)
        values = sums.tolist()
        metrics = {}
        for group, grad, weight, update in zip(GROUPS, *values, strict=True):
            metrics[f"grad/norm_{group}"] = grad**0.5
            metrics[f"params/norm_{group}"] = weight**0.5
            metrics[f"optim/update_ratio_{group}"] = (update / weight) ** 0.5 if weight else 0.0
        total_weight, total_update = sum(values[1]), sum(values[2])
        metrics["optim/update_ratio"] = (total_update / total_weight) ** 0.5 if total_weight else 0.0
        return metrics

    def step_started(self, step: int, logged: bool) -> None:
        self.logged = logged

    def before_optimizer_step(self) -> None:
        if self.logged:
            self._read_gradients()

    def step_ended(self, step: int, sums: dict) -> bool:
        if self.logged:
            self.measured = self._measure()
        return False

    def metrics(self, reduced: dict, log: LogStep) -> dict:
        measured, self.measured = self.measured, {}
        return measured
