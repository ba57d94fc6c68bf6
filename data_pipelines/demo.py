"""The embedded default: everything `make demo` trains on, made here from a seed.

Generated coloured-shape images with captions, a text corpus (CPython's bundled documentation
plus sentences about shapes), interleaved documents mixing both; then the SentencePiece and small
VQ tokenizers are trained and the text, image-text and interleaved shards built. For the SFT
stage, chats in three of Chameleon's SFT categories: image generation ("Draw a big red circle in
the centre." -> a picture on white), visual chat ("What is in this picture?" -> its caption) and
text questions. Each step is skipped when its output is already there, so a second run reuses
the first's data.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.build import BuildSettings, build_shards
from data_pipelines.synthetic import COLOURS, PLACES, SHAPES, dominant_colour, draw_shape, write_image_captions
from data_pipelines.train_image_tokenizer import train_image_tokenizer
from fusion_train.data.manifest import MANIFEST
from fusion_train.tokenizers.text import train_text_tokenizer
from fusion_train.vocab import VocabLayout

log = logging.getLogger(__name__)

# 64 px images as 8 x 8 codes of 512: an image is 66 ids; 4,096 ids in all.
DEMO_VOCAB = VocabLayout(image_codebook_size=512, image_grid=8, vocab_size=4096, n_reserved=513)


def _write_corpora(folder: Path, captions_file: Path, seed: int) -> None:
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    pairs = [json.loads(line) for line in captions_file.read_text().splitlines()]
    for pair in pairs:  # image paths relative to the interleaved jsonl, in `folder`
        pair["image"] = str((captions_file.parent / pair["image"]).relative_to(folder))
    texts = list(topics.values()) + [f"This picture shows {pair['caption']}." for pair in pairs]
    # Shuffled: the loader reads a source shard by shard, and a shard holding only long prose made
    # the text loss spike every time a rank reached it (the guard found it).
    rng.shuffle(texts)
    with open(folder / "text.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    with open(folder / "interleaved.jsonl", "w") as f:
        for i in range(0, len(pairs) - 1, 2):
            first, second = pairs[i], pairs[i + 1]
            segments = [
                {"text": f"Here are two pictures. The first is {first['caption']}:"},
                {"image": first["image"]},
                {"text": f" and the second, {second['caption']}:"},
                {"image": second["image"]},
                {"text": " " + rng.choice(["They differ.", "Compare their colours.", "Look at the shapes."])},
            ]
            f.write(json.dumps({"segments": segments}) + "\n")


# What `make demo` asks the fine-tuned model to draw at the end: six instructions the SFT data never
# says. Their pictures are in it, but only under shorter instructions (without the size, the place
# or both), so the model must put together words it learnt apart. Leaving out the pictures as well
# asks the tiny model to draw codes at grid places where it never saw them, which it does in the
# asked colour about half the time (bench/RESULTS.md).
HELD_OUT_DRAWINGS = [
    ("big", "red", "circle", "top left"), ("small", "green", "square", "centre"),
    ("big", "blue", "triangle", "bottom right"), ("big", "yellow", "circle", "top right"),
    ("small", "purple", "triangle", "bottom left"), ("big", "orange", "square", "centre"),
]  # fmt: skip
OBJECT_COLOURS = {"the sky": "blue", "grass": "green", "a tomato": "red", "a banana": "yellow", "snow": "white",
                  "coal": "black", "an orange": "orange", "a plum": "purple", "a lemon": "yellow", "a leaf": "green"}  # fmt: skip
SIDES = {"triangle": "three", "square": "four"}


def drawing_instruction(size: str | None, colour: str, shape: str, place: str | None) -> str:
    """ "Draw a big red circle in the top left."; without the size or the place when they are None."""
    return f"Draw a {f'{size} ' if size else ''}{colour} {shape}{f' in the {place}' if place else ''}."


def _chat(prompt, answer) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def _write_sft_corpora(folder: Path, captions_file: Path, drawings: int, seed: int) -> dict[str, Path]:
    """One jsonl per SFT category; the drawings' pictures under sft/images."""
    rng = random.Random(seed)
    sft = folder / "sft"
    (sft / "images").mkdir(parents=True, exist_ok=True)
    combos = [(size, colour, shape, place) for size in ("big", "small") for colour in sorted(COLOURS) if colour != "white"
              for shape in SHAPES for place in sorted(PLACES)]  # fmt: skip
    drawing_chats = []
    for i in range(drawings):
        size, colour, shape, place = combo = rng.choice(combos)
        draw_shape(shape, colour, "white", place, size == "big").save(sft / "images" / f"{i:06d}.png")
        picture = [{"type": "image", "image": f"images/{i:06d}.png"}]
        # Three instructions in four leave out the size, the place or both (the picture has them all
        # the same): the colour word alone then decides the colour. A held-out combination is never
        # said in full.
        said_size, said_place = (size if rng.random() < 0.5 else None), (place if rng.random() < 0.5 else None)
        if combo in HELD_OUT_DRAWINGS and said_size and said_place:
            said_size, said_place = (None, place) if rng.random() < 0.5 else (size, None)
        drawing_chats.append(_chat(drawing_instruction(said_size, colour, shape, said_place), picture))
    pairs = [json.loads(line) for line in captions_file.read_text().splitlines()]
    visual_chats = [
        _chat(
            [
                {"type": "image", "image": os.path.relpath(captions_file.parent / p["image"], sft)},
                {"type": "text", "text": "What is in this picture?"},
            ],
            f"It is {p['caption']}.",
        )  # fmt: skip
        for p in pairs[: max(1, drawings // 2)]
    ]
    text_chats = [_chat(f"What colour is {thing}?", f"{thing[0].upper()}{thing[1:]} is {colour}.")
                  for thing, colour in OBJECT_COLOURS.items()]  # fmt: skip
    text_chats += [
        _chat(f"How many sides does a {shape} have?", f"A {shape} has {n} sides.") for shape, n in SIDES.items()
    ]
    text_chats += [_chat("Which shapes can you draw?", "Circles, squares and triangles, in eight colours.")]
    files = {"image_generation": drawing_chats, "visual_chat": visual_chats, "text": text_chats * 8}
    _write_held_out_prompts(sft / "held_out_prompts.jsonl", folder / "held_out" / "images")
    for name, chats in files.items():
        rng.shuffle(chats)
        with open(sft / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(chat) + "\n" for chat in chats)
    return {name: sft / f"{name}.jsonl" for name in files}


def _write_held_out_prompts(path: Path, held_out_images: Path) -> None:
    """What the fine-tuned model is asked at the end of the demo: drawings it never saw, pictures
    from the held-out set to describe, a question it saw."""
    prompts = [{"prompt": [drawing_instruction(*d)], "mode": "image"} for d in HELD_OUT_DRAWINGS]
    prompts += [
        {"prompt": [{"image": os.path.relpath(held_out_images / f"{i:06d}.png", path.parent)}, "What is in this picture?"],
         "mode": "text"}
        for i in range(2)
    ]  # fmt: skip
    prompts.append({"prompt": ["What colour is snow?"], "mode": "text"})
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))


def colour_check(outputs: Path) -> tuple[int, int]:
    """Of fusion-generate's drawings of "Draw a ... COLOUR shape ...", how many show COLOUR the most."""
    matches = total = 0
    for line in outputs.read_text().splitlines():
        record = json.loads(line)
        pictures = [s["image"] for s in record["output"] if "image" in s]
        if record["mode"] != "image" or not pictures:
            continue
        asked = next(c for c in COLOURS if f" {c} " in record["prompt"][0])
        shown = dominant_colour(np.asarray(Image.open(outputs.parent / pictures[0]).convert("RGB")))
        matches, total = matches + (shown == asked), total + 1
    return matches, total


def make_demo_data(
    folder: str | Path, *, images: int = 2000, vq_steps: int = 1200, seed: int = 0, workers: int = 2
) -> dict:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    captions = folder / "shapes" / "captions.jsonl"
    if not captions.is_file():
        write_image_captions(folder / "shapes", images, seed=seed)
    if not (folder / "interleaved.jsonl").is_file():
        _write_corpora(folder, captions, seed)
    if not (folder / "sft" / "text.jsonl").is_file():
        _write_sft_corpora(folder, captions, max(20, images // 2), seed)
    text_model = folder / "tokenizers" / "text.model"
    if not text_model.is_file():
        train_text_tokenizer([folder / "text.jsonl"], text_model, DEMO_VOCAB, seed=seed)
    vq = folder / "tokenizers" / "vq" / "vqgan.ckpt"
    if not vq.is_file():  # on every picture the models train on: the SFT drawings' white backgrounds too
        log.info("training the demo image tokenizer (%d steps)", vq_steps)
        pictures = [folder / "shapes" / "images", folder / "sft" / "images"]
        train_image_tokenizer(pictures, vq.parent, steps=vq_steps, codebook_size=512, seed=seed)
    held_out = folder / "held_out" / "captions.jsonl"
    if not held_out.is_file():  # validation pairs, from a seed of their own, never in the image tokenizer's data
        write_image_captions(held_out.parent, max(20, images // 20), seed=seed + 1)
    inputs = {
        "text": ("text", folder / "text.jsonl"),
        "image_text": ("image-text", captions),
        "interleaved": ("interleaved", folder / "interleaved.jsonl"),
        "held_out": ("image-text", held_out),
        **{
            f"sft_{name}": ("sft", folder / "sft" / f"{name}.jsonl")
            for name in ("text", "visual_chat", "image_generation")
        },
    }
    manifests = {}
    for name, (kind, path) in inputs.items():
        out = folder / "shards" / name
        if not (out / MANIFEST).is_file():
            settings = BuildSettings(kind, str(text_model), None if kind == "text" else str(vq), seed)
            build_shards(settings, [path], out, workers=workers, max_samples_per_shard=200, overwrite=True)
        manifests[name] = str(out)
    return {"folder": str(folder), "text_tokenizer": str(text_model), "image_tokenizer": str(vq), "shards": manifests}
