"""Meta's released checkpoints: `consolidated.pth`, or `consolidated.NN.pth` (one per model-parallel
shard), with `params.json`. Each shard carries its own QK-norm weight/bias, shared by its heads: on
import they become qk_norm_groups = number of shards, so the released 30B keeps its per-shard
values. The format records neither the vocabulary layout (the sizes not given are Chameleon's) nor
training settings such as dropout and z-loss (ChameleonConfig's defaults), nor, where params.json
has none, the context length. Shards are read with `weights_only=True`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fusion_train.model.chameleon import ChameleonConfig
from fusion_train.model.formats import ConversionError, read_json, refuse_untied
from fusion_train.model.formats.native import load_native, parameter_names, save_native
from fusion_train.model.formats.vocab_sizes import VocabSizes
from fusion_train.vocab import VocabLayout

META_PARAMS = "params.json"

# How model parallelism splits each parameter: along rows (0), along columns (1), or not at all.
_META_SPLIT_DIM = {
    "wq.weight": 0, "wk.weight": 0, "wv.weight": 0, "w1.weight": 0, "w3.weight": 0, "output.weight": 0,
    "wo.weight": 1, "w2.weight": 1, "tok_embeddings.weight": 1,
}  # fmt: skip
_META_PER_SHARD = ("q_normalization.weight", "q_normalization.bias", "k_normalization.weight", "k_normalization.bias")
_META_IGNORED = {"rope.freqs"}  # a buffer Meta's loader also leaves unused


def _split_dim(name: str) -> int | None:
    return next((d for suffix, d in _META_SPLIT_DIM.items() if name.endswith(suffix)), None)


def to_meta_shards(state_dict: dict, cfg: ChameleonConfig, n_shards: int) -> list[dict]:
    refuse_untied(cfg, "Meta's Chameleon checkpoint")
    if cfg.qk_norm_groups not in (1, n_shards):
        raise ConversionError(
            f"a model with qk_norm_groups={cfg.qk_norm_groups} exports to {cfg.qk_norm_groups} Meta "
            f"shards (each holds one group's QK-norm), not {n_shards}"
        )
    for what, size in (
        ("n_kv_heads", cfg.n_kv_heads),
        ("ffn_dim", cfg.ffn_dim),
        ("vocab_size", cfg.vocab_size),
        ("dim", cfg.dim),
    ):
        if size % n_shards:
            raise ConversionError(f"{what}={size} cannot be split into {n_shards} model-parallel shards")
    shards = [{} for _ in range(n_shards)]
    for name, tensor in state_dict.items():
        if name.endswith(_META_PER_SHARD):
            pieces = list(tensor.expand(n_shards, -1)) if cfg.qk_norm_groups == 1 else list(tensor)
        elif (dim := _split_dim(name)) is not None:
            pieces = tensor.chunk(n_shards, dim=dim)
        else:
            pieces = [tensor] * n_shards
        for shard, piece in zip(shards, pieces, strict=True):
            shard[name] = piece.clone()
    return shards


def from_meta_shards(shards: list[dict], cfg: ChameleonConfig) -> dict:
    state_dict = {}
    for name in shards[0]:
        if name in _META_IGNORED:
            continue
        pieces = [shard[name] for shard in shards]
        if name.endswith(_META_PER_SHARD):
            state_dict[name] = torch.stack(pieces)
        elif (dim := _split_dim(name)) is not None:
            state_dict[name] = torch.cat(pieces, dim=dim)
        else:
            state_dict[name] = pieces[0]
    expected = set(parameter_names(cfg))
    if set(state_dict) != expected:
        raise ConversionError(
            f"Meta checkpoint does not match params.json: unknown {sorted(set(state_dict) - expected)[:5]}, "
            f"missing {sorted(expected - set(state_dict))[:5]}"
        )
    return state_dict


def _meta_ffn_fields(dim: int, ffn_dim: int) -> dict:
    """multiple_of / ffn_dim_multiplier for which Meta's formula gives ffn_dim back."""
    base = int(8 * dim / 3)
    if 256 * -(-base // 256) == ffn_dim:
        return {"multiple_of": 256, "ffn_dim_multiplier": None}
    # int(m * base) == ffn_dim for m just above ffn_dim / base, and multiple_of 1 leaves it as is.
    return {"multiple_of": 1, "ffn_dim_multiplier": (ffn_dim + 0.5) / base}


def meta_params(cfg: ChameleonConfig, n_shards: int) -> dict:
    model = {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "qk_normalization": cfg.qk_norm,
        "swin_norm": cfg.block_style == "swin",
        **_meta_ffn_fields(cfg.dim, cfg.ffn_dim),
    }
    return {"model_parallel_size": n_shards, "model": model}


def config_from_meta(params: dict, shards: list[dict]) -> ChameleonConfig:
    model = params.get("model", params)
    return ChameleonConfig(
        dim=model["dim"],
        n_layers=model["n_layers"],
        n_heads=model["n_heads"],
        n_kv_heads=model.get("n_kv_heads") or model["n_heads"],
        ffn_dim=sum(s["layers.0.feed_forward.w1.weight"].shape[0] for s in shards),
        vocab_size=sum(s["output.weight"].shape[0] for s in shards),
        max_seq_len=model.get("max_seq_len", ChameleonConfig.max_seq_len),
        norm_eps=model.get("norm_eps", 1e-5),
        rope_theta=model.get("rope_theta", 10000.0),
        block_style="swin" if model.get("swin_norm") else "prenorm",
        qk_norm=model.get("qk_normalization", True),
        qk_norm_groups=len(shards) if model.get("qk_normalization", True) else 1,
    )


def _meta_shard_paths(folder: Path) -> list[Path]:
    single = folder / "consolidated.pth"
    sharded = sorted(folder.glob("consolidated.[0-9][0-9].pth"))
    if single.is_file() and sharded:
        raise ConversionError(f"{folder} holds both consolidated.pth and consolidated.NN.pth; keep one layout")
    paths = [single] if single.is_file() else sharded
    if not paths:
        raise ConversionError(f"{folder}: no consolidated.pth or consolidated.NN.pth")
    return paths


def read_meta(folder: str | Path) -> tuple[dict, list[dict]]:
    folder = Path(folder)
    params_path = folder / META_PARAMS
    if not params_path.is_file():
        raise ConversionError(f"{params_path} not found: a Meta checkpoint folder holds params.json")
    params = read_json(params_path)
    extra = folder / "consolidate_params.json"
    if extra.is_file():
        params = {**params, **read_json(extra)}
    paths = _meta_shard_paths(folder)
    declared = params.get("model_parallel_size")
    if declared is not None and declared != len(paths):
        raise ConversionError(
            f"{params_path} declares model_parallel_size={declared} but {folder} holds {len(paths)} shard files"
        )
    shards = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in paths]
    return params, shards


def is_meta_folder(folder: str | Path) -> bool:
    return (Path(folder) / META_PARAMS).is_file()


def read_meta_config(meta_dir: str | Path, said: VocabSizes | None = None) -> tuple[ChameleonConfig, VocabLayout]:
    """Meta's release records no layout: the sizes not `said` are Chameleon's; vocab_size comes
    from the checkpoint (the shards are memory-mapped: only their shapes are read)."""
    cfg = config_from_meta(*read_meta(meta_dir))
    return cfg, (said or VocabSizes()).layout(cfg.vocab_size)


def load_meta(meta_dir: str | Path, said: VocabSizes | None = None) -> tuple[dict, ChameleonConfig, VocabLayout]:
    cfg, vocab = read_meta_config(meta_dir, said)
    return from_meta_shards(read_meta(meta_dir)[1], cfg), cfg, vocab


def save_meta(state_dict: dict, cfg: ChameleonConfig, out_dir: str | Path, n_shards: int | None = None) -> Path:
    """`n_shards` model-parallel shards (default: the model's qk_norm_groups)."""
    n_shards = n_shards or cfg.qk_norm_groups
    shards = to_meta_shards(state_dict, cfg, n_shards)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ["consolidated.pth"] if n_shards == 1 else [f"consolidated.{i:02d}.pth" for i in range(n_shards)]
    for name, shard in zip(names, shards, strict=True):
        torch.save(shard, out / name)
    (out / META_PARAMS).write_text(json.dumps(meta_params(cfg, n_shards), indent=2) + "\n")
    return out


def import_meta(meta_dir: str | Path, out_dir: str | Path, said: VocabSizes | None = None) -> Path:
    return save_native(*load_meta(meta_dir, said), out_dir)


def export_meta(native_dir: str | Path, out_dir: str | Path, n_shards: int | None = None) -> Path:
    state_dict, cfg, _ = load_native(native_dir)
    return save_meta(state_dict, cfg, out_dir, n_shards)
