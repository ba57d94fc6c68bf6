"""Train a small VQ image tokenizer of Chameleon's VQGAN architecture on a folder of images, on
the CPU in minutes: for users without Meta's released weights, and for the demo.

Objective: pixel MSE plus the quantiser's codebook and commitment terms (no perceptual or GAN
loss: those matter for photographs at 512 px, not for a small demo tokenizer). The codebook
starts from encoder outputs and codes left unused are restarted on fresh ones, which keeps a
small codebook in use. The learning rate decays on a cosine to zero: at a constant rate the demo
tokenizer's round trip turned yellow drawings orange (5 in 30 kept their colour after 1,200 steps;
30 in 30 with the decay).
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm
from xxhash import xxh3_128_hexdigest

from data_pipelines.inputs import parse_record, read_input
from data_pipelines.records import Skip
from fusion_train.data.manifest import DataError
from fusion_train.tokenizers.image import ImageTokenizer, center_crop
from fusion_train.tokenizers.vqgan import VQGAN, VQGANConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
RESTART_EVERY = 20  # steps between restarts of unused codes

log = logging.getLogger(__name__)


def small_config(resolution: int, grid: int, codebook_size: int) -> VQGANConfig:
    downsamplings = int(math.log2(resolution // grid))
    if resolution != grid * 2**downsamplings:
        raise ValueError(f"resolution {resolution} must be the grid {grid} times a power of 2")
    # Narrow layers (16-32 channels) keep a step of 16 images at 64 px to 0.16 s on 2 CPU cores (0.3 s
    # on one; measured). One normalisation group:
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


def _folder_images(folder: Path) -> Iterator[bytes | None]:
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        yield path.read_bytes()


def _record_images(path: Path) -> Iterator[bytes | None]:
    """The images of an image-text jsonl (paths relative to it) or WebDataset tar, as build-shards
    reads them; None for a record without a readable image."""
    base_dir = path.parent
    for payload in read_input(path):
        try:
            image = parse_record(payload).get("image")
        except Skip:
            image = None
        if isinstance(image, str):
            image = (base_dir / image).read_bytes() if (base_dir / image).is_file() else None
        yield image if isinstance(image, bytes) else None


def image_bytes(inputs: list[str | Path]) -> Iterator[bytes | None]:
    """Every image of the inputs (folders searched recursively, image-text .jsonl, WebDataset .tar),
    encoded; None for each record whose image could not be read."""
    for item in map(Path, inputs):
        if item.is_dir():
            yield from _folder_images(item)
        elif item.suffix in (".jsonl", ".tar") and item.is_file():
            yield from _record_images(item)
        elif not item.exists():
            raise DataError(f"image input {item} not found")
        else:
            raise DataError(
                f'image input {item}: give a folder of images, an image-text .jsonl ({{"image": path, ...}}) '
                "or a WebDataset .tar"
            )


def load_images(inputs: list[str | Path], resolution: int, exclude: list[str | Path] = ()) -> tuple[np.ndarray, dict]:
    """The images, centre-cropped, without any whose bytes are among `exclude`'s (held-out images
    must not be trained on); and counts of what was left out."""
    excluded_hashes = {xxh3_128_hexdigest(b) for b in image_bytes(exclude) if b is not None}
    images, counts = [], Counter(excluded=0, unreadable=0)
    for encoded in image_bytes(inputs):
        if encoded is not None and xxh3_128_hexdigest(encoded) in excluded_hashes:
            counts["excluded"] += 1
            continue
        try:
            with Image.open(io.BytesIO(encoded)) as image:
                images.append(center_crop(image, resolution))
        except (UnidentifiedImageError, OSError, TypeError, Image.DecompressionBombError):
            counts["unreadable"] += 1  # an unreadable file among many is not worth stopping for
    if counts["unreadable"]:
        log.warning("%d unreadable images skipped", counts["unreadable"])
    if exclude and not counts["excluded"]:
        log.warning("none of the images in %s was among the training inputs: is --exclude the right list?", exclude)
    if not images:
        raise DataError(f"no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, inputs))}")
    return np.stack(images), dict(counts)


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
    inputs: list[str | Path],
    out_folder: str | Path,
    *,
    exclude: list[str | Path] = (),
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
    images, left_out = load_images(inputs, resolution, exclude)
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
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    used = torch.zeros(codebook_size, dtype=torch.bool)
    on_terminal = sys.stderr.isatty()
    for step in tqdm(range(steps), desc="training image tokenizer", disable=None):
        batch = train[torch.randint(len(train), (batch_size,), generator=generator)]
        latents = model.latents(batch)
        quantized, vq_loss, codes = model.quantize(latents)
        reconstruction = model.decoder(model.post_quant_conv(quantized))
        loss = F.mse_loss(reconstruction, batch) + vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        used[codes.flatten().unique()] = True
        if not on_terminal and ((step + 1) % max(1, steps // 10) == 0 or step + 1 == steps):
            log.info("image tokenizer step %d/%d: loss %.4f", step + 1, steps, loss.item())
        if (step + 1) % RESTART_EVERY == 0 and step + 1 < steps:
            _restart_unused_codes(model, latents.detach(), used, generator)
            used.zero_()

    tokenizer = ImageTokenizer(model, fingerprint="", device="cpu")
    checkpoint = tokenizer.save(out_folder)
    codes = tokenizer.encode(images)
    report = {
        "images": len(images),
        **left_out,
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
