"""Model formats by name, one module each: `native` (the fusion_train model folder), `hf` (HF
transformers' Chameleon) and `meta` (Meta's released checkpoints). Each reads and writes a state
dict under our parameter names with its ChameleonConfig and VocabLayout; `fusion_train.weights`
opens any of them, and training checkpoints, by one function."""

import json
from pathlib import Path


class ConversionError(ValueError):
    """A source that is not what its format expects, or a model a format cannot hold."""


def read_json(path: Path) -> dict:
    """A format's JSON file; one that does not parse is an error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON ({err}): a damaged or partly copied model folder?") from None


def refuse_untied(cfg, target: str) -> None:
    """Outside formats have one set of weights per block; `cfg` is a ChameleonConfig."""
    if cfg.untie_modalities:
        raise ConversionError(
            f"model.untie_modalities={list(cfg.untie_modalities)}: {target} has one set of weights per block, so a "
            "modality-untied model has no such form; it stays a fusion_train model folder"
        )
