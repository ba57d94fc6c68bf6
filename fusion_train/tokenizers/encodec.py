"""EnCodec (Défossez et al., arXiv 2210.13438): a SEANet convolutional encoder and decoder around a
residual vector quantizer, with the module tree and parameter names of transformers'
`EncodecModel`, so that its checkpoints (`facebook/encodec_24khz`) and ours load in either, and
Meta's own checkpoints load after renaming (`from_meta_names`).

Written here rather than imported: transformers is a test oracle, not a dependency (the image
tokenizer's VQGAN follows the same rule). Supported: mono, `weight_norm` or `time_group_norm`,
causal or not; not supported: the 48 kHz model's per-chunk loudness scale (`normalize`), which a
token sequence cannot carry, and its overlapping chunks (long audio is cut into windows before it
is encoded).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


@dataclass
class EncodecConfig:
    """transformers' EncodecConfig fields of the same names and defaults (the 24 kHz model)."""

    sampling_rate: int = 24_000
    target_bandwidths: list[float] = field(default_factory=lambda: [1.5, 3.0, 6.0, 12.0, 24.0])
    hidden_size: int = 128
    num_filters: int = 32
    num_residual_layers: int = 1
    upsampling_ratios: list[int] = field(default_factory=lambda: [8, 5, 4, 2])
    norm_type: str = "weight_norm"
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True
    pad_mode: str = "reflect"
    compress: int = 2
    num_lstm_layers: int = 2
    trim_right_ratio: float = 1.0
    codebook_size: int = 1024
    codebook_dim: int | None = None
    use_conv_shortcut: bool = True
    audio_channels: int = 1
    normalize: bool = False

    def __post_init__(self) -> None:
        self.codebook_dim = self.codebook_dim or self.hidden_size
        problems = [
            f"{name}={value!r} ({why})"
            for name, value, ok, why in [
                ("norm_type", self.norm_type, self.norm_type in ("weight_norm", "time_group_norm"),
                 "weight_norm or time_group_norm"),
                ("audio_channels", self.audio_channels, self.audio_channels == 1, "mono only: audio is downmixed"),
                ("normalize", self.normalize, not self.normalize, "a per-chunk loudness scale is not a token"),
                ("codebook_size", self.codebook_size, self.codebook_size & (self.codebook_size - 1) == 0
                 and self.codebook_size > 1, "a power of 2"),
                ("codebook_dim", self.codebook_dim, self.codebook_dim == self.hidden_size, "equal to hidden_size"),
                ("trim_right_ratio", self.trim_right_ratio, self.use_causal_conv or self.trim_right_ratio == 1.0,
                 "1.0 unless causal"),
            ]
            if not ok
        ]  # fmt: skip
        if problems:
            raise ValueError(f"audio codec config: unsupported {', '.join(problems)}")

    @property
    def hop_length(self) -> int:
        """Samples per frame."""
        return math.prod(self.upsampling_ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sampling_rate / self.hop_length)

    @property
    def num_quantizers(self) -> int:
        """Residual levels the checkpoint holds: enough for its highest bandwidth."""
        return int(1000 * max(self.target_bandwidths) // (self.frame_rate * math.log2(self.codebook_size)))

    def levels_for(self, bandwidth: float) -> int:
        """Residual levels used at `bandwidth` kbps, as EnCodec chooses them."""
        per_level = math.log2(self.codebook_size) * self.frame_rate
        return max(1, math.floor(bandwidth * 1000 / per_level))

    @classmethod
    def from_dict(cls, config: dict) -> EncodecConfig:
        """From an EncodecConfig's config.json (its other keys, such as `model_type`, ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


def _reflect_safe_pad(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """F.pad, where reflection of a signal shorter than the padding first pads it with zeros."""
    if mode != "reflect":
        return F.pad(x, (left, right), mode)
    extra = max(0, max(left, right) - x.shape[-1] + 1)
    padded = F.pad(F.pad(x, (0, extra)), (left, right), mode)
    return padded[..., : padded.shape[-1] - extra]


class EncodecConv1d(nn.Module):
    """A normalised Conv1d padded so that its output has ceil(length / stride) frames: all the
    padding on the left if causal, else split, plus what the last whole frame needs."""

    def __init__(self, cfg: EncodecConfig, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1):  # fmt: skip
        super().__init__()
        self.cfg = cfg
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation)
        if cfg.norm_type == "weight_norm":
            self.conv = weight_norm(self.conv)
        else:
            self.norm = nn.GroupNorm(1, out_channels)
        self.effective_kernel = (kernel_size - 1) * dilation + 1
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.effective_kernel - self.stride
        length = x.shape[-1]
        frames = math.ceil((length - self.effective_kernel + padding) / self.stride + 1) - 1
        extra = frames * self.stride + self.effective_kernel - padding - length
        right = 0 if self.cfg.use_causal_conv else padding // 2
        x = _reflect_safe_pad(x, padding - right, right + extra, self.cfg.pad_mode)
        x = self.conv(x)
        return self.norm(x) if self.cfg.norm_type == "time_group_norm" else x


class EncodecConvTranspose1d(nn.Module):
    """A normalised ConvTranspose1d trimmed back to stride x the input's frames."""

    def __init__(self, cfg: EncodecConfig, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.cfg = cfg
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride)
        if cfg.norm_type == "weight_norm":
            self.conv = weight_norm(self.conv)
        else:
            self.norm = nn.GroupNorm(1, out_channels)
        self.padding = kernel_size - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.cfg.norm_type == "time_group_norm":
            x = self.norm(x)
        right = math.ceil(self.padding * self.cfg.trim_right_ratio) if self.cfg.use_causal_conv else self.padding // 2
        return x[..., self.padding - right : x.shape[-1] - right]


class EncodecLSTM(nn.Module):
    """A residual LSTM over the frames of a [B, C, T] tensor."""

    def __init__(self, cfg: EncodecConfig, dim: int):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, cfg.num_lstm_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.permute(2, 0, 1)
        return (self.lstm(frames)[0] + frames).permute(1, 2, 0)


class EncodecResnetBlock(nn.Module):
    """SEANet's residual block: ELU, dilated conv to dim/compress channels, ELU, 1x1 conv back."""

    def __init__(self, cfg: EncodecConfig, dim: int, dilation: int):
        super().__init__()
        hidden = dim // cfg.compress
        self.block = nn.ModuleList([
            nn.ELU(), EncodecConv1d(cfg, dim, hidden, cfg.residual_kernel_size, dilation=dilation),
            nn.ELU(), EncodecConv1d(cfg, hidden, dim, 1),
        ])  # fmt: skip
        self.shortcut = EncodecConv1d(cfg, dim, dim, 1) if cfg.use_conv_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        for layer in self.block:
            x = layer(x)
        return self.shortcut(residual) + x


class EncodecEncoder(nn.Module):
    def __init__(self, cfg: EncodecConfig):
        super().__init__()
        layers: list[nn.Module] = [EncodecConv1d(cfg, cfg.audio_channels, cfg.num_filters, cfg.kernel_size)]
        channels = cfg.num_filters
        for ratio in reversed(cfg.upsampling_ratios):
            layers += [EncodecResnetBlock(cfg, channels, cfg.dilation_growth_rate**j)
                       for j in range(cfg.num_residual_layers)]  # fmt: skip
            layers += [nn.ELU(), EncodecConv1d(cfg, channels, channels * 2, kernel_size=ratio * 2, stride=ratio)]
            channels *= 2
        layers += [EncodecLSTM(cfg, channels), nn.ELU(), EncodecConv1d(cfg, channels, cfg.hidden_size,
                                                                       cfg.last_kernel_size)]  # fmt: skip
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class EncodecDecoder(nn.Module):
    def __init__(self, cfg: EncodecConfig):
        super().__init__()
        channels = cfg.num_filters * 2 ** len(cfg.upsampling_ratios)
        layers: list[nn.Module] = [EncodecConv1d(cfg, cfg.hidden_size, channels, cfg.kernel_size),
                                   EncodecLSTM(cfg, channels)]  # fmt: skip
        for ratio in cfg.upsampling_ratios:
            layers += [nn.ELU(), EncodecConvTranspose1d(cfg, channels, channels // 2, ratio * 2, ratio)]
            channels //= 2
            layers += [EncodecResnetBlock(cfg, channels, cfg.dilation_growth_rate**j)
                       for j in range(cfg.num_residual_layers)]  # fmt: skip
        layers += [nn.ELU(), EncodecConv1d(cfg, channels, cfg.audio_channels, cfg.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class EncodecEuclideanCodebook(nn.Module):
    """One level's codebook, as buffers (EnCodec learns it by exponential moving averages of the
    vectors assigned to each code, not by gradient): `embed` the codes, `cluster_size` and
    `embed_avg` the moving averages."""

    def __init__(self, cfg: EncodecConfig):
        super().__init__()
        self.register_buffer("inited", torch.tensor([1.0]))
        self.register_buffer("cluster_size", torch.zeros(cfg.codebook_size))
        self.register_buffer("embed", torch.zeros(cfg.codebook_size, cfg.codebook_dim))
        self.register_buffer("embed_avg", torch.zeros(cfg.codebook_size, cfg.codebook_dim))

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """[N, dim] -> the index of each vector's nearest code [N]."""
        distances = vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ self.embed.T + self.embed.pow(2).sum(1)
        return distances.argmin(1)


class EncodecVectorQuantization(nn.Module):
    def __init__(self, cfg: EncodecConfig):
        super().__init__()
        self.codebook = EncodecEuclideanCodebook(cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, dim, T] -> codes [B, T]."""
        return self.codebook.nearest(x.transpose(1, 2).flatten(0, 1)).view(x.shape[0], x.shape[2])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T] -> [B, dim, T]."""
        return F.embedding(codes, self.codebook.embed).transpose(1, 2)


class EncodecResidualVectorQuantizer(nn.Module):
    """Level q quantizes what levels 0..q-1 left of the encoder's output."""

    def __init__(self, cfg: EncodecConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncodecVectorQuantization(cfg) for _ in range(cfg.num_quantizers)])

    def encode(self, x: torch.Tensor, levels: int) -> torch.Tensor:
        """[B, dim, T] -> codes [B, levels, T]."""
        codes, residual = [], x
        for layer in self.layers[:levels]:
            codes.append(layer.encode(residual))
            residual = residual - layer.decode(codes[-1])
        return torch.stack(codes, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, levels, T] -> the sum of their vectors [B, dim, T]."""
        return sum(self.layers[q].decode(codes[:, q]) for q in range(codes.shape[1]))


class Encodec(nn.Module):
    def __init__(self, cfg: EncodecConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = EncodecEncoder(cfg)
        self.decoder = EncodecDecoder(cfg)
        self.quantizer = EncodecResidualVectorQuantizer(cfg)

    def encode(self, audio: torch.Tensor, levels: int) -> torch.Tensor:
        """audio [B, 1, samples] -> codes [B, levels, ceil(samples / hop_length)]."""
        if not 1 <= levels <= self.cfg.num_quantizers:
            raise ValueError(f"levels={levels}: the codec has residual levels 1..{self.cfg.num_quantizers}")
        return self.quantizer.encode(self.encoder(audio), levels)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, levels, frames] -> audio [B, 1, frames * hop_length]."""
        return self.decoder(self.quantizer.decode(codes))


# Meta's `encodec` package names: SConv1d -> NormConv1d -> Conv1d (`.conv.conv.`), SConvTranspose1d
# (`.convtr.convtr.`), the norm inside the wrapper, `model` for `layers`, `vq` and `_codebook`.
_META_RENAMES = [
    (r"^(encoder|decoder)\.model\.", r"\1.layers."),
    (r"\.convtr\.convtr\.", ".conv."),
    (r"\.conv\.conv\.", ".conv."),
    (r"\.conv\.norm\.", ".norm."),
    (r"\.convtr\.norm\.", ".norm."),
    (r"^quantizer\.vq\.layers\.(\d+)\._codebook\.", r"quantizer.layers.\1.codebook."),
]


def from_meta_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in Meta's `encodec` names -> transformers' (and ours)."""
    renamed = {}
    for name, value in state.items():
        for pattern, replacement in _META_RENAMES:
            name = re.sub(pattern, replacement, name)
        renamed[name] = value
    return renamed


def from_weight_norm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weight_g`/`weight_v` (the older weight_norm, in the hub's checkpoints) -> the
    parametrization's `parametrizations.weight.original0`/`original1`."""
    return {re.sub(r"\.weight_g$", ".parametrizations.weight.original0",
                   re.sub(r"\.weight_v$", ".parametrizations.weight.original1", name)): value
            for name, value in state.items()}  # fmt: skip
