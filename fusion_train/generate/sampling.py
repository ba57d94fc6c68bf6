"""The next token from masked logits: greedy, or temperature with top-k and top-p.

Sampling draws from a seeded CPU `torch.Generator` on the fp32 probabilities, so a seed gives the
same tokens on any machine that computes the same logits (a GPU's generator would not)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy; Meta's inference uses 0.7 for text and images
    top_p: float = 1.0  # keep the smallest set of ids whose probability reaches top_p (Meta: 0.9)
    top_k: int = 0  # keep the k most likely ids (0: all)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"sampling: temperature must be >= 0, top_p in (0, 1] and top_k >= 0 (got temperature="
                f"{self.temperature}, top_p={self.top_p}, top_k={self.top_k})"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B, vocab] with the ids outside the top-k and the top-p nucleus set to -inf."""
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # An id stays when the ids more likely than it hold less than top_p: the first always does.
        outside = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """[B] ids from masked logits [B, vocab], on the logits' device."""
    if sampling.greedy:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = logits.softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
