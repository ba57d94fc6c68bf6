"""Parameter and FLOP counts from a config alone, so that a 34B preset can be sized without
allocating it."""

from __future__ import annotations

from dataclasses import dataclass

from fusion_train.model.chameleon import ChameleonConfig


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    embedding: int  # the token embedding table only; the output layer is a matmul and counts as compute

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def parameter_counts(cfg: ChameleonConfig) -> ParameterCounts:
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    attention = 2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv_dim
    qk_norm = 2 * 2 * cfg.qk_norm_groups * cfg.head_dim if cfg.qk_norm else 0  # weight + bias, q and k
    feed_forward = 3 * cfg.dim * cfg.ffn_dim
    block_norms = 2 * cfg.dim
    per_layer = attention + qk_norm + feed_forward + block_norms
    embedding = cfg.vocab_size * cfg.dim
    output = cfg.vocab_size * cfg.dim
    total = embedding + cfg.n_layers * per_layer + cfg.dim + output
    return ParameterCounts(total=total, embedding=embedding)


def flops_per_token(cfg: ChameleonConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward): 6 per non-embedding parameter plus
    12 * layers * dim * seq_len for attention scores (no causal discount), torchtitan's MFU
    convention."""
    return 6 * parameter_counts(cfg).non_embedding + 12 * cfg.n_layers * cfg.dim * seq_len
