"""HF transformers' `ChameleonForConditionalGeneration`. Its RoPE rotates halves where ours (Meta's)
rotates interleaved pairs, so the rows of wq/wk and the QK-norm weight/bias are permuted within
each head; QK-norm is stored per head, [heads, head_dim]. The VQ image tokenizer (`model.vqmodel.*`)
is not part of the language model and is skipped. An export records our whole vocabulary layout
under LAYOUT_KEY (transformers ignores it); an export without it has its layout inferred from the
vocabulary map's names where that is certain, and refused where it is not."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fusion_train.model.chameleon import ROPE_SCALINGS, ChameleonConfig
from fusion_train.model.formats import ConversionError, read_json, refuse_untied
from fusion_train.model.formats.native import CONFIG_FILE, load_native, parameter_names, save_native
from fusion_train.model.formats.vocab_sizes import VocabSizes
from fusion_train.vocab import (
    BEGIN_OF_IMAGE_NAME,
    CHAMELEON_VOCAB,
    END_OF_IMAGE_NAME,
    IMAGE_CODE_OFFSET,
    IMAGE_TOKEN_PREFIX,
    SPECIAL_NAMES,
    VocabLayout,
    image_code_of_name,
)

LAYOUT_KEY = "fusion_train_vocab"  # our full layout in an HF config.json (transformers ignores it)
RESERVED_NAME = re.compile(r"^<reserved(\d{5})>$")


# --- RoPE layouts: Meta rotates interleaved pairs, HF rotates halves ------------------------------


def _interleaved_to_halves(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Permute within each head from (x0, y0, x1, y1, ...) to (x0, x1, ..., y0, y1, ...); `t` is a
    projection's rows [n_heads * head_dim, in] or a QK-norm vector per head [n_heads, head_dim]."""
    return t.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(t.shape)


def _halves_to_interleaved(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    return t.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(t.shape)


def _qk_norm_to_heads(grouped: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[groups, head_dim] -> [n_heads, head_dim], each group's values repeated for its heads."""
    return grouped.repeat_interleave(n_heads // grouped.shape[0], dim=0)


def _qk_norm_to_groups(per_head: torch.Tensor, groups: int, name: str) -> torch.Tensor:
    """[n_heads, head_dim] -> [groups, head_dim]; every head of a group must hold the same values."""
    by_group = per_head.reshape(groups, -1, per_head.shape[-1])
    if not torch.equal(by_group, by_group[:, :1].expand_as(by_group)):
        raise ConversionError(
            f"{name}: QK-norm values differ between heads of one of {groups} groups; set the source's "
            "model_parallel_size to the number of distinct head groups"
        )
    return by_group[:, 0].clone()


# --- names and tensors ---------------------------------------------------------------------------

_HF_LAYER_NAMES = {  # ours -> HF, under layers.{i}. and model.layers.{i}.
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_normalization.weight": "self_attn.q_norm.weight",
    "attention.q_normalization.bias": "self_attn.q_norm.bias",
    "attention.k_normalization.weight": "self_attn.k_norm.weight",
    "attention.k_normalization.bias": "self_attn.k_norm.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_SKIPPED_PREFIX = "model.vqmodel."
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def _heads_of(name: str, cfg: ChameleonConfig) -> int | None:
    """Heads whose rows (or QK-norm entries) a parameter holds, if RoPE's layout applies to it."""
    if name.endswith(("wq.weight", "q_normalization.weight", "q_normalization.bias")):
        return cfg.n_heads
    if name.endswith(("wk.weight", "k_normalization.weight", "k_normalization.bias")):
        return cfg.n_kv_heads
    return None


def to_hf_state_dict(state_dict: dict, cfg: ChameleonConfig) -> dict:
    refuse_untied(cfg, "Hugging Face's Chameleon")
    if not cfg.qk_norm:
        raise ConversionError("HF's Chameleon always applies QK-norm; a model with qk_norm=false has no HF form")
    hf = {}
    for name, tensor in state_dict.items():
        heads = _heads_of(name, cfg)
        if "normalization" in name:
            tensor = _qk_norm_to_heads(tensor, heads)
        if heads is not None:
            tensor = _interleaved_to_halves(tensor, heads, cfg.head_dim)
        hf[_hf_name(name)] = tensor
    return hf


def from_hf_state_dict(hf_state_dict: dict, cfg: ChameleonConfig) -> dict:
    ours_by_hf = {_hf_name(name): name for name in parameter_names(cfg)}
    unknown = [k for k in hf_state_dict if k not in ours_by_hf and not k.startswith(_HF_SKIPPED_PREFIX)]
    missing = [k for k in ours_by_hf if k not in hf_state_dict]
    if unknown or missing:
        raise ConversionError(f"HF state dict does not match the config: unknown {unknown[:5]}, missing {missing[:5]}")
    state_dict = {}
    for hf_name, name in ours_by_hf.items():
        tensor = hf_state_dict[hf_name]
        heads = _heads_of(name, cfg)
        if heads is not None:
            tensor = _halves_to_interleaved(tensor, heads, cfg.head_dim)
        if "normalization" in name:
            tensor = _qk_norm_to_groups(tensor, cfg.qk_norm_groups, hf_name)
        state_dict[name] = tensor
    return state_dict


def _hf_name(name: str) -> str:
    match = _LAYER_KEY.match(name)
    if match and match[2] in _HF_LAYER_NAMES:
        return f"model.layers.{match[1]}.{_HF_LAYER_NAMES[match[2]]}"
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    raise ConversionError(f"{name}: not a parameter of fusion_train's Chameleon")


def hf_vocabulary_map(vocab: VocabLayout) -> dict:
    """Names of the non-text ids: HF's Chameleon finds the image codes (whose logits it masks) by
    name, and its processor's `<image>` placeholder takes the reserved id after the SFT separator
    (8711), as HF's own converter does."""
    names = {name: i for i, name in SPECIAL_NAMES.items()}
    names.update({name: vocab.image_code_start + i for i, name in enumerate(vocab.control_token_names())})
    placeholder = vocab.sft_separator + 1
    if placeholder < vocab.text_start:  # a layout with only 513 reserved ids has none to spare
        del names[vocab.control_token_names()[placeholder - vocab.image_code_start]]
        names["<image>"] = placeholder
    return names


def hf_config(cfg: ChameleonConfig, vocab: VocabLayout, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["ChameleonForConditionalGeneration"],
        "model_type": "chameleon",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})},
        "swin_norm": cfg.block_style == "swin",
        "model_parallel_size": cfg.qk_norm_groups,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": vocab.bos,
        "eos_token_id": vocab.eos,
        "pad_token_id": vocab.pad,
        "vocabulary_map": hf_vocabulary_map(vocab),
        "dtype": str(dtype).removeprefix("torch."),
        LAYOUT_KEY: dataclasses.asdict(vocab),
    }


def configs_from_hf(config: dict, said: VocabSizes | None = None) -> tuple[ChameleonConfig, VocabLayout]:
    """The model and vocabulary layout of an HF export; `said`: the sizes the user gave (see
    `_layout_from_hf` for when they are needed)."""
    _check_is_hf_chameleon(config)
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0),
                                             **(config.get("rope_scaling") or {})}  # fmt: skip
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        scaling = None
    elif kind not in ROPE_SCALINGS:
        raise ConversionError(f"HF config: rope_type {kind!r} is not supported (fusion_train knows default, "
                              f"{', '.join(ROPE_SCALINGS)})")  # fmt: skip
    cfg = ChameleonConfig(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        ffn_dim=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        max_seq_len=config.get("max_position_embeddings", 4096),
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=rope["rope_theta"],
        rope_scaling=scaling,
        block_style="swin" if config.get("swin_norm") else "prenorm",
        qk_norm_groups=config.get("model_parallel_size") or 1,
    )
    return cfg, _layout_from_hf(config, cfg.vocab_size, said or VocabSizes())


def _check_is_hf_chameleon(config: dict) -> None:
    if {"model", "vocab"} <= set(config):
        raise ConversionError(
            "this is a fusion_train model folder, not an HF export: use it as it is, or `fusion-convert to-hf` it"
        )
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if k not in config]
    if config.get("model_type", "chameleon") != "chameleon" or missing:
        raise ConversionError(
            f"not an HF Chameleon config (model_type {config.get('model_type')!r}, missing {missing}): expected the "
            "folder of a transformers ChameleonForConditionalGeneration"
        )


def _layout_from_hf(config: dict, vocab_size: int, said: VocabSizes) -> VocabLayout:
    """The layout our own exports record under LAYOUT_KEY. Otherwise the image codebook comes from
    the vocabulary map's names, the reserved count from its `<reservedNNNNN>` names or the user,
    the image grid from the user; only Chameleon's released sizes imply all three. A guess would
    silently shift where text starts, so an unknown layout is refused."""
    names = config.get("vocabulary_map") or {}
    image_grid, n_reserved = said.image_grid, said.n_reserved
    if LAYOUT_KEY in config:
        vocab = VocabLayout(**config[LAYOUT_KEY])
        conflicts = [f"{flag} {given} (the export says {getattr(vocab, field)})"
                     for flag, field, given in said.given() if given != getattr(vocab, field)]  # fmt: skip
        if conflicts or vocab.vocab_size != vocab_size:
            raise ConversionError(f"the export's {LAYOUT_KEY} disagrees with {conflicts or 'its vocab_size'}")
    else:
        codebook = sum(name.startswith(IMAGE_TOKEN_PREFIX) for name in names) or said.image_codebook_size
        if vocab_size == CHAMELEON_VOCAB.vocab_size and codebook in (None, CHAMELEON_VOCAB.image_codebook_size):
            defaults = CHAMELEON_VOCAB  # the released layout
            codebook = defaults.image_codebook_size
            image_grid, n_reserved = image_grid or defaults.image_grid, n_reserved or defaults.n_reserved
        n_reserved = n_reserved or (codebook and _reserved_in_names(names, codebook))
        unknown = [flag for flag, v in (("--image-grid", image_grid), ("--n-reserved", n_reserved)) if not v]
        if not codebook:
            unknown.insert(0, "--image-codebook-size (or a vocabulary_map)")
        if unknown:
            raise ConversionError(
                f"the export does not record its vocabulary layout (no {LAYOUT_KEY}) and its sizes are not "
                f"Chameleon's released ones: pass {', '.join(unknown)} as it was trained"
            )
        vocab = VocabSizes(codebook, image_grid, n_reserved).layout(vocab_size)
    _check_names(names, vocab)
    return vocab


def _reserved_in_names(names: dict, codebook: int) -> int | None:
    """How many reserved ids follow the image markers, from the last `<reservedNNNNN>` name at its
    layout place (id NNNNN + 4) in the run that starts right after them."""
    first = IMAGE_CODE_OFFSET + codebook + 2
    ids = {i for name, i in names.items() if (m := RESERVED_NAME.match(name)) and int(m[1]) + IMAGE_CODE_OFFSET == i}
    count = 0
    while first + count in ids or first + count + 1 in ids:  # one may be renamed (HF's `<image>`)
        count += 1
    return count or None


def _check_names(names: dict, vocab: VocabLayout) -> None:
    """The vocabulary map must follow Chameleon's layout (code c at id 4 + c)."""
    image_ids = {name: i for name, i in names.items() if name.startswith(IMAGE_TOKEN_PREFIX)}
    misplaced = [n for n, i in image_ids.items() if i != vocab.image_code_start + image_code_of_name(n)]
    if image_ids and len(image_ids) != vocab.image_codebook_size:
        misplaced.append(f"{len(image_ids)} image codes named, the layout has {vocab.image_codebook_size}")
    for name, expected in ((END_OF_IMAGE_NAME, vocab.end_of_image), (BEGIN_OF_IMAGE_NAME, vocab.begin_of_image)):
        if names.get(name, expected) != expected:
            misplaced.append(name)
    if misplaced:
        raise ConversionError(
            f"HF vocabulary_map does not follow Chameleon's id layout (image code c at id 4 + c, "
            f"then <eoss>, <racm3:break>): {misplaced[:5]}"
        )


def read_hf_weights(folder: Path) -> dict:
    index = next(
        (
            folder / n
            for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
            if (folder / n).is_file()
        ),
        None,
    )
    if index is not None:
        files = sorted(set(read_json(index)["weight_map"].values()))
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()][:1]
    if not files:
        raise ConversionError(f"{folder}: no model.safetensors, pytorch_model.bin or index of their shards")
    state_dict = {}
    for name in files:
        path = folder / name
        state_dict.update(
            load_file(path)
            if name.endswith(".safetensors")
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    return state_dict


def read_hf_config(hf_dir: str | Path, said: VocabSizes | None = None) -> tuple[ChameleonConfig, VocabLayout]:
    config_path = Path(hf_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise ConversionError(f"{config_path} not found: expected a transformers model folder")
    return configs_from_hf(read_json(config_path), said)


def read_hf(hf_dir: str | Path, said: VocabSizes | None = None) -> tuple[dict, ChameleonConfig, VocabLayout]:
    """An HF ChameleonForConditionalGeneration folder's weights under our names and layout."""
    cfg, vocab = read_hf_config(hf_dir, said)
    return from_hf_state_dict(read_hf_weights(Path(hf_dir)), cfg), cfg, vocab


def is_hf_folder(folder: str | Path) -> bool:
    config_path = Path(folder) / CONFIG_FILE
    return config_path.is_file() and "model_type" in read_json(config_path)


def save_hf(state_dict: dict, cfg: ChameleonConfig, vocab: VocabLayout, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(state_dict, cfg), out / "model.safetensors", metadata={"format": "pt"})
    dtype = state_dict["output.weight"].dtype
    (out / CONFIG_FILE).write_text(json.dumps(hf_config(cfg, vocab, dtype), indent=2) + "\n")
    return out


def import_hf(hf_dir: str | Path, out_dir: str | Path, said: VocabSizes | None = None) -> Path:
    return save_native(*read_hf(hf_dir, said), out_dir)


def export_hf(native_dir: str | Path, out_dir: str | Path) -> Path:
    return save_hf(*load_native(native_dir), out_dir)
