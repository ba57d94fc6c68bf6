"""Parameter and FLOP counts from a config alone, so that a 34B preset can be sized without
allocating it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fusion_train.model.chameleon import ChameleonConfig


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    embedding: int  # the token embedding table only; the output layer is a matmul and counts as compute

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def parameters_by_group(cfg: ChameleonConfig) -> dict[str, int]:
    """Parameters in the monitors' groups: embeddings, attention, ffn, norms (QK-norm included),
    output; a part untied by modality counts once per copy, experts once each (with their routers)."""

    def copies(part: str) -> int:
        return len(cfg.untied_copies) if part in cfg.untie_modalities else 1

    experts = cfg.experts_config
    ffn = 3 * cfg.dim * cfg.ffn_dim * copies("ffn")
    if experts:  # per modality: its experts and its router (the monitors count routers as ffn)
        ffn = len(cfg.untied_copies) * experts.per_modality * (3 * cfg.dim * cfg.ffn_dim + cfg.dim)
        ffn += experts.shared * 3 * cfg.dim * cfg.ffn_dim

    kv_dim = cfg.n_kv_heads * cfg.head_dim
    qk_norm = 2 * 2 * cfg.qk_norm_groups * cfg.head_dim if cfg.qk_norm else 0  # weight + bias, q and k
    return {
        "embeddings": cfg.vocab_size * cfg.dim,
        "attention": cfg.n_layers * (2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv_dim) * copies("attention"),
        "ffn": cfg.n_layers * ffn,
        "norms": cfg.n_layers * (2 * cfg.dim * copies("norms") + qk_norm * copies("qk_norm")) + cfg.dim,
        "output": cfg.vocab_size * cfg.dim,
    }


def parameter_counts(cfg: ChameleonConfig) -> ParameterCounts:
    groups = parameters_by_group(cfg)
    return ParameterCounts(total=sum(groups.values()), embedding=groups["embeddings"])


def largest_module_parameters(cfg: ChameleonConfig) -> int:
    """The most parameters one module holds itself (the embedding or output matrix, or one
    feed-forward matrix): what ZeRO-3 gathers at once."""
    return max(cfg.vocab_size * cfg.dim, cfg.dim * cfg.ffn_dim)


def active_parameters(cfg: ChameleonConfig) -> int:
    """The non-embedding parameters one token goes through: one modality's copy of an untied part
    (the dense model's count); with experts, top_k of its modality's experts, its router and the
    shared experts."""
    active = parameter_counts(replace(cfg, untie_modalities=[], experts={})).non_embedding
    experts = cfg.experts_config
    if experts:
        ffn = (experts.top_k + experts.shared - 1) * 3 * cfg.dim * cfg.ffn_dim
        active += cfg.n_layers * (ffn + cfg.dim * experts.per_modality)
    return active


def flops_per_token(cfg: ChameleonConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward): 6 per active parameter (`active_parameters`)
    plus 12 * layers * dim * seq_len for attention scores (no causal discount), torchtitan's MFU
    convention."""
    return 6 * active_parameters(cfg) + 12 * cfg.n_layers * cfg.dim * seq_len
