"""`trainer.init_from`: a run that starts from weights trained elsewhere (continued pretraining,
stage-2 annealing from a stage-1 checkpoint, an imported HF or Meta Chameleon) with a fresh
optimizer, schedule, step counter and data order.

The path is a fusion_train model folder (`config.json` + `model.safetensors`, as `fusion-convert
from-hf`, `from-meta` and `zero-to-safetensors` write them) or a training checkpoint of any ZeRO
stage, which rank 0 first consolidates into `RUN_DIR/init_weights/` with DeepSpeed's own
consolidation (it holds the whole fp32 model on that one rank, once: 137 GB of host memory at 34B;
converting beforehand with `fusion-convert zero-to-safetensors` avoids it in the job). Every rank
then reads the weights one tensor at a time from the memory-mapped safetensors file, so under
ZeRO-3 no rank holds more than its share plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from fusion_train.model.chameleon import ChameleonConfig
from fusion_train.model.convert import CONFIG_FILE, NATIVE_WEIGHTS, ConversionError, save_native
from fusion_train.train.checkpoint import TRAINER_STATE, consolidated_state_dict, read_trainer_state
from fusion_train.train.config import ConfigError, TrainConfig, from_dict
from fusion_train.vocab import VocabLayout

log = logging.getLogger(__name__)
# What the weights' shapes and meaning depend on; the rest (dropout, z-loss, RoPE base, context
# length) may change between a run and the one that starts from it.
ARCHITECTURE = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "qk_norm", "qk_norm_groups",
                "block_style", "untie_modalities")  # fmt: skip

InitialValues = Callable[[str, torch.Size], torch.Tensor]  # a parameter's name and shape -> its value


def is_training_checkpoint(path: str | Path) -> bool:
    return (Path(path) / TRAINER_STATE).is_file()


def checkpoint_vocab(state: dict, cfg) -> VocabLayout:
    """The vocabulary layout the checkpoint records; checkpoints written before it did are read
    through their shards' manifests, which must then still be where training read them."""
    from fusion_train.data.loader import read_manifests
    from fusion_train.data.manifest import DataError

    if "vocab" in state:
        return VocabLayout(**state["vocab"])
    try:
        return next(iter(read_manifests(cfg.data).values())).vocab
    except DataError as err:
        raise ConversionError(
            f"this checkpoint predates the vocabulary layout being stored in it, and its shards' manifests "
            f"cannot be read ({err}): put the shards back at their training paths, or use fusion-convert's "
            "--image-grid/--n-reserved route on an exported model"
        ) from err


def checkpoint_weights(checkpoint: str | Path) -> tuple[dict, TrainConfig, VocabLayout, dict | None]:
    """The consolidated fp32 weights of a training checkpoint, the run's config, the vocabulary layout
    it trained with (stored in the checkpoint: the shards are not needed) and its tokenizers' fingerprints."""
    if not is_training_checkpoint(checkpoint):
        raise ConversionError(f"{checkpoint} is not a training checkpoint (no {TRAINER_STATE})")
    state = read_trainer_state(Path(checkpoint))
    cfg = from_dict(state["config"])
    return consolidated_state_dict(checkpoint), cfg, checkpoint_vocab(state, cfg), state.get("tokenizer_fingerprints")


def checkpoint_to_model_folder(checkpoint: str | Path, out_dir: str | Path) -> Path:
    state_dict, cfg, vocab, fingerprints = checkpoint_weights(checkpoint)
    return save_native(state_dict, cfg.model, vocab, out_dir, fingerprints)


def model_folder(init_from: Path, run_dir: Path, rank: int) -> Path:
    """The model folder to read: `init_from` itself, or a checkpoint's consolidation by rank 0."""
    if is_training_checkpoint(init_from):
        target, partial = run_dir / "init_weights", run_dir / "init_weights.partial"
        if rank == 0:
            log.warning("consolidating %s into %s for trainer.init_from", init_from, target)
            for old in (target, partial):
                shutil.rmtree(old, ignore_errors=True)
            checkpoint_to_model_folder(init_from, partial)
            os.replace(partial, target)
        dist.barrier()
        return target
    if not (init_from / CONFIG_FILE).is_file() or not (init_from / NATIVE_WEIGHTS).is_file():
        raise ConfigError(
            f"trainer.init_from={init_from}: neither a fusion_train model folder ({CONFIG_FILE} + {NATIVE_WEIGHTS}, "
            f"as fusion-convert from-hf, from-meta or zero-to-safetensors write it) nor a training checkpoint "
            f"(a step_N folder with {TRAINER_STATE})"
        )
    return init_from


def check_compatible(folder: Path, model: ChameleonConfig, vocab: VocabLayout, fingerprints: dict) -> None:
    """The saved model must be this run's architecture, for this vocabulary and these tokenizers."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    saved = ChameleonConfig(**config["model"])
    differing = [f"model.{name}={getattr(saved, name)} (this run: {getattr(model, name)})" for name in ARCHITECTURE
                 if getattr(saved, name) != getattr(model, name)]  # fmt: skip
    if differing:
        raise ConfigError(
            f"trainer.init_from={folder}: the weights are of another architecture: {', '.join(differing)}; set those "
            "model settings (or choose the preset it was trained as)"
        )
    changed = {f.name: getattr(saved, f.name) for f in dataclasses.fields(saved) if f.name not in ARCHITECTURE
               and getattr(saved, f.name) != getattr(model, f.name)}  # fmt: skip
    if changed:
        log.warning("trainer.init_from: the weights were trained with %s; this run changes them", changed)
    if VocabLayout(**config["vocab"]) != vocab:
        raise ConfigError(
            f"trainer.init_from={folder}: the weights were trained for another vocabulary layout than the shards' "
            f"({config['vocab']} vs {dataclasses.asdict(vocab)}): build the shards with the tokenizers the model "
            "was trained with"
        )
    saved_tokenizers = config.get("tokenizer_fingerprints") or {}
    other = [kind for kind, value in saved_tokenizers.items() if value and fingerprints.get(kind) not in (None, value)]
    if other:
        raise ConfigError(
            f"trainer.init_from={folder}: the weights were trained with other {' and '.join(other)} tokenizers than "
            "the shards were built with: build the shards with the model's tokenizers"
        )


def pretrained_values(folder: Path, names: list[str]) -> InitialValues:
    """Each parameter's value read on demand from the model folder's safetensors file."""
    weights = safe_open(str(folder / NATIVE_WEIGHTS), framework="pt")
    stored = set(weights.keys())
    missing, unexpected = sorted(set(names) - stored), sorted(stored - set(names))
    if missing or unexpected:
        raise ConfigError(
            f"trainer.init_from={folder}: the weights do not match the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )

    def value(name: str, shape: torch.Size) -> torch.Tensor:
        tensor = weights.get_tensor(name)
        if tensor.shape != shape:
            raise ConfigError(
                f"trainer.init_from={folder}: {name} has shape {tuple(tensor.shape)}, the model {tuple(shape)}"
            )
        return tensor

    return value
