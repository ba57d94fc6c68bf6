"""Sparse feed-forward experts grouped by modality (MoMa, arXiv 2407.21770): each block's
feed-forward becomes, per modality (text and control tokens, image, audio), a group of experts and
a router that sends each token of that modality to `top_k` of its own group's experts.

Token choice (each token picks its experts), not MoMa's expert choice: expert choice lets an expert
pick among all of a batch's tokens, later ones included, which a causal model cannot do at
inference. The routing follows DeepSpeed's `topkgating` (deepspeed/moe/sharded_moe.py, 0.19.x) so
that its MoE layer can take over under expert parallelism:

- router probabilities are the softmax of a linear map of the token, in fp32;
- each token goes to its top-k experts; at top-1 the expert's output is scaled by its router
  probability (Switch, DeepSpeed's top1gating: how the router learns from the language loss), at
  top-2 and more by weights that sum to 1 over the routes kept (the kept probabilities divided by
  their sum, DeepSpeed's top2/topkgating). So one expert per modality is exactly the untied block
  (its probability is 1), and equal experts at top-k >= 2 exactly the dense one;
- capacity: an expert takes at most ceil(tokens / experts * capacity_factor * top_k) of its group's
  tokens, those whose probability for it is highest (DeepSpeed's "probs" policy); a route over
  capacity is dropped, the token going on in the residual stream alone (`capacity_factor` null: no
  limit, nothing dropped); in eval mode (validation, generation) nothing is dropped;
- the load-balancing loss is Switch/GShard's, as DeepSpeed computes it: E^2 / k * mean_e(mean
  router probability of e * share of routes to e), 1 when balanced; the router z-loss is
  ST-MoE's, the mean squared log-sum-exp of the router logits (the same drift Chameleon's z-loss
  holds back in the output softmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertsConfig:
    per_modality: int = 4  # experts in each modality's group
    top_k: int = 1
    capacity_factor: float | None = 1.25  # None: no capacity limit
    aux_loss: float = 0.01  # coefficient of the load-balancing loss, summed over blocks
    router_z_loss: float = 0.001  # coefficient of the router z-loss, summed over blocks
    shared: int = 0  # experts every token goes through, whatever its modality (DeepSeekMoE's shared experts)

    def __post_init__(self) -> None:
        checks = [
            (self.per_modality >= 1, "per_modality must be at least 1"),
            (1 <= self.top_k <= self.per_modality, "top_k must be between 1 and per_modality"),
            (self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor must be positive or null"),
            (self.aux_loss >= 0 and self.router_z_loss >= 0, "aux_loss and router_z_loss must not be negative"),
            (self.shared >= 0, "shared must not be negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"model.experts: {message} (got {self})")


@dataclass
class Routes:
    """One group's routing of its N tokens."""

    experts: torch.Tensor  # [N, k] long: each token's chosen experts
    weights: torch.Tensor  # [N, k]: their weights (0 where the route was dropped)
    kept: torch.Tensor  # [N, k] bool: within capacity
    aux_loss: torch.Tensor  # scalar
    z_loss: torch.Tensor  # scalar
    stats: dict = field(default_factory=dict)  # detached: load [E], dropped, entropy, max_logit


def capacity(tokens: int, experts: int, top_k: int, factor: float | None) -> int | None:
    return None if factor is None else math.ceil(tokens / experts * factor * top_k)


def route(logits: torch.Tensor, top_k: int, capacity_factor: float | None) -> Routes:
    """The routes of N tokens given their router logits [N, E]."""
    logits = logits.float()
    tokens, experts = logits.shape
    probs = logits.softmax(-1)
    chosen_probs, chosen = probs.topk(top_k, dim=-1)
    chosen_mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, chosen, True)
    kept = torch.ones_like(chosen, dtype=torch.bool)
    limit = capacity(tokens, experts, top_k, capacity_factor)
    if limit is not None and limit < tokens:
        route_probs = torch.zeros_like(probs).scatter(1, chosen, chosen_probs)
        best = route_probs.topk(limit, dim=0).indices  # [limit, E]: each expert's most probable tokens
        within = torch.zeros_like(chosen_mask).scatter_(0, best, True) & chosen_mask
        kept = within.gather(1, chosen)
    weights = chosen_probs * kept
    if top_k > 1:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
    share = chosen_mask.float().mean(0)
    aux = (probs.mean(0) * share).mean() * experts * experts / top_k
    log_z = torch.logsumexp(logits, dim=-1)
    entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
    stats = {"load": chosen_mask.sum(0).detach(), "dropped": (~kept).sum().detach(), "routes": kept.numel(),
             "entropy": entropy.detach(), "max_logit": logits.max().detach()}  # fmt: skip
    return Routes(chosen, weights, kept, aux, log_z.square().mean(), stats)


class ExpertGroup(nn.Module):
    """One modality's router and experts."""

    def __init__(self, make_expert, dim: int, cfg: ExpertsConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(dim, cfg.per_modality, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(cfg.per_modality))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routes | None]:
        # The router and every expert run on every call, on no tokens if none are theirs, so that
        # each parameter has a gradient on every rank: ZeRO-2 reduces gradients as they are ready,
        # and a parameter one rank leaves out makes the ranks' reductions differ.
        if x.shape[0] == 0:
            return sum((expert(x) for expert in self.experts), self.router(x).sum()), None
        # Capacity binds in training only: at inference a token's routes must not depend on the
        # others in the batch (a KV cache's one token at a time equals the whole sequence at once).
        routes = route(self.router(x), self.cfg.top_k, self.cfg.capacity_factor if self.training else None)
        out = torch.zeros_like(x)
        for number, expert in enumerate(self.experts):
            token, slot = ((routes.experts == number) & routes.kept).nonzero(as_tuple=True)
            weight = routes.weights[token, slot].unsqueeze(-1).to(x.dtype)
            out = out.index_add(0, token, expert(x[token]) * weight)
        return out, routes


class ModalityExperts(nn.Module):
    """A block's feed-forward as an expert group per modality, on tokens grouped by a
    ModalityRouting (text first, then image, then audio), plus the shared experts every token goes
    through (their outputs added). After each forward, `routes` holds each
    group's Routes (None for a group without tokens) for the loss and the monitors."""

    def __init__(self, make_expert, dim: int, cfg: ExpertsConfig, copies: tuple[str, ...]):
        super().__init__()
        self.copies = copies
        for name in copies:
            self.add_module(name, ExpertGroup(make_expert, dim, cfg))
        self.shared = nn.ModuleList(make_expert() for _ in range(cfg.shared))
        self.routes: list[Routes | None] = []

    def forward(self, x: torch.Tensor, routing) -> torch.Tensor:
        outputs, self.routes = [], []
        for name, part in zip(self.copies, x.split(routing.counts), strict=True):
            # Every group is called, with or without tokens: an expert-parallel one exchanges the
            # other ranks' tokens (train/expert_parallel.py).
            out, routes = getattr(self, name)(part)
            outputs.append(out)
            self.routes.append(routes)
        return sum((expert(x) for expert in self.shared), torch.cat(outputs))

    def router_loss(self, cfg: ExpertsConfig) -> torch.Tensor:
        """This block's weighted load-balancing and z-losses, each averaged over its groups by their tokens."""
        present = [r for r in self.routes if r is not None]
        tokens = sum(r.experts.shape[0] for r in present)
        return sum(r.experts.shape[0] / tokens * (cfg.aux_loss * r.aux_loss + cfg.router_z_loss * r.z_loss)
                   for r in present)  # fmt: skip
