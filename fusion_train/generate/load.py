"""A model to generate with, from any model source `fusion_train.weights.open_model` opens, with
what it was trained with (its vocabulary layout, and where a training checkpoint says, its
tokenizers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fusion_train.data.trained_with import TrainedWith
from fusion_train.model.chameleon import Chameleon
from fusion_train.weights.source import open_model


@dataclass
class Loaded:
    model: Chameleon  # in eval mode
    trained_with: TrainedWith


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> Loaded:
    source = open_model(path)
    model = Chameleon(source.config, seed=None)
    model.load_state_dict(source.state_dict())
    return Loaded(model.to(device=device, dtype=dtype).eval(), source.trained_with)
