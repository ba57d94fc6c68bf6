"""What sparse routing can go wrong with, watched per block and modality (the failure modes of
ST-MoE and Switch): a router that collapses onto one expert, routes dropped at capacity, routers
growing sure of themselves (entropy falling) and router logits growing (what the router z-loss
holds back).

    moe/{modality}/block_{i}/load_max   the busiest expert's share of the group's routes (1/E: balanced, 1: collapsed)
    moe/{modality}/block_{i}/load_min   the idlest expert's share
    moe/{modality}/block_{i}/dropped    the share of routes over capacity (their tokens skip the experts)
    moe/{modality}/block_{i}/entropy    mean router entropy per token (ln E at most)
    moe/{modality}/block_{i}/max_logit  the largest router logit of the window
    moe/{modality}/load_max             the largest load_max over blocks
    moe/load_max                        the largest over blocks and modalities (the guard's router collapse test)
    moe/router_loss                     the weighted load-balancing and z-losses added to the loss

The counts are summed on the device in each micro-batch's forward (no host sync) from what the
expert groups record (`ModalityExperts.routes`) and reduced over the ranks on logged steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fusion_train.model.experts import ModalityExperts
from fusion_train.monitor.observer import LogStep, Observer, Sum


class RouterMonitor(Observer):
    def __init__(self, layers: nn.ModuleList):
        self.groups = [layer.feed_forward for layer in layers if isinstance(layer.feed_forward, ModalityExperts)]
        first = self.groups[0]
        self.copies, self.experts = first.copies, getattr(first, first.copies[0]).cfg.per_modality
        self.cells = len(self.groups) * len(self.copies)  # (block, modality) pairs
        self.step_load: torch.Tensor | None = None  # [cells, experts] routes of this step (the guard's)

    def step_started(self, step: int, logged: bool) -> None:
        self.step_load = None

    def sums(self) -> dict[str, Sum]:
        return {"load": Sum(self.cells * self.experts), "dropped": Sum(self.cells), "routes": Sum(self.cells),
                "entropy": Sum(self.cells), "tokens": Sum(self.cells),
                "max_logit": Sum(self.cells, reduce="max", start=-math.inf), "router_loss": Sum()}  # fmt: skip

    def micro_batch(self, batch: dict, out, sums: dict) -> None:
        with torch.no_grad():
            if self.step_load is None:
                self.step_load = torch.zeros_like(sums["load"]).view(self.cells, self.experts)
            for block, group in enumerate(self.groups):
                for modality, routes in enumerate(group.routes):
                    if routes is None:
                        continue
                    cell, tokens = block * len(self.copies) + modality, routes.experts.shape[0]
                    stats = routes.stats
                    sums["load"][cell * self.experts : (cell + 1) * self.experts] += stats["load"]
                    self.step_load[cell] += stats["load"]
                    sums["dropped"][cell] += stats["dropped"]
                    sums["routes"][cell] += stats["routes"]
                    sums["entropy"][cell] += stats["entropy"] * tokens
                    sums["tokens"][cell] += tokens
                    sums["max_logit"][cell] = torch.maximum(sums["max_logit"][cell], stats["max_logit"].double())
            sums["router_loss"] += out.router_loss

    @staticmethod
    def load_max(load: torch.Tensor) -> float | None:
        """The busiest expert's share of its group's routes, over (block, modality) cells with routes."""
        routed = load.sum(-1)
        return (load.max(-1).values / routed)[routed > 0].max().item() if (routed > 0).any() else None

    def metrics(self, reduced: dict, log: LogStep) -> dict:
        load = reduced["load"].view(self.cells, self.experts)
        share = (load / load.sum(-1, keepdim=True).clamp(min=1)).tolist()
        routes, tokens = reduced["routes"].clamp(min=1), reduced["tokens"]
        dropped, entropy = (reduced["dropped"] / routes).tolist(), (reduced["entropy"] / tokens.clamp(min=1)).tolist()
        max_logit, seen = reduced["max_logit"].tolist(), tokens.tolist()
        metrics = {"moe/router_loss": reduced["router_loss"].item() / log.micro_batches}
        for cell in range(self.cells):
            if not seen[cell]:
                continue
            block, modality = divmod(cell, len(self.copies))
            prefix = f"moe/{self.copies[modality]}/block_{block}"
            metrics.update({f"{prefix}/load_max": max(share[cell]), f"{prefix}/load_min": min(share[cell]),
                            f"{prefix}/dropped": dropped[cell], f"{prefix}/entropy": entropy[cell],
                            f"{prefix}/max_logit": max_logit[cell]})  # fmt: skip
            for overall in (f"moe/{self.copies[modality]}/load_max", "moe/load_max"):
                metrics[overall] = max(metrics.get(overall, 0.0), max(share[cell]))
        return metrics
