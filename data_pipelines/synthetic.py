"""The embedded default data: coloured shapes on coloured backgrounds, with captions that describe
them, generated from a seed. Real images and text, made here, so that tests and the demo need
no download."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
PLACES = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "centre": (0.5, 0.5),
}


def shape_image(rng: random.Random, size: int = 64) -> tuple[Image.Image, str]:
    shape = rng.choice(SHAPES)
    colour, background = rng.sample(sorted(COLOURS), 2)
    place = rng.choice(sorted(PLACES))
    big = rng.random() < 0.5
    image = draw_shape(shape, colour, background, place, big, size)
    caption = f"a {'big' if big else 'small'} {colour} {shape} on a {background} background, in the {place}"
    return image, caption


def draw_shape(shape: str, colour: str, background: str, place: str, big: bool, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), COLOURS[background])
    cx, cy = (c * size for c in PLACES[place])
    radius = size * (0.24 if big else 0.14)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=COLOURS[colour])
    return image


def dominant_colour(pixels: np.ndarray, background: str = "white", min_distance: float = 60.0) -> str | None:
    """The palette colour nearest to most pixels that are not near the background: the colour a
    picture of a shape shows, read by its pixels. None when (almost) every pixel is background."""
    palette = {name: np.asarray(rgb, dtype=np.float32) for name, rgb in COLOURS.items() if name != background}
    flat = pixels.reshape(-1, 3).astype(np.float32)
    foreground = flat[np.linalg.norm(flat - np.asarray(COLOURS[background], np.float32), axis=1) > min_distance]
    if len(foreground) < 0.01 * len(flat):
        return None
    names = list(palette)
    distances = np.stack([np.linalg.norm(foreground - palette[n], axis=1) for n in names])
    votes = np.bincount(distances.argmin(0), minlength=len(names))
    return names[int(votes.argmax())]


def write_image_captions(folder: str | Path, count: int, seed: int = 0, size: int = 64) -> Path:
    """PNG files plus `captions.jsonl` of {"image": path relative to it, "caption": text};
    returns the jsonl."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(folder / "captions.jsonl", "w") as index:
        for i in range(count):
            image, caption = shape_image(rng, size)
            path = folder / "images" / f"{i:06d}.png"
            image.save(path)
            index.write(json.dumps({"image": str(path.relative_to(folder)), "caption": caption}) + "\n")
    return folder / "captions.jsonl"
