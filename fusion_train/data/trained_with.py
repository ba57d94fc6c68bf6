"""What a model was trained with: its vocabulary layout, the tokenizer files its run's shard
manifests record, and those tokenizers' fingerprints; and the tokenizers to use with it, each
checked against the fingerprint the weights were trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fusion_train.data.manifest import DataError, Manifest
from fusion_train.model.formats import ConversionError
from fusion_train.tokenizers.audio import AudioTokenizer
from fusion_train.tokenizers.image import ImageTokenizer
from fusion_train.tokenizers.text import TextTokenizer, fingerprint_file
from fusion_train.vocab import VocabLayout


@dataclass
class TrainedWith:
    vocab: VocabLayout
    tokenizer_paths: dict[str, str | None]  # what the run's manifests record; empty when unknown
    fingerprints: dict[str, str | None]  # of the tokenizers the weights were trained with, when known


def recorded_tokenizer_paths(data_cfg) -> dict[str, str]:
    """The tokenizer paths the run's shard manifests record (a text source's has no image tokenizer)."""
    found = {}
    for source in data_cfg.sources.values():
        try:
            recorded = Manifest.read(source.path).tokenizer_paths
        except DataError:
            continue
        found.update({kind: path for kind, path in recorded.items() if path})
    return found


def load_tokenizers(trained_with: TrainedWith, text: str | None, image: str | None, device: torch.device,
                    where: str = "the model", audio: str | None = None,
                    ) -> tuple[TextTokenizer, ImageTokenizer | None, AudioTokenizer | None]:  # fmt: skip
    """The given tokenizer files, else those the run recorded; each checked against the fingerprint
    the weights were trained with, when it is known."""
    text = text or trained_with.tokenizer_paths.get("text")
    image = image or trained_with.tokenizer_paths.get("image")
    audio = audio or (trained_with.tokenizer_paths.get("audio") if trained_with.vocab.audio_ids else None)
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
    return (
        text_tokenizer,
        ImageTokenizer.load(image, device=device) if image else None,
        _audio(audio, trained_with, device, where),
    )


def _audio(path: str | None, trained_with: TrainedWith, device: torch.device, where: str) -> AudioTokenizer | None:
    if not path:
        return None
    tokenizer = AudioTokenizer.load(path, levels=trained_with.vocab.audio_levels or None, device=device)
    expected = trained_with.fingerprints.get("audio")
    if expected and tokenizer.fingerprint != expected:
        raise ConversionError(
            f"audio tokenizer {path} is not the one {where} was trained with (fingerprint {tokenizer.fingerprint}, "
            f"trained with {expected})"
        )
    return tokenizer
