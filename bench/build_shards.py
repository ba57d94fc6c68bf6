"""Shard-building throughput (records/s) for each kind, on generated shapes and CPython's bundled
documentation, with a small VQ tokenizer on the CPU. Prints one JSON line per kind.

    python bench/build_shards.py [--records 400] [--workers 2] [--parts 1]

With --parts N the build runs as N concurrent part processes (as N array tasks on one machine
would), each with workers / N workers, then merge-manifests; the time covers all of it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch

from data_pipelines.build import BuildSettings, build_shards
from data_pipelines.parts import merge_manifests
from data_pipelines.synthetic import write_image_captions
from data_pipelines.train_image_tokenizer import small_config
from fusion_train.tokenizers.image import ImageTokenizer
from fusion_train.tokenizers.text import train_text_tokenizer
from fusion_train.tokenizers.vqgan import VQGAN
from fusion_train.vocab import VocabLayout


def write_inputs(folder: Path, records: int) -> dict[str, Path]:
    from pydoc_data.topics import topics

    texts = list(topics.values())
    captions = write_image_captions(folder / "shapes", records)
    pairs = [json.loads(line) for line in captions.read_text().splitlines()]
    pairs = [{**p, "image": str(captions.parent / p["image"])} for p in pairs]
    rows = {
        "text": [{"text": texts[i % len(texts)]} for i in range(records)],
        "image-text": pairs,
        "interleaved": [
            {"segments": [{"text": texts[i % len(texts)][:500]}, {"image": p["image"]}, {"text": p["caption"]}]}
            for i, p in enumerate(pairs)
        ],
        "sft": [
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe:"}, {"type": "image", "image": p["image"]}]},
                          {"role": "assistant", "content": p["caption"]}]}
            for p in pairs
        ],
    }  # fmt: skip
    paths = {}
    for kind, records_of_kind in rows.items():
        paths[kind] = folder / f"{kind}.jsonl"
        paths[kind].write_text("".join(json.dumps(r) + "\n" for r in records_of_kind))
    return paths


def build_in_parts(settings: BuildSettings, inputs: list[Path], out: Path, workers: int, parts: int):
    if parts == 1:
        return build_shards(settings, inputs, out, workers=workers)
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=build_shards, args=(settings, inputs, out),
                        kwargs={"workers": max(1, workers // parts), "part": part, "parts": parts})
        for part in range(parts)
    ]  # fmt: skip
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        assert process.exitcode == 0, f"a part exited {process.exitcode}"
    return merge_manifests(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--parts", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        inputs = write_inputs(folder, args.records)
        vocab = VocabLayout(image_codebook_size=512, image_grid=8, vocab_size=8192, n_reserved=513)
        train_text_tokenizer([inputs["text"]], folder / "text.model", vocab)
        torch.manual_seed(0)
        vq = ImageTokenizer(VQGAN(small_config(64, 8, 512)), fingerprint="", device="cpu").save(folder / "vq")
        for kind, path in inputs.items():
            settings = BuildSettings(kind, str(folder / "text.model"), None if kind == "text" else str(vq))
            started = time.perf_counter()
            manifest = build_in_parts(settings, [path], folder / "out" / kind, args.workers, args.parts)
            seconds = time.perf_counter() - started
            tokens = sum(manifest.tokens_by_modality.values())
            print(json.dumps({"bench": "build_shards", "kind": kind, "workers": args.workers, "parts": args.parts, "records": manifest.samples,
                              "records_per_s": round(manifest.samples / seconds, 1), "tokens_per_s": round(tokens / seconds),
                              "image_resolution": 64, "seconds": round(seconds, 2)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
