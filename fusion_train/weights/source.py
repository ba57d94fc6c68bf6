"""`open_model`: any model source by what its folder holds.

- a training checkpoint (`checkpoints/step_N`, any ZeRO stage): consolidated in memory by
  DeepSpeed's own consolidation; it also says where its tokenizers are (the run's shard manifests
  record the paths, the fingerprints tell whether the files there are the same);
- a fusion_train model folder (`config.json` + `model.safetensors`);
- an HF transformers Chameleon folder (`fusion-convert to-hf` writes one);
- a Meta checkpoint (`params.json` + `consolidated*.pth`).

Opening reads only what describes the model; `state_dict()` reads the weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from safetensors.torch import load_file

from fusion_train.data.trained_with import TrainedWith
from fusion_train.model.chameleon import ChameleonConfig
from fusion_train.model.formats import ConversionError, hf, meta, native
from fusion_train.model.formats.vocab_sizes import VocabSizes
from fusion_train.vocab import VocabLayout
from fusion_train.weights.training_checkpoint import (
    TRAINER_STATE,
    checkpoint_contents,
    consolidated_state_dict,
    is_training_checkpoint,
)

TRAINING_CHECKPOINT, MODEL_FOLDER, HF_EXPORT, META_CHECKPOINT = (
    "training checkpoint", "model folder", "HF export", "Meta checkpoint",
)  # fmt: skip


class UnknownModelSource(ConversionError):
    """The path holds none of the model sources."""


@dataclass
class ModelSource:
    path: Path
    kind: str  # one of the four above
    config: ChameleonConfig
    trained_with: TrainedWith
    read_weights: Callable[[], dict]

    @property
    def vocab(self) -> VocabLayout:
        return self.trained_with.vocab

    def state_dict(self) -> dict:
        """Every weight under our parameter names (fp32 for a training checkpoint)."""
        return self.read_weights()


def source_kind(path: str | Path) -> str | None:
    if is_training_checkpoint(path):
        return TRAINING_CHECKPOINT
    if native.is_native_folder(path):
        return MODEL_FOLDER
    if hf.is_hf_folder(path):
        return HF_EXPORT
    return META_CHECKPOINT if meta.is_meta_folder(path) else None


def open_model(path: str | Path, said: VocabSizes | None = None) -> ModelSource:
    """`said`: the vocabulary sizes a user gave, for an export that does not record its layout."""
    path = Path(path)
    kind = source_kind(path)
    if kind == TRAINING_CHECKPOINT:
        config, trained_with = checkpoint_contents(path)
        return ModelSource(path, kind, config, trained_with, partial(consolidated_state_dict, path))
    if kind == MODEL_FOLDER:
        config, vocab, fingerprints = native.read_native_config(path)
        weights = partial(load_file, path / native.NATIVE_WEIGHTS)
        return ModelSource(path, kind, config, TrainedWith(vocab, {}, fingerprints), weights)
    if kind == HF_EXPORT:
        config, vocab = hf.read_hf_config(path, said)
        return ModelSource(path, kind, config, TrainedWith(vocab, {}, {}), lambda: hf.read_hf(path, said)[0])
    if kind == META_CHECKPOINT:
        config, vocab = meta.read_meta_config(path, said)
        return ModelSource(path, kind, config, TrainedWith(vocab, {}, {}), lambda: meta.load_meta(path, said)[0])
    raise UnknownModelSource(
        f"{path}: neither a training checkpoint (a step_N folder with {TRAINER_STATE}), a fusion_train model "
        f"folder ({native.CONFIG_FILE} + {native.NATIVE_WEIGHTS}), an HF transformers Chameleon folder nor a Meta "
        f"checkpoint ({meta.META_PARAMS} + consolidated*.pth)"
    )
