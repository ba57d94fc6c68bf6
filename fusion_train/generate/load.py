"""A model to generate with, from any of the places fusion_train keeps weights, and the tokenizers
it was trained with.

- a fusion_train model folder (`config.json` + `model.safetensors`);
- a training checkpoint (`checkpoints/step_N`) of any ZeRO stage, consolidated in memory by
  DeepSpeed's own consolidation;
- an HF transformers Chameleon folder (`fusion-convert to-hf` writes one).

A training checkpoint also says where its tokenizers are: the run's shard manifests record the
paths the shards were built with, and the fingerprints tell whether the files there are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fusion_train.model.chameleon import Chameleon
from fusion_train.model.convert import ConversionError, is_hf_folder, load_native, read_hf
from fusion_train.tokenizers.image import ImageTokenizer
from fusion_train.tokenizers.text import TextTokenizer, fingerprint_file
from fusion_train.train.init_from import checkpoint_weights, is_training_checkpoint
from fusion_train.vocab import VocabLayout


@dataclass
class TrainedWith:
    vocab: VocabLayout
    tokenizer_paths: dict[str, str | None]  # what the run's manifests record; empty when unknown
    fingerprints: dict[str, str | None]  # of the tokenizers the weights were trained with, when known


@dataclass
class Loaded:
    model: Chameleon  # in eval mode
    trained_with: TrainedWith


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> Loaded:
    path = Path(path)
    paths, fingerprints = {}, {}
    if is_training_checkpoint(path):
        state_dict, run_cfg, vocab, fingerprints = checkpoint_weights(path)
        cfg, paths = run_cfg.model, recorded_tokenizer_paths(run_cfg.data)
    elif is_hf_folder(path):
        state_dict, cfg, vocab = read_hf(path)
    elif (path / "config.json").is_file():
        state_dict, cfg, vocab = load_native(path)
    else:
        raise ConversionError(
            f"{path}: neither a training checkpoint (checkpoints/step_N), a fusion_train model folder "
            "(config.json + model.safetensors) nor an HF transformers Chameleon folder"
        )
    model = Chameleon(cfg, seed=None)
    model.load_state_dict(state_dict)
    return Loaded(model.to(device=device, dtype=dtype).eval(), TrainedWith(vocab, paths, fingerprints or {}))


def recorded_tokenizer_paths(data_cfg) -> dict[str, str]:
    """The tokenizer paths the run's shard manifests record (a text source's has no image tokenizer)."""
    from fusion_train.data.manifest import DataError, Manifest

    found = {}
    for source in data_cfg.sources.values():
        try:
            recorded = Manifest.read(source.path).tokenizer_paths
        except DataError:
            continue
        found.update({kind: path for kind, path in recorded.items() if path})
    return found


def load_tokenizers(trained_with: TrainedWith, text: str | None, image: str | None, device: torch.device,
                    where: str = "the model") -> tuple[TextTokenizer, ImageTokenizer | None]:  # fmt: skip
    """The given tokenizer files, else those the run recorded; each checked against the fingerprint
    the weights were trained with, when it is known."""
    text = text or trained_with.tokenizer_paths.get("text")
    image = image or trained_with.tokenizer_paths.get("image")
    if not text:
        raise ConversionError(
            f"{where} does not say where its text tokenizer is (only a training checkpoint whose shard manifests "
            "record it does): pass --text-tokenizer PATH (and --image-tokenizer PATH to draw or read images)"
        )
    for kind, file in (("text", text), ("image", image)):
        expected = trained_with.fingerprints.get(kind)
        if file and expected and Path(file).is_file() and fingerprint_file(file) != expected:
            raise ConversionError(
                f"{kind} tokenizer {file} is not the one {where} was trained with (fingerprint "
                f"{fingerprint_file(file)}, trained with {expected})"
            )
    text_tokenizer = TextTokenizer(text)
    if text_tokenizer.vocab != trained_with.vocab:
        raise ConversionError(
            f"text tokenizer {text} is for the layout {text_tokenizer.vocab}, the model's is {trained_with.vocab}"
        )
    return text_tokenizer, ImageTokenizer.load(image, device=device) if image else None
