"""Train a small VQ image tokenizer of Chameleon's VQGAN architecture on a folder of images, on
the CPU in minutes: for users without Meta's released weights, and for the demo.

Objective: pixel MSE plus the quantiser's codebook and commitment terms (no perceptual or GAN
loss: those matter for photographs at 512 px, not for a small demo tokenizer). The codebook
starts from encoder outputs and codes left unused are restarted on fresh ones, which keeps a
small codebook in use.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from fusion_train.tokenizers.image import ImageTokenizer, center_crop
from fusion_train.tokenizers.vqgan import VQGAN, VQGANConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
RESTART_EVERY = 20  # steps between restarts of unused codes


def small_config(resolution: int, grid: int, codebook_size: int) -> VQGANConfig:
    downsamplings = int(math.log2(resolution // grid))
    if resolution != grid * 2**downsamplings:
        raise ValueError(f"resolution {resolution} must be the grid {grid} times a power of 2")
    # Narrow layers (16-32 channels) keep a CPU step near 0.25 s at 64 px. One normalisation group:
    # with few channels per group, GroupNorm erases what flat synthetic images are made of, their
    # colours (taming's 32 groups over 128-512 channels leave plenty).
    return VQGANConfig(
        resolution=resolution,
        ch=16,
        ch_mult=[1] + [2] * downsamplings,
        num_res_blocks=1,
        z_channels=32,
        embed_dim=32,
        n_embed=codebook_size,
        norm_groups=1,
    )


def load_images(folder: str | Path, resolution: int) -> np.ndarray:
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(center_crop(image, resolution))
        except (UnidentifiedImageError, OSError):
            continue  # an unreadable file among many is not worth stopping for
    if not images:
        raise ValueError(f"no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return np.stack(images)


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def reconstruction_mse(model: VQGAN, pixels: torch.Tensor) -> float:
    model.eval()
    error = F.mse_loss(model.decode(model.encode(pixels)), pixels).item()
    model.train()
    return error


@torch.no_grad()
def _restart_unused_codes(model: VQGAN, latents: torch.Tensor, used: torch.Tensor, generator: torch.Generator) -> int:
    dead = (~used).nonzero().flatten()
    if len(dead):
        candidates = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        picks = torch.randint(len(candidates), (len(dead),), generator=generator)
        model.quantize.embedding.weight[dead] = candidates[picks]
    return len(dead)


def train_image_tokenizer(
    image_folder: str | Path,
    out_folder: str | Path,
    *,
    resolution: int = 64,
    grid: int = 8,
    codebook_size: int = 512,
    steps: int = 400,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict:
    """Returns a report with the held-out reconstruction MSE before and after training."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images = load_images(image_folder, resolution)
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    held_out = _pixels(images[order[: max(1, len(order) // 10)]])
    train = _pixels(images[order[len(order) // 10 :]] if len(order) > 1 else images)

    model = VQGAN(small_config(resolution, grid, codebook_size))
    with torch.no_grad():  # start the codebook on encoder outputs, not at a point far from them
        start = model.latents(train[torch.randint(len(train), (batch_size,), generator=generator)])
        _restart_unused_codes(model, start, torch.zeros(codebook_size, dtype=torch.bool), generator)
    initial = reconstruction_mse(model, held_out)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    used = torch.zeros(codebook_size, dtype=torch.bool)
    for step in tqdm(range(steps), desc="training image tokenizer", disable=None):
        batch = train[torch.randint(len(train), (batch_size,), generator=generator)]
        latents = model.latents(batch)
        quantized, vq_loss, codes = model.quantize(latents)
        reconstruction = model.decoder(model.post_quant_conv(quantized))
        loss = F.mse_loss(reconstruction, batch) + vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        used[codes.flatten().unique()] = True
        if (step + 1) % RESTART_EVERY == 0 and step + 1 < steps:
            _restart_unused_codes(model, latents.detach(), used, generator)
            used.zero_()

    tokenizer = ImageTokenizer(model, fingerprint="", device="cpu")
    checkpoint = tokenizer.save(out_folder)
    codes = tokenizer.encode(images)
    report = {
        "images": len(images),
        "resolution": resolution,
        "grid": grid,
        "codebook_size": codebook_size,
        "steps": steps,
        "initial_mse": round(initial, 5),
        "final_mse": round(reconstruction_mse(model, held_out), 5),
        "codes_in_use": int(np.unique(codes).size),
        "checkpoint": str(checkpoint),
        "fingerprint": tokenizer.fingerprint,
    }
    (Path(out_folder) / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
