"""Shared test fixtures that are plain functions."""

import json
from pathlib import Path

import torch
import yaml

from fusion_train.model.chameleon import Chameleon, ChameleonConfig
from fusion_train.vocab import VocabLayout

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


# A small vocabulary with Chameleon's layout: 64 codes on a 4 x 4 grid, text ids from 586.
SMALL_VOCAB = VocabLayout(image_codebook_size=64, image_grid=4, vocab_size=2048, n_reserved=513)


def english_documents(count: int | None = None) -> list[str]:
    """Real English prose that ships with CPython (the pydoc topic texts): no download needed."""
    from pydoc_data.topics import topics

    documents = [text for _, text in sorted(topics.items())]
    return documents[:count]


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
