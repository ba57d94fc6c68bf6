"""Chameleon: one decoder-only transformer over text and image tokens.

LLaMA-2 style (RMSNorm, SwiGLU, RoPE) with Chameleon's stability changes: QK-norm (a LayerNorm
with weight and bias over each head's query/key vector, after the projection and before RoPE),
optional Swin-style norm reordering, residual dropout, and z-loss in the output layer. Parameter
names and the RoPE layout (interleaved pairs) are those of Meta's released checkpoints.

`forward` trains and scores whole sequences; `decode` extends a KV cache (`kv_cache.py`) by new
tokens, for generation. Plain PyTorch: parallelism, activation checkpointing (wrap the modules in
`layers`), compilation and sampling are applied from outside.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fusion_train.model.kv_cache import KVCache, LayerCache
from fusion_train.model.loss import LossOutput, chunked_lm_loss

BLOCK_STYLES = ("prenorm", "swin")
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
    # prenorm: h = x + attn(norm(x)) (Chameleon-7B); swin: h = x + norm(attn(x)) (Chameleon-34B)
    block_style: str = "prenorm"
    dropout: float = 0.0  # residual dropout after attention and feed-forward (0.1 for the 7B recipe)
    qk_norm: bool = True
    # Contiguous groups of heads that share one QK-norm weight/bias: 1 for models trained here;
    # the model-parallel size for Meta weights trained with per-shard QK-norm (the released 30B).
    qk_norm_groups: int = 1
    z_loss: float = 1e-5
    loss_chunk_size: int = 2048  # positions per chunk of the output projection + loss
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        checks = [
            (self.block_style in BLOCK_STYLES, f"block_style must be one of {BLOCK_STYLES}"),
            (self.dim % self.n_heads == 0, "dim must be divisible by n_heads"),
            (self.n_heads % self.n_kv_heads == 0, "n_heads must be divisible by n_kv_heads"),
            ((self.dim // self.n_heads) % 2 == 0, "the head dimension dim/n_heads must be even (RoPE)"),
            (self.n_kv_heads % self.qk_norm_groups == 0, "n_kv_heads must be divisible by qk_norm_groups"),
            (0.0 <= self.dropout < 1.0, "dropout must lie in [0, 1)"),
            (self.loss_chunk_size > 0, "loss_chunk_size must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"model config: {message} (got {self})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


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


def rope_angles(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin at integer `positions` ([T], or [B, T] when each row counts its own), [..., head_dim/2]
    in fp32. Computed per call rather than kept as buffers, which a cast of the module to bf16 would round."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float().unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of each head's vector, Meta's layout."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean: position t may attend to s <= t of the same document."""
    seq_len = doc_ids.shape[1]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=doc_ids.device).tril()
    return (same_doc & causal).unsqueeze(1)


class ScaledDotProductAttention(nn.Module):
    """softmax(q kᵀ / √d) v, causal or under a boolean mask. A module of its own so that observers can
    hook its inputs (the monitors' largest attention logit) without touching the maths."""

    def forward(self, q, k, v, attn_mask=None):  # [B, heads, T, head_dim]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=k.shape[1] != q.shape[1]
        )


class Attention(nn.Module):
    def __init__(self, cfg: ChameleonConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_normalization = self.k_normalization = None
        if cfg.qk_norm:
            self.q_normalization = HeadLayerNorm(cfg.n_heads, cfg.head_dim, cfg.qk_norm_groups)
            self.k_normalization = HeadLayerNorm(cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm_groups)
        self.attend = ScaledDotProductAttention()

    def forward(self, x, cos, sin, attn_mask=None, cache: LayerCache | None = None):
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        if self.q_normalization is not None:
            q, k = self.q_normalization(q), self.k_normalization(k)
        q, k, v = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.write(k, v)
        out = self.attend(q, k, v, attn_mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))


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
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, attn_mask=None, cache: LayerCache | None = None):
        if self.swin:
            # Normalising each branch's output bounds its norm growth (Chameleon-34B).
            h = x + self.dropout(self.attention_norm(self.attention(x, cos, sin, attn_mask, cache)))
            return h + self.dropout(self.ffn_norm(self.feed_forward(h)))
        h = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, attn_mask, cache))
        return h + self.dropout(self.feed_forward(self.ffn_norm(h)))


class OutputLayer(nn.Linear):
    """The untied output projection. Given labels it returns the chunked loss instead of logits;
    the projection then runs inside this module's forward, where ZeRO-3 has gathered its weight."""

    def __init__(self, cfg: ChameleonConfig):
        super().__init__(cfg.dim, cfg.vocab_size, bias=False)
        self.z_loss, self.chunk_size = cfg.z_loss, cfg.loss_chunk_size

    def forward(self, hidden, labels=None, label_modality=None):
        if labels is None:
            return super().forward(hidden)
        return chunked_lm_loss(
            hidden,
            self.weight,
            labels,
            z_loss=self.z_loss,
            chunk_size=self.chunk_size,
            label_modality=label_modality,
        )


class Chameleon(nn.Module):
    def __init__(self, cfg: ChameleonConfig, seed: int | None = 0):
        """`seed`: the initial weights, a function of it alone (`init_weights`); None leaves them
        to the caller, as when the parameters are partitioned as they are created."""
        super().__init__()
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
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
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
    ) -> torch.Tensor | LossOutput:
        """Logits [B, T, vocab] without labels; with labels (aligned with input_ids, -100 where no
        loss) the next-token loss. doc_ids [B, T] restricts attention to the same document."""
        seq_len = input_ids.shape[1]
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds model max_seq_len={self.cfg.max_seq_len}")
        positions = torch.arange(seq_len, device=input_ids.device)
        attn_mask = document_causal_mask(doc_ids) if doc_ids is not None else None
        h = self._trunk(input_ids, positions, attn_mask)
        if labels is None:
            return self.output(h)
        return self.output(h, labels=labels, label_modality=label_modality)

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
        cos, sin = rope_angles(self.cfg.head_dim, positions, self.cfg.rope_theta)
        h = self.tok_embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, attn_mask, cache.layers[i] if cache is not None else None)
        return self.norm(h)
