"""The VQGAN of Chameleon's image tokenizer: taming-transformers' architecture, with its parameter
names, so that a taming-style `vqgan.ckpt` (Meta's release, or one trained here) loads as is.

Encoder: conv, levels of ResNet blocks with stride-2 downsampling between them, a mid block with
self-attention, conv to z_channels; a 1x1 conv to the codebook dimension and nearest-code
quantisation give a grid of codes. The decoder mirrors it. Chameleon's settings: 512 px,
ch 128, ch_mult [1, 1, 2, 2, 4] (16x downsampling: a 32 x 32 grid), 8192 codes of dimension 256.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQGANConfig:
    """taming's `ddconfig` plus the codebook (`embed_dim`, `n_embed`), with taming's names."""

    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    dropout: float = 0.0
    z_channels: int = 256
    double_z: bool = False
    embed_dim: int = 256
    n_embed: int = 8192
    # GroupNorm groups: 32 in taming and Chameleon; fewer lets a small CPU tokenizer use narrow layers.
    norm_groups: int = 32

    def __post_init__(self) -> None:
        if self.ch % self.norm_groups:
            raise ValueError(f"vqgan ch={self.ch} is not a multiple of norm_groups={self.norm_groups}")
        if self.resolution % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"vqgan resolution {self.resolution} is not divisible by 2^(levels-1)")

    @property
    def grid(self) -> int:
        """Codes per image side."""
        return self.resolution // 2 ** (len(self.ch_mult) - 1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cfg: VQGANConfig):
        super().__init__()
        self.norm1 = group_norm(in_channels, cfg.norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, cfg.norm_groups)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # [B, HW, C]
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(out.transpose(1, 2).reshape(batch, channels, height, width))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    return level


def _mid(channels: int, cfg: VQGANConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, cfg)
    mid.attn_1 = AttnBlock(channels, cfg.norm_groups)
    mid.block_2 = ResnetBlock(channels, channels, cfg)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels, resolution = cfg.ch, cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(channels, cfg.ch * mult, cfg))
                channels = cfg.ch * mult
                if resolution in cfg.attn_resolutions:
                    attns.append(AttnBlock(channels, cfg.norm_groups))
            level = _level(blocks, attns)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(channels)
                resolution //= 2
            self.down.append(level)
        self.mid = _mid(channels, cfg)
        self.norm_out = group_norm(channels, cfg.norm_groups)
        self.conv_out = nn.Conv2d(channels, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(_run_mid(self.mid, h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        channels = cfg.ch * cfg.ch_mult[-1]
        resolution = cfg.grid
        self.conv_in = nn.Conv2d(cfg.z_channels, channels, 3, padding=1)
        self.mid = _mid(channels, cfg)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(channels, cfg.ch * cfg.ch_mult[i], cfg))
                channels = cfg.ch * cfg.ch_mult[i]
                if resolution in cfg.attn_resolutions:
                    attns.append(AttnBlock(channels, cfg.norm_groups))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(channels)
                resolution *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # indexed like the encoder's levels: up[0] is full resolution
        self.norm_out = group_norm(channels, cfg.norm_groups)
        self.conv_out = nn.Conv2d(channels, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest codebook entry by squared L2 distance; straight-through gradients; taming's
    `VectorQuantizer2` loss with beta = 0.25 (codebook term + beta * commitment term)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """[B, D, H, W] latents -> [B, H, W] code indices."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codebook = self.embedding.weight
        distances = flat.square().sum(1, keepdim=True) + codebook.square().sum(1) - 2 * flat @ codebook.t()
        return distances.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, H, W] code indices -> [B, D, H, W] latents."""
        return self.embedding(codes).permute(0, 3, 1, 2)

    def forward(self, z):
        codes = self.codes(z)
        quantized = self.lookup(codes)
        loss = F.mse_loss(quantized.detach(), z) + self.beta * F.mse_loss(quantized, z.detach())
        return z + (quantized - z).detach(), loss, codes


class VQGAN(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], [B, 3, H, W] -> pre-quantisation latents [B, embed_dim, grid, grid].
        The convolutions run channels-last (oneDNN's and cuDNN's faster layout: encoding 1.2-1.4x
        faster on a CPU, bench/peers.py vq), as images decoded from HWC arrays already are; the
        decoder's input, codes looked up as [B, H, W, D], is channels-last too."""
        return self.quant_conv(self.encoder(images.contiguous(memory_format=torch.channels_last)))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize.codes(self.latents(images))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, grid, grid] codes -> images in [-1, 1] (clamped, as Chameleon's decoder output is)."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes))).clamp(-1, 1)

    def forward(self, images):
        """Training: reconstruction (unclamped) and the quantiser's loss."""
        quantized, vq_loss, _ = self.quantize(self.latents(images))
        return self.decoder(self.post_quant_conv(quantized)), vq_loss
