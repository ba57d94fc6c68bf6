"""Chameleon: one decoder-only transformer over text and image tokens.

LLaMA-2 style (RMSNorm, SwiGLU, RoPE) with Chameleon's stability changes: QK-norm (a LayerNorm
with weight and bias over each head's query/key vector, after the projection and before RoPE),
optional Swin-style norm reordering, residual dropout, and z-loss in the output layer. Parameter
names and the RoPE layout (interleaved pairs) are those of Meta's released checkpoints.

`untie_modalities` makes it a Mixture-of-Transformers (Liang et al. 2024, arXiv 2411.04996): the
named parts of every block get one copy per modality, each token goes through its own modality's
copy, and attention stays global over the mixed sequence. The tokens are grouped by modality once
per forward (`ModalityRouting`), and the blocks work on the grouped tokens; only attention itself
sees them in sequence order.

Attention is causal, or with `doc_ids` also confined to each packed document. `attention` picks the
kernel: SDPA (its flash kernel when causal; a document mask makes it a dense [B, 1, T, T] boolean,
which rules flash out) or FlexAttention, whose block mask skips the blocks no query may see. One
mask function (`causal`, `document_causal`) serves both, and the monitors.

`forward` trains and scores whole sequences; `decode` extends a KV cache (`kv_cache.py`) by new
tokens, for generation. Plain PyTorch: parallelism, activation checkpointing (wrap the modules in
`layers`), compilation and sampling are applied from outside.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from fusion_train.model.experts import ExpertsConfig, ModalityExperts
from fusion_train.model.kv_cache import KVCache, LayerCache
from fusion_train.model.loss import LossOutput, chunked_lm_loss, loss_from_sums

BLOCK_STYLES = ("prenorm", "swin")
ATTENTION_KERNELS = ("sdpa", "flex")
ROPE_SCALINGS = {  # transformers' rope_type -> the settings it reads, under transformers' names
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
UNTIED_PARTS = ("attention", "ffn", "norms", "qk_norm")  # wq/wk/wv/wo, w1/w2/w3, the two RMSNorms, QK-norms
QK_NORM_EPS = 1e-5  # torch's LayerNorm default, as in Meta's and HF's code


@dataclass
class ChameleonConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as n_heads (no GQA)
    ffn_dim: int = 11008
    vocab_size: int = 65536
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Context extension (ROPE_SCALINGS, named as transformers' rope_scaling): null, or {rope_type:
    # linear, factor: 4} (position interpolation), or {rope_type: llama3, factor: 8, low_freq_factor:
    # 1, high_freq_factor: 4, original_max_position_embeddings: 8192} (LLaMA-3.1).
    rope_scaling: dict[str, Any] | None = None
    # prenorm: h = x + attn(norm(x)) (Chameleon-7B); swin: h = x + norm(attn(x)) (Chameleon-34B)
    block_style: str = "prenorm"
    dropout: float = 0.0  # residual dropout after attention and feed-forward (0.1 for the 7B recipe)
    qk_norm: bool = True
    # Contiguous groups of heads that share one QK-norm weight/bias: 1 for models trained here;
    # the model-parallel size for Meta weights trained with per-shard QK-norm (the released 30B).
    qk_norm_groups: int = 1
    z_loss: float = 1e-5
    loss_chunk_size: int = 2048  # positions per chunk of the output projection + loss
    attention: str = "sdpa"  # the kernel (ATTENTION_KERNELS): see the module's docstring
    init_std: float = 0.02
    # Parts of every block with a copy per modality (UNTIED_PARTS; empty: the dense block), and the
    # ids [start, end) of image tokens and of audio tokens (None: the vocabulary has none), which go
    # through the image and audio copies; every other id (text and the control tokens, which sit in
    # text) goes through the text copies. The trainer sets the ids from the shards' vocabulary.
    untie_modalities: list[str] = field(default_factory=list)
    image_token_ids: list[int] | None = None
    audio_token_ids: list[int] | None = None
    # Sparse feed-forward experts grouped by modality (experts.py: ExpertsConfig's fields, e.g.
    # {per_modality: 4, top_k: 1}); empty: one feed-forward (or one per modality, untied). A mapping
    # (not null) by default, so that `+model.experts={...}` adds to it from the command line.
    experts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        checks = [
            (self.block_style in BLOCK_STYLES, f"block_style must be one of {BLOCK_STYLES}"),
            (self.attention in ATTENTION_KERNELS, f"attention must be one of {ATTENTION_KERNELS}"),
            (self.dim % self.n_heads == 0, "dim must be divisible by n_heads"),
            (self.n_heads % self.n_kv_heads == 0, "n_heads must be divisible by n_kv_heads"),
            ((self.dim // self.n_heads) % 2 == 0, "the head dimension dim/n_heads must be even (RoPE)"),
            (self.n_kv_heads % self.qk_norm_groups == 0, "n_kv_heads must be divisible by qk_norm_groups"),
            (0.0 <= self.dropout < 1.0, "dropout must lie in [0, 1)"),
            (self.loss_chunk_size > 0, "loss_chunk_size must be positive"),
            (set(self.untie_modalities) <= set(UNTIED_PARTS), f"untie_modalities: choose among {UNTIED_PARTS}"),
            *[
                (ids is None or len(ids) == 2, f"{name}_token_ids must be [first {name} id, last + 1]")
                for name, ids in (("image", self.image_token_ids), ("audio", self.audio_token_ids))
            ],
            ("qk_norm" not in self.untie_modalities or self.qk_norm, "untie_modalities has qk_norm but qk_norm is off"),
            (not (self.experts and "ffn" in self.untie_modalities),
             "experts replace the feed-forward: untie_modalities cannot also have ffn (one expert per modality is it)"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(f"model config: {message} (got {self})")
        check_rope_scaling(self.rope_scaling)
        self.experts_config  # noqa: B018 (checks the experts' settings now)

    @property
    def experts_config(self) -> ExpertsConfig | None:
        try:
            return ExpertsConfig(**self.experts) if self.experts else None
        except TypeError as err:
            raise ValueError(f"model.experts: {err} (settings: {sorted(ExpertsConfig.__dataclass_fields__)})") from None

    @property
    def routes_by_modality(self) -> bool:
        """Whether the blocks see tokens grouped by modality (untied parts or expert groups)."""
        return bool(self.untie_modalities or self.experts)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def untied_ranges(self) -> list[list[int]]:
        """The id ranges with copies of their own, in UNTIED_COPIES' order after text."""
        return [ids for ids in (self.image_token_ids, self.audio_token_ids) if ids is not None]

    @property
    def untied_copies(self) -> tuple[str, ...]:
        """The copies an untied part has: text, then the modalities the vocabulary has ids for."""
        return UNTIED_COPIES[: 1 + len(self.untied_ranges)]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the activation dtype, as LLaMA does.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class HeadLayerNorm(nn.Module):
    """LayerNorm over each head's vector, its weight and bias shared by contiguous groups of heads."""

    def __init__(self, n_heads: int, head_dim: int, groups: int):
        super().__init__()
        self.heads_per_group = n_heads // groups
        self.weight = nn.Parameter(torch.ones(groups, head_dim))
        self.bias = nn.Parameter(torch.zeros(groups, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, heads, head_dim]
        normed = F.layer_norm(x, (x.shape[-1],), eps=QK_NORM_EPS)
        weight = self.weight.repeat_interleave(self.heads_per_group, dim=0)
        bias = self.bias.repeat_interleave(self.heads_per_group, dim=0)
        return normed * weight + bias


@dataclass
class ModalityRouting:
    """A batch's tokens grouped by modality, flattened: text tokens first, then image tokens, then
    audio tokens, each group in sequence order. Made once per forward from the input ids and shared
    by every block."""

    order: torch.Tensor  # [N]: the flat position of each grouped token
    inverse: torch.Tensor  # [N]: the grouped index of each flat position
    counts: list[int]  # tokens per group, text first
    shape: torch.Size  # (B, T)

    @classmethod
    def of(cls, input_ids: torch.Tensor, ranges: list[list[int]]) -> ModalityRouting:
        """`ranges`: the [start, end) ids of each group after text."""
        group = torch.zeros_like(input_ids).flatten()
        for number, (start, end) in enumerate(ranges, start=1):
            group = torch.where((input_ids.flatten() >= start) & (input_ids.flatten() < end), number, group)
        order = torch.argsort(group.to(torch.uint8), stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(group, minlength=1 + len(ranges)).tolist()  # the forward's one host sync
        return cls(order, inverse, counts, input_ids.shape)

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] in sequence order -> [N, ...] grouped."""
        return x.flatten(0, 1).index_select(0, self.order)

    def ungroup(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] grouped -> [B, T, ...] in sequence order."""
        return x.index_select(0, self.inverse).unflatten(0, self.shape)


class SequenceOrder:
    """The dense model's routing: tokens stay [B, T, ...] in sequence order."""

    @staticmethod
    def group(x: torch.Tensor) -> torch.Tensor:
        return x

    ungroup = group


UNTIED_COPIES = ("text", "image", "audio")  # a ByModality's copies, in the order a ModalityRouting groups tokens


class ByModality(nn.Module):
    """A per-token module untied by modality: `text` for the text (and control) tokens, `image` for
    the image tokens, `audio` for the audio tokens (when the vocabulary has them), on tokens grouped
    by a ModalityRouting."""

    def __init__(self, make: Callable[[], nn.Module], copies: tuple[str, ...]):
        super().__init__()
        self.copies = copies
        for name in copies:
            self.add_module(name, make())

    def forward(self, x: torch.Tensor, routing: ModalityRouting) -> torch.Tensor:
        parts = x.split(routing.counts)
        return torch.cat([getattr(self, name)(part) for name, part in zip(self.copies, parts, strict=True)])


def untied_if(untie: bool, make: Callable[[], nn.Module], copies: tuple[str, ...]) -> nn.Module:
    return ByModality(make, copies) if untie else make()


def per_token(module: nn.Module, x: torch.Tensor, routing) -> torch.Tensor:
    """A per-token module on the tokens as `routing` lays them out."""
    return module(x, routing) if isinstance(module, ByModality | ModalityExperts) else module(x)


def dense_parameter_name(name: str) -> str:
    """The dense model's name of a parameter: `layers.0.attention.wq.image.weight` -> `layers.0.attention.wq.weight`."""
    return re.sub(rf"\.({'|'.join(UNTIED_COPIES)})\.", ".", name)


def check_rope_scaling(scaling: dict | None) -> None:
    if scaling is None:
        return
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"model.rope_scaling: rope_type must be one of {sorted(ROPE_SCALINGS)}, not {kind!r}")
    needed = set(ROPE_SCALINGS[kind])
    if set(scaling) - {"rope_type"} != needed:
        raise ValueError(f"model.rope_scaling: rope_type {kind} takes exactly {sorted(needed)}; got {dict(scaling)}")
    if scaling["factor"] < 1:
        raise ValueError(f"model.rope_scaling.factor={scaling['factor']} must be at least 1 (it stretches positions)")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"] > 0:
        raise ValueError("model.rope_scaling: llama3 needs high_freq_factor > low_freq_factor > 0")


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """RoPE's inverse frequencies [head_dim/2], fp32, scaled for a longer context as transformers'
    `rope_scaling` of the same settings: `linear` divides them all by `factor` (position
    interpolation, arXiv 2306.15595); `llama3` (LLaMA-3.1) leaves the wavelengths shorter than
    original_max_position_embeddings / high_freq_factor alone, divides those longer than
    original / low_freq_factor by `factor`, and blends the two in between."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    original = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    between = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(between, blended, scaled)


def rope_angles(
    head_dim: int, positions: torch.Tensor, theta: float, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin at integer `positions` ([T], or [B, T] when each row counts its own), [..., head_dim/2]
    in fp32. Computed per call rather than kept as buffers, which a cast of the module to bf16 would round."""
    angles = positions.float().unsqueeze(-1) * rope_frequencies(head_dim, theta, scaling, positions.device)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of each head's vector, Meta's layout."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


MaskFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal(batch, head, q_idx, kv_idx):
    """FlexAttention's mask_mod convention: whether query q_idx may attend to key kv_idx."""
    return q_idx >= kv_idx


def document_causal(doc_ids: torch.Tensor) -> MaskFunction:
    """Causal within each document of `doc_ids` [B, T] (padding, -1, is a document of its own)."""

    def mask_mod(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[batch, q_idx] == doc_ids[batch, kv_idx])

    return mask_mod


def allowed_pairs(mask_mod: MaskFunction, batch: int, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`mask_mod` at every (query, key) position pair: boolean [B or 1, 1, len(queries), len(keys)]."""
    rows = torch.arange(batch, device=queries.device)[:, None, None]
    return mask_mod(rows, 0, queries[None, :, None], keys[None, None, :]).unsqueeze(1)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean: position t may attend to s <= t of the same document."""
    positions = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    return allowed_pairs(document_causal(doc_ids), doc_ids.shape[0], positions, positions)


def block_mask(doc_ids: torch.Tensor | None, seq_len: int, device: torch.device) -> BlockMask:
    """FlexAttention's block mask, causal and, given `doc_ids`, within documents."""
    mask_mod, batch = (causal, None) if doc_ids is None else (document_causal(doc_ids), doc_ids.shape[0])
    # Compiled, it never materialises the [B, T, T] mask; on a CPU the compilation costs more than it saves.
    return create_block_mask(mask_mod, batch, None, seq_len, seq_len, device=device, _compile=device.type == "cuda")


@functools.cache
def compiled_flex_attention() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


class ScaledDotProductAttention(nn.Module):
    """softmax(q kᵀ / √d) v, causal (no mask), under a boolean mask (SDPA) or a block mask
    (FlexAttention, compiled on a GPU). A module of its own so that observers can hook its inputs
    (the monitors' largest attention logit) without touching the maths."""

    def forward(self, q, k, v, attn_mask=None):  # [B, heads, T, head_dim]
        gqa = k.shape[1] != q.shape[1]
        if isinstance(attn_mask, BlockMask):
            if q.is_cuda:
                return compiled_flex_attention()(q, k, v, block_mask=attn_mask, enable_gqa=gqa)
            if not q.requires_grad:
                return flex_attention(q, k, v, block_mask=attn_mask, enable_gqa=gqa)
            # FlexAttention has no backward on a CPU: the same mask function, as a dense mask.
            positions = torch.arange(q.shape[2], device=q.device)
            attn_mask = allowed_pairs(attn_mask.mask_mod, q.shape[0], positions, positions)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ChameleonConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        projections, qk_norm = "attention" in cfg.untie_modalities, "qk_norm" in cfg.untie_modalities
        copies = cfg.untied_copies
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wq = untied_if(projections, lambda: nn.Linear(cfg.dim, q_dim, bias=False), copies)
        self.wk = untied_if(projections, lambda: nn.Linear(cfg.dim, kv_dim, bias=False), copies)
        self.wv = untied_if(projections, lambda: nn.Linear(cfg.dim, kv_dim, bias=False), copies)
        self.wo = untied_if(projections, lambda: nn.Linear(q_dim, cfg.dim, bias=False), copies)
        self.q_normalization = self.k_normalization = None
        if cfg.qk_norm:
            self.q_normalization = untied_if(
                qk_norm, lambda: HeadLayerNorm(cfg.n_heads, cfg.head_dim, cfg.qk_norm_groups), copies
            )
            self.k_normalization = untied_if(
                qk_norm, lambda: HeadLayerNorm(cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm_groups), copies
            )
        self.attend = ScaledDotProductAttention()

    def forward(self, x, cos, sin, attn_mask=None, cache: LayerCache | None = None, routing=SequenceOrder):
        """x: the tokens as `routing` lays them out; the projections and QK-norms work on them, and
        attention on the sequence order."""
        q = per_token(self.wq, x, routing).unflatten(-1, (self.n_heads, self.head_dim))
        k = per_token(self.wk, x, routing).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = per_token(self.wv, x, routing).unflatten(-1, (self.n_kv_heads, self.head_dim))
        if self.q_normalization is not None:
            q, k = per_token(self.q_normalization, q, routing), per_token(self.k_normalization, k, routing)
        q, k, v = routing.ungroup(q), routing.ungroup(k), routing.ungroup(v)  # [B, T, heads, head_dim]
        q, k, v = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.write(k, v)
        out = self.attend(q, k, v, attn_mask).transpose(1, 2).flatten(2)
        return per_token(self.wo, routing.group(out), routing)


class FeedForward(nn.Module):
    """SwiGLU."""

    def __init__(self, cfg: ChameleonConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ChameleonConfig):
        super().__init__()
        self.swin = cfg.block_style == "swin"
        norms, copies = "norms" in cfg.untie_modalities, cfg.untied_copies
        self.attention = Attention(cfg)
        if cfg.experts:
            self.feed_forward = ModalityExperts(lambda: FeedForward(cfg), cfg.dim, cfg.experts_config, copies)
        else:
            self.feed_forward = untied_if("ffn" in cfg.untie_modalities, lambda: FeedForward(cfg), copies)
        self.attention_norm = untied_if(norms, lambda: RMSNorm(cfg.dim, cfg.norm_eps), copies)
        self.ffn_norm = untied_if(norms, lambda: RMSNorm(cfg.dim, cfg.norm_eps), copies)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, attn_mask=None, cache: LayerCache | None = None, routing=SequenceOrder):
        def attention(y):
            return self.attention(y, cos, sin, attn_mask, cache, routing)

        def attention_norm(y):
            return per_token(self.attention_norm, y, routing)

        def ffn_norm(y):
            return per_token(self.ffn_norm, y, routing)

        def feed_forward(y):
            return per_token(self.feed_forward, y, routing)

        if self.swin:
            # Normalising each branch's output bounds its norm growth (Chameleon-34B).
            h = x + self.dropout(attention_norm(attention(x)))
            return h + self.dropout(ffn_norm(feed_forward(h)))
        h = x + self.dropout(attention(attention_norm(x)))
        return h + self.dropout(feed_forward(ffn_norm(h)))


class OutputLayer(nn.Linear):
    """The untied output projection. Given labels it returns the chunked loss instead of logits;
    the projection then runs inside this module's forward, where ZeRO-3 has gathered its weight."""

    def __init__(self, cfg: ChameleonConfig):
        super().__init__(cfg.dim, cfg.vocab_size, bias=False)
        self.z_loss, self.chunk_size = cfg.z_loss, cfg.loss_chunk_size

    def forward(self, hidden, labels=None, label_modality=None, shifted=False):
        if labels is None:
            return super().forward(hidden)
        return chunked_lm_loss(
            hidden,
            self.weight,
            labels,
            z_loss=self.z_loss,
            chunk_size=self.chunk_size,
            label_modality=label_modality,
            shifted=shifted,
        )


@dataclass(frozen=True)
class SequencePart:
    """Positions [start, start + T) of a sequence of `length` tokens, T those of the input ids:
    what one rank holds when a sequence is split over ranks (sequence parallelism). The attention
    kernel must then see the whole sequence (it is wrapped from outside to gather it), so the mask
    and doc_ids are the whole sequence's; the labels come already shifted, since the target of a
    part's last position is the next part's first token."""

    start: int
    length: int


class Chameleon(nn.Module):
    def __init__(self, cfg: ChameleonConfig, seed: int | None = 0):
        """`seed`: the initial weights, a function of it alone (`init_weights`); None leaves them
        to the caller, as when the parameters are partitioned as they are created."""
        super().__init__()
        if cfg.untie_modalities and cfg.image_token_ids is None:  # audio ids are optional: not every layout has them
            raise ValueError("model.untie_modalities needs model.image_token_ids, the image ids [first, last + 1]")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = OutputLayer(cfg)
        if seed is not None:
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        for name, param in self.named_parameters():
            param.copy_(self.initial_value(name, param.shape, seed))

    def initial_value(self, name: str, shape: torch.Size, seed: int) -> torch.Tensor:
        """Parameter `name`'s initial value, fp32 on the CPU, a function of (seed, name) alone, so
        the same whether the model is built whole or a part of a parameter at a time, on any
        device. Norm weights 1 and biases 0; matrices Normal(0, init_std), the projections that
        write into the residual stream scaled down by sqrt(2 * n_layers) so that its variance does
        not grow with depth (GPT-2)."""
        module = self.get_submodule(name.rpartition(".")[0])
        if isinstance(module, RMSNorm | HeadLayerNorm):
            return torch.full(shape, 1.0 if name.endswith("weight") else 0.0)
        std = self.cfg.init_std
        if dense_parameter_name(name).endswith(("attention.wo.weight", "w2.weight")):  # an expert's w2 too
            std /= math.sqrt(2 * self.cfg.n_layers)
        digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        return torch.empty(shape).normal_(0.0, std, generator=generator)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        label_modality: torch.Tensor | None = None,
        part: SequencePart | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor | LossOutput:
        """Logits [B, T, vocab] without labels (of the last `logits_to_keep` positions only, when
        given: a long sequence's logits are its length times the vocabulary); with labels (aligned
        with input_ids, -100 where no loss) the next-token loss. doc_ids [B, T] restricts attention
        to the same document. `part`: input_ids are that part of a longer sequence (see SequencePart)."""
        shifted = part is not None
        part = part or SequencePart(0, input_ids.shape[1])
        if part.length > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {part.length} exceeds model max_seq_len={self.cfg.max_seq_len}")
        positions = torch.arange(part.start, part.start + input_ids.shape[1], device=input_ids.device)
        h = self._trunk(input_ids, positions, self.attention_mask(doc_ids, part.length, input_ids.device))
        if labels is None:
            return self.output(h[:, -logits_to_keep:] if logits_to_keep else h)
        out = self.output(h, labels=labels, label_modality=label_modality, shifted=shifted)
        return self._with_router_loss(out) if self.cfg.experts else out

    def _with_router_loss(self, out: LossOutput) -> LossOutput:
        """The language loss plus the expert routers' losses, summed over blocks (`router_loss`)."""
        router = sum(layer.feed_forward.router_loss(self.cfg.experts_config) for layer in self.layers)
        total = out.loss_sum + router * out.sums[3].clamp(min=1)
        combined = loss_from_sums(total, out.sums)
        combined.update({k: v for k, v in out.items() if k not in combined})
        combined.router_loss = router.detach()
        return combined

    def attention_mask(self, doc_ids: torch.Tensor | None, seq_len: int, device: torch.device):
        """What the attention kernel takes for a whole sequence: None (causal, SDPA), a boolean
        [B, 1, T, T] document mask (SDPA) or a block mask (flex). Made once, shared by every block."""
        if self.cfg.attention == "flex":
            return block_mask(doc_ids, seq_len, device)
        return None if doc_ids is None else document_causal_mask(doc_ids)

    def decode(self, input_ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] of T new tokens after those in `cache`, which they join. `valid`
        [B, T] is False on left padding (a batch of prompts of different lengths)."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid
        positions, attn_mask = cache.extend(valid)
        if positions.max() >= self.cfg.max_seq_len:
            raise ValueError(f"decoding past the model's max_seq_len={self.cfg.max_seq_len}")
        return self.output(self._trunk(input_ids, positions, attn_mask, cache))

    def _trunk(self, input_ids, positions, attn_mask, cache: KVCache | None = None) -> torch.Tensor:
        """Embeddings, blocks and the final norm: the hidden states the output layer reads."""
        cos, sin = rope_angles(self.cfg.head_dim, positions, self.cfg.rope_theta, self.cfg.rope_scaling)
        routing = SequenceOrder
        if self.cfg.routes_by_modality:
            routing = ModalityRouting.of(input_ids, self.cfg.untied_ranges)
        h = routing.group(self.tok_embeddings(input_ids))
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, attn_mask, cache.layers[i] if cache is not None else None, routing)
        return self.norm(routing.ungroup(h))
