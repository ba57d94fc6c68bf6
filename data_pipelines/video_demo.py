"""The video demo's data and scores (`fusion-data make-video-demo`, launch/video_demo.sh): clips of
a shape that slides, knocks on a wall and slides back (synthetic_video.py), sampled at 2 frames a
second through the demo's image and audio tokenizers (a 4 s clip: 8 chunks of a 64-px frame, 66
ids, and half a second of sound, 52 ids; 958 ids with its header).

- `video_text`: clips and their captions ("a red circle moves right, knocks on the wall and goes
  back left"), the clip first in half of them;
- `video_chat`: chats about the same clips: "Which way does the circle move?" after the clip, and,
  for every other clip, its caption asking for the clip ("Show a red circle ...");
- held-out clips from another seed, with the prompts the demo asks the trained model: the question
  after each whole clip, and each clip's first half to continue in video mode.

`video_scores` reads fusion-generate's outputs back: the answers' direction word, and in each
continued clip where the shape is, frame by frame, against where it really was.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from data_pipelines.build import BuildSettings, build_shards
from data_pipelines.synthetic_video import (
    DIRECTIONS,
    Motion,
    answer,
    first_direction,
    question,
    shape_centre,
    write_video_captions,
)
from fusion_train.data.manifest import MANIFEST

VIDEO_FPS, GIVEN_FRAMES = 2.0, 4  # the continuation prompts give the first 2 s of a 4 s clip


def _chat(prompt: list, answer_parts: list | str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer_parts}]}


def write_video_chats(captions: Path) -> Path:
    """`chats.jsonl` beside the captions: a question after every clip, a clip for every other caption."""
    chats = []
    for i, record in enumerate(map(json.loads, captions.read_text().splitlines())):
        motion, clip = Motion(**record["motion"]), {"type": "video", "video": record["video"]}
        chats.append(_chat([clip, {"type": "text", "text": question(motion)}], answer(motion)))
        if i % 2 == 0:
            chats.append(_chat(f"Show {record['caption']}.", [clip]))
    random.Random(0).shuffle(chats)
    path = captions.with_name("chats.jsonl")
    path.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    return path


def write_video_prompts(captions: Path) -> Path:
    """`prompts.jsonl` beside the held-out captions: each clip's question (a chat, as the video chats
    ask it) and its first GIVEN_FRAMES frames to continue (video mode)."""
    records = []
    for record in map(json.loads, captions.read_text().splitlines()):
        motion = Motion(**record["motion"])
        records.append({"prompt": [{"video": record["video"]}, question(motion)], "mode": "text", "chat": True})
        records.append({"prompt": [{"video": record["video"], "frames": GIVEN_FRAMES}], "mode": "video"})
    path = captions.with_name("prompts.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_video_demo_data(demo: dict, folder: str | Path, *, videos: int = 400, held_out: int = 20, seed: int = 0,
                         workers: int = 2) -> dict:  # fmt: skip
    """The clips, chats and prompts under `folder`, and their shards made with the demo's tokenizers
    (`demo`: make_demo_data's answer); each step skipped when its output is there."""
    folder = Path(folder)
    captions, held_out_captions = folder / "train" / "videos.jsonl", folder / "held_out" / "videos.jsonl"
    if not captions.is_file():
        write_video_captions(captions.parent, videos, seed)
    if not held_out_captions.is_file():
        write_video_captions(held_out_captions.parent, held_out, seed + 1)
    chats, prompts = write_video_chats(captions), write_video_prompts(held_out_captions)
    inputs = {"video_text": ("video-text", captions), "video_chat": ("sft", chats),
              "held_out": ("video-text", held_out_captions)}  # fmt: skip
    shards = {}
    for name, (kind, path) in inputs.items():
        out = folder / "shards" / name
        if not (out / MANIFEST).is_file():
            settings = BuildSettings(kind, demo["text_tokenizer"], demo["image_tokenizer"], seed,
                                     audio_tokenizer=demo["audio_tokenizer"], video_fps=VIDEO_FPS)  # fmt: skip
            build_shards(settings, [path], out, workers=workers, max_samples_per_shard=100, overwrite=True)
        shards[name] = str(out)
    return {"folder": str(folder), "shards": shards, "prompts": str(prompts), "held_out": str(held_out_captions)}


def video_scores(outputs: Path, held_out_captions: Path) -> dict:
    """Of fusion-generate's outputs for the held-out prompts: the questions answered with the right
    direction, as (right, asked); for the continued clips, the share of their new frames that show
    the shape, the mean distance (in frame widths) between where it is and where it really was (and,
    for comparison, that of a shape that stayed where the last given frame shows it), and the
    continuations that set off in the clip's direction of travel at that time, as (right, asked)."""
    motions = {(held_out_captions.parent / r["video"]).resolve(): Motion(**r["motion"])
               for r in map(json.loads, held_out_captions.read_text().splitlines())}  # fmt: skip
    base = outputs.parent
    answered, continued, seen, errors, still = [0, 0], [0, 0], [], [], []
    for record in map(json.loads, outputs.read_text().splitlines()):
        video = next(s for s in record["prompt"] if isinstance(s, dict) and "video" in s)
        motion = motions[(held_out_captions.parent / video["video"]).resolve()]
        if record["mode"] == "text":
            said = " ".join(s["text"] for s in record["output"] if "text" in s).strip().lower()
            answered[0] += said.split(" ")[0].strip(".,!") == motion.direction
            answered[1] += 1
            continue
        clip = next(s for s in record["output"] if "video" in s)
        frames = _frames(base / clip["video"])
        given = clip["given_frames"]
        for index in range(given, len(frames)):
            centre, truth = shape_centre(frames[index], motion.colour), motion.centre(index / VIDEO_FPS)
            seen.append(centre is not None)
            if centre is not None:
                errors.append(float(np.hypot(*np.subtract(centre, truth))))
            still.append(float(np.hypot(*np.subtract(motion.centre((given - 1) / VIDEO_FPS), truth))))
        truth = _direction_at(motion, (given - 1) / VIDEO_FPS)
        continued[0] += first_direction(frames[given - 1 :], motion.colour) == truth
        continued[1] += 1
    return {"answered": tuple(answered), "continued_in_direction": tuple(continued),
            "frames_showing_the_shape": float(np.mean(seen)) if seen else 0.0,
            "mean_position_error": float(np.mean(errors)) if errors else None,
            "mean_position_error_if_still": float(np.mean(still)) if still else None}  # fmt: skip


def _direction_at(motion: Motion, time: float) -> str:
    """Which way the shape goes just after `time`: its first direction before the bounce, the other after."""
    if time < motion.bounce:
        return motion.direction
    return {DIRECTIONS[d]: d for d in DIRECTIONS}[tuple(-c for c in DIRECTIONS[motion.direction])]


def _frames(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [np.asarray(frame.to_image().convert("RGB")) for frame in container.decode(video=0)]
