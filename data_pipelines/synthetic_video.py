"""The video demo's clips: a coloured shape on white slides towards a wall, bounces off it with a
knock (a note whose pitch says the shape: a circle high, a square middle, a triangle low) and slides
back; with a caption that says which way it moves, and the analysis that reads where the shape is
in any frame (the demo's scores: the model's answers and its continued frames, frame by frame).
MP4 files (H.264 and AAC through PyAV), made from a seed."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.synthetic import COLOURS, SHAPES
from data_pipelines.synthetic_audio import notes_audio
from fusion_train.tokenizers.video import write_mp4

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
KNOCKS = {"circle": "high", "square": "middle", "triangle": "low"}
NEAR, FAR = 0.25, 0.75  # where the shape's centre starts and where it bounces, as fractions of the frame
RADIUS = 0.14
SOURCE_FPS, SOUND_RATE = 10, 16000


@dataclass(frozen=True)
class Motion:
    shape: str
    colour: str
    direction: str  # which way it moves first
    across: float  # its place on the other axis
    bounce: float  # seconds: when it reaches the wall
    seconds: float

    def centre(self, time: float) -> tuple[float, float]:
        """(x, y) of the shape's centre at `time`, as fractions of the frame."""
        dx, dy = DIRECTIONS[self.direction]
        forward = dx + dy  # +1 towards the far side of the axis, -1 towards the near one
        start, wall = (NEAR, FAR) if forward > 0 else (FAR, NEAR)
        speed = (wall - start) / self.bounce
        along = start + speed * time if time <= self.bounce else wall - speed * (time - self.bounce)
        return (along, self.across) if dx else (self.across, along)

    def caption(self) -> str:
        back = {"left": "right", "right": "left", "up": "down", "down": "up"}[self.direction]
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} moves {self.direction}, knocks on the wall and goes back {back}"


def random_motion(rng: random.Random, seconds: float) -> Motion:
    colour = rng.choice(sorted(c for c in COLOURS if c != "white"))
    return Motion(rng.choice(SHAPES), colour, rng.choice(sorted(DIRECTIONS)), rng.uniform(0.3, 0.7),
                  rng.uniform(0.55, 0.75) * seconds, seconds)  # fmt: skip


def draw_frame(motion: Motion, time: float, size: int) -> np.ndarray:
    image = Image.new("RGB", (size, size), COLOURS["white"])
    x, y = (c * size for c in motion.centre(time))
    r = RADIUS * size
    box, fill = (x - r, y - r, x + r, y + r), COLOURS[motion.colour]
    draw = ImageDraw.Draw(image)
    if motion.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif motion.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return np.asarray(image)


def sound_track(motion: Motion, rate: int = SOUND_RATE) -> np.ndarray:
    """Silence but for the knock at the bounce."""
    samples = np.zeros(round(motion.seconds * rate), np.float32)
    knock = notes_audio([KNOCKS[motion.shape]], rate)
    start = round(motion.bounce * rate)
    end = min(len(samples), start + len(knock))
    samples[start:end] = knock[: end - start]
    return samples


def write_video(path: Path, motion: Motion, size: int) -> None:
    frames = np.stack([draw_frame(motion, i / SOURCE_FPS, size) for i in range(round(motion.seconds * SOURCE_FPS))])
    write_mp4(path, frames, SOURCE_FPS, sound_track(motion), SOUND_RATE)


def question(motion: Motion) -> str:
    return f"Which way does the {motion.shape} move?"


def answer(motion: Motion) -> str:
    return f"{motion.direction.capitalize()}."


def write_video_captions(folder: str | Path, count: int, seed: int = 0, size: int = 64,
                         seconds: float = 4.0) -> Path:  # fmt: skip
    """`count` MP4 files under folder/videos and `videos.jsonl` of {"video", "caption", "motion"};
    returns the jsonl."""
    folder = Path(folder)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        motion = random_motion(rng, seconds)
        name = f"videos/{i:05d}.mp4"
        write_video(folder / name, motion, size)
        lines.append(json.dumps({"video": name, "caption": motion.caption(), "motion": asdict(motion)}))
    (folder / "videos.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "videos.jsonl"


def shape_centre(frame: np.ndarray, colour: str, min_share: float = 0.005) -> tuple[float, float] | None:
    """Where the pixels of `colour` are, as fractions of the frame (x, y); None when almost none are."""
    distance = np.linalg.norm(frame.astype(np.float32) - np.asarray(COLOURS[colour], np.float32), axis=-1)
    ys, xs = np.nonzero(distance < 80)
    if len(xs) < min_share * distance.size:
        return None
    return float(xs.mean() + 0.5) / frame.shape[1], float(ys.mean() + 0.5) / frame.shape[0]


def first_direction(frames: list[np.ndarray], colour: str, least: float = 0.03) -> str | None:
    """Which way the shape first moves by more than `least` of the frame between two frames."""
    centres = [c for c in (shape_centre(f, colour) for f in frames) if c is not None]
    for (x0, y0), (x1, y1) in zip(centres, centres[1:], strict=False):
        dx, dy = x1 - x0, y1 - y0
        if max(abs(dx), abs(dy)) > least:
            return ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    return None
