"""Images <-> codes with a VQGAN, and the paper's preprocessing.

A tokenizer is a taming-style pair: `vqgan.ckpt` (a dict whose `state_dict` holds `encoder.*`,
`decoder.*`, `quantize.embedding.weight`, `quant_conv.*`, `post_quant_conv.*`; loss and
discriminator weights are ignored) and `vqgan.yaml` (`model.params.{embed_dim, n_embed, ddconfig}`).
Meta's released tokenizer and those `fusion-data train-image-tokenizer` writes have this form.

Preprocessing (Chameleon §2.1, §3): transparency blended over white; then the shortest side
resized and the centre cropped (pretraining, SFT answers), or the longest side resized and the
border padded with white (SFT prompts).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from fusion_train.tokenizers.text import TokenizerError, fingerprint_file
from fusion_train.tokenizers.vqgan import VQGAN, VQGANConfig

WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency blended over white."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    image = to_rgb(image)
    scale = size / min(image.size)
    resized = image.resize(
        (max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.LANCZOS
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.array(resized.crop((left, top, left + size, top + size)))


def pad_to_square(image: Image.Image, size: int) -> np.ndarray:
    image = to_rgb(image)
    scale = size / max(image.size)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), WHITE)
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return np.array(canvas)


def config_from_yaml(path: str | Path) -> VQGANConfig:
    params = yaml.safe_load(Path(path).read_text())["model"]["params"]
    fields = {f.name for f in dataclasses.fields(VQGANConfig)}
    settings = {k: v for k, v in {**params["ddconfig"], **params}.items() if k in fields}
    return VQGANConfig(**settings)


def config_to_yaml(cfg: VQGANConfig) -> str:
    ddconfig = dataclasses.asdict(cfg)
    codebook = {"embed_dim": ddconfig.pop("embed_dim"), "n_embed": ddconfig.pop("n_embed")}
    return yaml.safe_dump(
        {"model": {"target": "taming.models.vqgan.VQModel", "params": {**codebook, "ddconfig": ddconfig}}}
    )


def image_config(checkpoint: str | Path) -> VQGANConfig:
    """An image tokenizer's config, from `vqgan.yaml` beside its checkpoint, without its weights."""
    config = Path(checkpoint).with_name("vqgan.yaml")
    if not config.is_file():
        raise TokenizerError(f"image tokenizer config {config} not found (vqgan.yaml beside {Path(checkpoint).name})")
    return config_from_yaml(config)


def image_layout(checkpoint: str | Path) -> dict[str, int]:
    """The codebook size and grid of an image tokenizer."""
    cfg = image_config(checkpoint)
    return {"image_codebook_size": cfg.n_embed, "image_grid": cfg.grid}


def preprocess(image: Image.Image, resolution: int, pad: bool = False) -> np.ndarray:
    """uint8 [resolution, resolution, 3]: centre-cropped, or padded for SFT prompts."""
    return (pad_to_square if pad else center_crop)(image, resolution)


class ImageTokenizer:
    def __init__(
        self, model: VQGAN, fingerprint: str, device: str | torch.device | None = None, batch_size: int = 32,
        bf16: bool = False,
    ):  # fmt: skip
        """`bf16`: encode under bfloat16 autocast (a GPU's fast path; codes near a tie may differ from fp32's)."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.fingerprint = fingerprint
        self.batch_size, self.bf16 = batch_size, bf16

    @property
    def resolution(self) -> int:
        return self.model.cfg.resolution

    @property
    def grid(self) -> int:
        return self.model.cfg.grid

    @classmethod
    def load(cls, checkpoint: str | Path, config: str | Path | None = None, **kwargs) -> ImageTokenizer:
        """`config` defaults to `vqgan.yaml` beside the checkpoint."""
        checkpoint = Path(checkpoint)
        config = Path(config) if config else checkpoint.with_name("vqgan.yaml")
        for path in (checkpoint, config):
            if not path.is_file():
                raise TokenizerError(f"image tokenizer file {path} not found")
        model = VQGAN(config_from_yaml(config))
        stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = stored.get("state_dict", stored)
        expected = model.state_dict().keys()
        missing = sorted(expected - state.keys())
        if missing:
            raise TokenizerError(
                f"{checkpoint} lacks {len(missing)} VQGAN weights, e.g. {missing[:3]}; is it a taming VQGAN?"
            )
        model.load_state_dict({k: state[k] for k in expected})
        return cls(model, fingerprint_file(checkpoint), **kwargs)

    def save(self, folder: str | Path) -> Path:
        """Write `vqgan.ckpt` + `vqgan.yaml` in the taming layout."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.cpu() for k, v in self.model.state_dict().items()}
        torch.save({"state_dict": state}, folder / "vqgan.ckpt")
        (folder / "vqgan.yaml").write_text(config_to_yaml(self.model.cfg))
        self.fingerprint = fingerprint_file(folder / "vqgan.ckpt")
        return folder / "vqgan.ckpt"

    def preprocess(self, image: Image.Image, pad: bool = False) -> np.ndarray:
        return preprocess(image, self.resolution, pad)

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> int64 codes [N, grid, grid], in batches on the tokenizer's device."""
        codes = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size])).to(self.device)
            pixels = batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                codes.append(self.model.encode(pixels).cpu())
        return torch.cat(codes).numpy() if codes else np.zeros((0, self.grid, self.grid), np.int64)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes [N, grid, grid] -> uint8 images [N, resolution, resolution, 3]."""
        images = []
        for start in range(0, len(codes), self.batch_size):
            batch = torch.from_numpy(np.asarray(codes[start : start + self.batch_size], dtype=np.int64)).to(self.device)
            pixels = self.model.decode(batch)
            images.append(((pixels + 1.0) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu())
        return torch.cat(images).numpy()
