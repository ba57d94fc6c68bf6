"""Shared test fixtures that are plain functions."""

from pathlib import Path

import torch
import yaml

from fusion_train.model.chameleon import Chameleon, ChameleonConfig

PRESETS = Path(__file__).resolve().parent.parent / "conf" / "model"


def preset(name: str, **overrides) -> ChameleonConfig:
    return ChameleonConfig(**{**yaml.safe_load((PRESETS / f"{name}.yaml").read_text()), **overrides})


def small_config(**overrides) -> ChameleonConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=1024, max_seq_len=64)
    return ChameleonConfig(**{**base, **overrides})


def randomized_model(cfg: ChameleonConfig, seed: int = 0) -> Chameleon:
    """A model whose every parameter, norms and QK-norm biases included, is away from its init, so
    that a conversion mixing up any of them shows in the outputs."""
    torch.manual_seed(seed)
    model = Chameleon(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()
