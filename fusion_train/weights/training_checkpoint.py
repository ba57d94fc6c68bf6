"""A finished training checkpoint, read without a process group: its trainer state (the marker
written last, with the run's config, vocabulary layout and tokenizer fingerprints) and its weights
consolidated from any ZeRO stage by DeepSpeed's own consolidation. `train/checkpoint.py` writes it."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fusion_train.data.loader import DataConfig, read_manifests
from fusion_train.data.manifest import DataError
from fusion_train.data.trained_with import TrainedWith, recorded_tokenizer_paths
from fusion_train.model.chameleon import ChameleonConfig
from fusion_train.model.formats import ConversionError
from fusion_train.vocab import VocabLayout

log = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.json"
EXPERT_FILES = "layer_*_expert_*_model_states.pt"  # DeepSpeed's MoE checkpoint: one file per expert
DEEPSPEED_EXPERT = re.compile(r"\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.")  # global number


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and what to choose instead."""


def is_training_checkpoint(path: str | Path) -> bool:
    return (Path(path) / TRAINER_STATE).is_file()


def read_trainer_state(path: Path) -> dict:
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint: it has no {TRAINER_STATE}, the marker written last "
            "(an interrupted save or prune leaves such a folder); choose a complete step_N folder"
        )
    try:
        return json.loads((path / TRAINER_STATE).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / TRAINER_STATE} is not valid JSON ({err}): choose another checkpoint") from None


def consolidated_state_dict(path: str | Path) -> dict:
    """One full fp32 state dict from a ZeRO checkpoint of any stage, by DeepSpeed's own
    consolidation, under the model's parameter names (activation-checkpoint wrappers removed).
    DeepSpeed's words go to the log: its logger to stderr (it binds to stdout when first
    imported), its progress prints to log records, so a command's stdout stays its own."""
    path = Path(path)
    if any(path.glob(EXPERT_FILES)):
        return _with_spread_experts(path)
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    for line in printed.getvalue().splitlines():
        log.info("DeepSpeed: %s", line)
    return {_model_name(name): t for name, t in state.items()}


def _model_name(name: str) -> str:
    return name.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", "")


def _with_spread_experts(path: Path) -> dict:
    """A checkpoint of experts spread over ranks (train/expert_parallel.py), which DeepSpeed's
    consolidation does not read: the model file's weights and each expert's file, under the
    plain model's names. These are the weights the model ran with: its training precision (fp32
    on a CPU, bf16 under deepspeed.bf16), not Adam's fp32 master copies."""
    state = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    for expert_file in sorted(path.glob(EXPERT_FILES)):
        state.update(torch.load(expert_file, map_location="cpu", weights_only=True))
    return {_model_name(DEEPSPEED_EXPERT.sub(r".experts.\1.", name)): t.float() for name, t in state.items()}


def run_data_config(state: dict) -> DataConfig:
    """The `data` group of the run that wrote the checkpoint."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), state["config"]["data"]))


def checkpoint_vocab(state: dict) -> VocabLayout:
    """The vocabulary layout the checkpoint records; checkpoints written before it did are read
    through their shards' manifests, which must then still be where training read them."""
    if "vocab" in state:
        return VocabLayout(**state["vocab"])
    try:
        return next(iter(read_manifests(run_data_config(state)).values())).vocab
    except DataError as err:
        raise ConversionError(
            f"this checkpoint predates the vocabulary layout being stored in it, and its shards' manifests "
            f"cannot be read ({err}): put the shards back at their training paths, or use fusion-convert's "
            "--image-grid/--n-reserved route on an exported model"
        ) from err


def checkpoint_contents(path: str | Path) -> tuple[ChameleonConfig, TrainedWith]:
    """The model config of a training checkpoint and what it was trained with: the vocabulary
    layout (stored in the checkpoint: the shards are not needed), the tokenizer paths its shards'
    manifests record and the tokenizers' fingerprints."""
    state = read_trainer_state(Path(path))
    paths = recorded_tokenizer_paths(run_data_config(state))
    trained_with = TrainedWith(checkpoint_vocab(state), paths, state.get("tokenizer_fingerprints") or {})
    return ChameleonConfig(**state["config"]["model"]), trained_with
