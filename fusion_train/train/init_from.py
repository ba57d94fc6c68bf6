"""`trainer.init_from`: a run that starts from weights trained elsewhere (continued pretraining,
stage-2 annealing from a stage-1 checkpoint, an imported HF or Meta Chameleon) with a fresh
optimizer, schedule, step counter and data order.

The path is any model source (`fusion_train.weights.open_model`). A fusion_train model folder
(`config.json` + `model.safetensors`, as `fusion-convert` writes them) is read as it is; any other
(a training checkpoint of any ZeRO stage, an HF or Meta export) rank 0 first converts into
`RUN_DIR/init_weights/` (a checkpoint by DeepSpeed's own consolidation, which holds the whole fp32
model on that one rank, once: 137 GB of host memory at 34B; converting beforehand with
`fusion-convert zero-to-safetensors` avoids it in the job). Every rank then reads the weights one
tensor at a time from the memory-mapped safetensors file, so under ZeRO-3 no rank holds more than
its share plus one tensor.

A run whose vocabulary is the saved one with audio codes appended (`VocabLayout.extends`) extends
the model: the embedding and output gain a row per new id, each the mean of the old rows, and the
old rows stay as they were. The mean, not a random row, because a new id then starts with a logit
equal to the mean of the old ones on every input, so the extended model's predictions move little
before it has seen the new data (Hewitt, "Initializing new word embeddings for pretrained language
models", 2021; transformers' `resize_token_embeddings` initialises from the old rows' mean too).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from fusion_train.model.chameleon import ChameleonConfig
from fusion_train.model.formats import ConversionError
from fusion_train.model.formats.native import CONFIG_FILE, NATIVE_WEIGHTS, read_native_config, save_native
from fusion_train.train.config import ConfigError
from fusion_train.vocab import VocabLayout
from fusion_train.weights.source import MODEL_FOLDER, open_model, source_kind
from fusion_train.weights.training_checkpoint import TRAINER_STATE

log = logging.getLogger(__name__)
# What the weights' shapes and meaning depend on; the rest (dropout, z-loss, RoPE base, context
# length) may change between a run and the one that starts from it.
ARCHITECTURE = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "qk_norm", "qk_norm_groups",
                "block_style", "untie_modalities")  # fmt: skip

VOCABULARY_ROWS = ("tok_embeddings.weight", "output.weight")  # a row per id

InitialValues = Callable[[str, torch.Size], torch.Tensor]  # a parameter's name and shape -> its value


def model_folder(init_from: Path, run_dir: Path, rank: int) -> Path:
    """The model folder to read: `init_from` itself, or any other model source (a training
    checkpoint, an HF or Meta export) converted by rank 0 into RUN_DIR/init_weights."""
    kind = source_kind(init_from)
    if kind is None:
        raise ConfigError(
            f"trainer.init_from={init_from}: neither a fusion_train model folder ({CONFIG_FILE} + {NATIVE_WEIGHTS}, "
            f"as fusion-convert writes it), an HF or Meta export, nor a training checkpoint (a step_N folder with "
            f"{TRAINER_STATE})"
        )
    try:
        if kind == MODEL_FOLDER:
            read_native_config(init_from)  # both files there, a config of ours
            return init_from
        target, partial = run_dir / "init_weights", run_dir / "init_weights.partial"
        if rank == 0:
            log.warning("converting the %s %s into %s for trainer.init_from", kind, init_from, target)
            for old in (target, partial):
                shutil.rmtree(old, ignore_errors=True)
            source = open_model(init_from)
            save_native(source.state_dict(), source.config, source.vocab, partial, source.trained_with.fingerprints)
            os.replace(partial, target)
    except ConversionError as err:
        raise ConfigError(f"trainer.init_from={init_from}: {err}") from None
    dist.barrier()
    return target


def check_compatible(
    folder: Path, model: ChameleonConfig, vocab: VocabLayout, fingerprints: dict, expected_changes: list[str] = ()
) -> None:
    """The saved model must be this run's architecture, for this vocabulary and these tokenizers.
    Other model settings may change: those in `expected_changes` (what a stage sets on purpose)
    are logged, the rest warned about."""
    saved, saved_vocab, saved_tokenizers = read_native_config(folder)
    extended = vocab.extends(saved_vocab)
    if extended:
        log.warning("trainer.init_from: extending the vocabulary from %d to %d ids: the %d audio codes' embedding and "
                    "output rows start as the mean of the old rows", saved_vocab.vocab_size, vocab.vocab_size,
                    vocab.audio_ids)  # fmt: skip
    elif saved_vocab != vocab:
        raise ConfigError(
            f"trainer.init_from={folder}: the weights were trained for another vocabulary layout than the shards' "
            f"({dataclasses.asdict(saved_vocab)} vs {dataclasses.asdict(vocab)}): build the shards with the "
            "tokenizers the model was trained with (a layout may only add audio codes after the model's last id)"
        )
    differing = [f"model.{name}={getattr(saved, name)} (this run: {getattr(model, name)})" for name in ARCHITECTURE
                 if getattr(saved, name) != getattr(model, name) and not (extended and name == "vocab_size")]  # fmt: skip
    if differing:
        raise ConfigError(
            f"trainer.init_from={folder}: the weights are of another architecture: {', '.join(differing)}; set those "
            "model settings (or choose the preset it was trained as)"
        )
    changed = [f.name for f in dataclasses.fields(saved)
               if f.name not in ARCHITECTURE and getattr(saved, f.name) != getattr(model, f.name)]  # fmt: skip
    for on_purpose in (True, False):
        names = [name for name in changed if (name in expected_changes) == on_purpose]
        if names:
            log.log(logging.INFO if on_purpose else logging.WARNING,
                    "trainer.init_from: the weights were trained with %s; this run changes %s%s",
                    {name: getattr(saved, name) for name in names}, {name: getattr(model, name) for name in names},
                    " as its stage means to (trainer.init_changes)" if on_purpose else "")  # fmt: skip
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
        if name in VOCABULARY_ROWS and tensor.shape[1:] == shape[1:] and tensor.shape[0] < shape[0]:
            return with_mean_rows(tensor, shape[0])  # check_compatible allowed only an extended layout
        if tensor.shape != shape:
            raise ConfigError(
                f"trainer.init_from={folder}: {name} has shape {tuple(tensor.shape)}, the model {tuple(shape)}"
            )
        return tensor

    return value


def with_mean_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`rows` followed by copies of their mean (computed in fp32) up to `count` rows."""
    mean = rows.float().mean(0, keepdim=True).to(rows.dtype)
    return torch.cat([rows, mean.expand(count - rows.shape[0], -1)])
