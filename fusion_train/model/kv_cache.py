"""Keys and values of the positions decoded so far, for incremental decoding.

Preallocated per layer as `[B, kv_heads, capacity, head_dim]`. Rows of a batch may hold prompts of
different lengths: a prompt is left-padded, its padding slots are never attended to, and each row
counts its own RoPE positions, so a row decodes exactly as it would alone.
"""

from __future__ import annotations

import torch


class LayerCache:
    """One layer's keys and values; the slots being written are the owning cache's window."""

    def __init__(self, owner: KVCache, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype):
        self.owner = owner
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v [B, kv_heads, T, head_dim]; all keys and values so far."""
        start, end = self.owner.start, self.owner.length
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    def __init__(self, n_layers: int, batch: int, capacity: int, n_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):  # fmt: skip
        self.capacity = capacity
        self.layers = [
            LayerCache(self, (batch, n_kv_heads, capacity, head_dim), device, dtype) for _ in range(n_layers)
        ]
        self.filled = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # slots holding a real token
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.start = self.length = 0  # the window [start, length) of the slots being written

    @classmethod
    def for_model(cls, cfg, batch: int, capacity: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        return cls(cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.head_dim, device, dtype)

    def extend(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the next T slots for new tokens (`valid` [B, T]: False for left padding); returns
        their RoPE positions [B, T] and the attention mask [B, 1, T, length] (True: attend)."""
        new = valid.shape[1]
        if self.length + new > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {new} positions exceed its capacity {self.capacity}")
        self.start, self.length = self.length, self.length + new
        self.filled[:, self.start : self.length] = valid
        positions = self.next_position[:, None] + valid.long().cumsum(1) - 1
        self.next_position += valid.long().sum(1)
        slots = torch.arange(self.length, device=valid.device)
        query_slots = slots[self.start :, None]
        # A padding query attends to itself alone, so that no row of the softmax is empty.
        allowed = (slots[None, None, :] <= query_slots) & (self.filled[:, None, : self.length] | (slots == query_slots))
        return positions.clamp(min=0), allowed.unsqueeze(1)
