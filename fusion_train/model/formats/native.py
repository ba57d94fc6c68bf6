"""The fusion_train model folder: `model.safetensors` (Meta's parameter names and interleaved-pair
RoPE layout, QK-norm as [qk_norm_groups, head_dim]) and `config.json` {"model": ChameleonConfig,
"vocab": VocabLayout, "tokenizer_fingerprints": ...}. What `fusion-convert` writes by default,
`trainer.init_from` reads tensor by tensor, and generation loads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from fusion_train.model.chameleon import ChameleonConfig
from fusion_train.model.formats import ConversionError, read_json
from fusion_train.vocab import VocabLayout

NATIVE_WEIGHTS = "model.safetensors"
CONFIG_FILE = "config.json"
TOP_PARAMETERS = ("tok_embeddings.weight", "norm.weight", "output.weight")
BLOCK_PARAMETERS = (
    "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
    "attention.q_normalization.weight", "attention.q_normalization.bias",
    "attention.k_normalization.weight", "attention.k_normalization.bias",
    "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight",
    "attention_norm.weight", "ffn_norm.weight",
)  # fmt: skip


def parameter_names(cfg: ChameleonConfig) -> list[str]:
    """The dense model's parameter names, without building it (a 34B would not fit to look)."""
    per_block = [n for n in BLOCK_PARAMETERS if cfg.qk_norm or "normalization" not in n]
    return list(TOP_PARAMETERS) + [f"layers.{i}.{n}" for i in range(cfg.n_layers) for n in per_block]


def is_native_folder(path: str | Path) -> bool:
    config_path = Path(path) / CONFIG_FILE
    return config_path.is_file() and {"model", "vocab"} <= set(read_json(config_path))


def save_native(
    state_dict: dict, cfg: ChameleonConfig, vocab: VocabLayout, out_dir: str | Path, tokenizers: dict | None = None
) -> Path:
    """`tokenizers`: the fingerprints of the tokenizers the weights were trained with, when known."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, out / NATIVE_WEIGHTS)
    config = {"model": dataclasses.asdict(cfg), "vocab": dataclasses.asdict(vocab)}
    if tokenizers:
        config["tokenizer_fingerprints"] = tokenizers
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_native_config(path: str | Path) -> tuple[ChameleonConfig, VocabLayout, dict]:
    """The model config, vocabulary layout and tokenizer fingerprints ({} when not recorded) of a model folder."""
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / NATIVE_WEIGHTS
    for required in (config_path, weights_path):
        if not required.is_file():
            raise ConversionError(
                f"{required} not found: a fusion_train model folder holds {CONFIG_FILE} and {NATIVE_WEIGHTS}"
            )
    config = read_json(config_path)
    try:
        cfg, vocab = ChameleonConfig(**config["model"]), VocabLayout(**config["vocab"])
    except (KeyError, TypeError) as err:
        raise ConversionError(f"{config_path}: not a fusion_train model config ({err})") from err
    return cfg, vocab, config.get("tokenizer_fingerprints") or {}


def load_native(path: str | Path) -> tuple[dict, ChameleonConfig, VocabLayout]:
    cfg, vocab, _ = read_native_config(path)
    return load_file(Path(path) / NATIVE_WEIGHTS), cfg, vocab
