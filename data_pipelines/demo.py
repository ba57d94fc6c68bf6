"""The embedded default: everything `make demo` trains on, made here from a seed.

Generated coloured-shape images with captions, a text corpus (CPython's bundled documentation
plus sentences about shapes), interleaved documents mixing both; then the SentencePiece and small
VQ tokenizers are trained and the text, image-text and interleaved shards built. Each step is
skipped when its output is already there, so a second run reuses the first's data.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from data_pipelines.build import BuildSettings, build_shards
from data_pipelines.synthetic import write_image_captions
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


def make_demo_data(
    folder: str | Path, *, images: int = 2000, vq_steps: int = 400, seed: int = 0, workers: int = 2
) -> dict:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    captions = folder / "shapes" / "captions.jsonl"
    if not captions.is_file():
        write_image_captions(folder / "shapes", images, seed=seed)
    if not (folder / "interleaved.jsonl").is_file():
        _write_corpora(folder, captions, seed)
    text_model = folder / "tokenizers" / "text.model"
    if not text_model.is_file():
        train_text_tokenizer([folder / "text.jsonl"], text_model, DEMO_VOCAB, seed=seed)
    vq = folder / "tokenizers" / "vq" / "vqgan.ckpt"
    if not vq.is_file():
        log.info("training the demo image tokenizer (%d steps)", vq_steps)
        train_image_tokenizer([folder / "shapes" / "images"], vq.parent, steps=vq_steps, codebook_size=512, seed=seed)
    held_out = folder / "held_out" / "captions.jsonl"
    if not held_out.is_file():  # validation pairs, from a seed of their own
        write_image_captions(held_out.parent, max(20, images // 20), seed=seed + 1)
    inputs = {
        "text": ("text", folder / "text.jsonl"),
        "image_text": ("image-text", captions),
        "interleaved": ("interleaved", folder / "interleaved.jsonl"),
        "held_out": ("image-text", held_out),
    }
    manifests = {}
    for name, (kind, path) in inputs.items():
        out = folder / "shards" / name
        if not (out / MANIFEST).is_file():
            settings = BuildSettings(kind, str(text_model), None if kind == "text" else str(vq), seed)
            build_shards(settings, [path], out, workers=workers, max_samples_per_shard=200, overwrite=True)
        manifests[name] = str(out)
    return {"folder": str(folder), "text_tokenizer": str(text_model), "image_tokenizer": str(vq), "shards": manifests}
