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
    for setting, value, what in (("untie_modalities", list(cfg.untie_modalities), "a modality-untied model"),
                                 ("experts", cfg.experts, "a model with experts")):  # fmt: skip
        if value:
            raise ConversionError(
                f"model.{setting}={value}: {target} has one set of weights per block, so {what} has no such form; "
                "it stays a fusion_train model folder"
            )
