"""Shard-building throughput (records/s) for each kind, on generated shapes and CPython's bundled
documentation, with a small VQ tokenizer on the CPU; for SFT, the same chats as our jsonl (images
as files), the Cauldron's parquet (images as bytes in the rows) and LLaVA's JSON array. Prints one
JSON line per kind and format.

    python bench/build_shards.py [--records 400] [--files 1] [--workers 2] [--parts 1] [--device cpu]
        [--encode-in workers|main] [--chameleon-vq]

With --chameleon-vq only image-text is built, from 512 px images, with Chameleon's VQGAN size
(32 x 32 codes of 8,192) at random weights: the figure to compare with the HF encoder's
(../shared/bench/vq_encode_peer.py) on a GPU (--device cuda, where images are encoded in the main
process by default).

With --parts N the build runs as N concurrent part processes (as N array tasks on one machine
would), each with workers / N workers, then merge-manifests; the time covers all of it. With
--files at least N, each part reads only its own files; with fewer, every part reads every file.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import pyarrow
import pyarrow.parquet
import torch

from data_pipelines.build import BuildSettings, build_shards
from data_pipelines.parts import merge_manifests
from data_pipelines.synthetic import write_image_captions
from data_pipelines.train_image_tokenizer import small_config
from fusion_train.tokenizers.image import ImageTokenizer
from fusion_train.tokenizers.text import train_text_tokenizer
from fusion_train.tokenizers.vqgan import VQGAN, VQGANConfig
from fusion_train.vocab import VocabLayout


def write_inputs(folder: Path, records: int, files: int, image_size: int = 64) -> dict[tuple[str, str], list[Path]]:
    """Each (kind, format)'s records, split into `files` files."""
    from pydoc_data.topics import topics

    texts = list(topics.values())
    captions = write_image_captions(folder / "shapes", records, size=image_size)
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
    paths: dict[tuple[str, str], list[Path]] = {}
    for kind, records_of_kind in rows.items():
        paths[kind, "messages"] = [folder / f"{kind}-{number}.jsonl" for number in range(files)]
        for number, path in enumerate(paths[kind, "messages"]):
            path.write_text("".join(json.dumps(r) + "\n" for r in records_of_kind[number::files]))
    paths["sft", "cauldron"] = [_cauldron_file(folder / "shapes_subset" / f"train-{n}.parquet", pairs[n::files])
                                for n in range(files)]  # fmt: skip
    llava = [{"image": p["image"], "conversations": [{"from": "human", "value": "Describe: <image>"},
                                                     {"from": "gpt", "value": p["caption"]}]} for p in pairs]  # fmt: skip
    paths["sft", "llava"] = [folder / f"llava-{n}.json" for n in range(files)]
    for number, path in enumerate(paths["sft", "llava"]):
        path.write_text(json.dumps(llava[number::files]))
    return paths


def _cauldron_file(path: Path, pairs: list[dict]) -> Path:
    """The pairs as Cauldron rows (images' bytes in the file), in row groups of 100 as HF datasets writes them."""
    rows = [{"images": [{"bytes": Path(p["image"]).read_bytes(), "path": Path(p["image"]).name}],
             "texts": [{"user": "Describe:", "assistant": p["caption"], "source": "shapes"}]} for p in pairs]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path, row_group_size=100)
    return path


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
    parser.add_argument("--files", type=int, default=1, help="input files per kind")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encode-in", choices=["workers", "main"])
    parser.add_argument("--chameleon-vq", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        chameleon = args.chameleon_vq
        inputs = write_inputs(folder, args.records, args.files, image_size=512 if chameleon else 64)
        vocab = VocabLayout() if chameleon else VocabLayout(512, 8, vocab_size=8192, n_reserved=513)
        train_text_tokenizer(inputs["text", "messages"], folder / "text.model", vocab)
        if chameleon:
            inputs = {("image-text", "messages"): inputs["image-text", "messages"]}
        torch.manual_seed(0)
        vq_config = VQGANConfig() if chameleon else small_config(64, 8, 512)
        vq = ImageTokenizer(VQGAN(vq_config), fingerprint="", device="cpu").save(folder / "vq")
        for (kind, format), paths in inputs.items():
            settings = BuildSettings(kind, str(folder / "text.model"), None if kind == "text" else str(vq), 0,
                                     args.device, args.encode_in, format=format)  # fmt: skip
            started = time.perf_counter()
            manifest = build_in_parts(settings, paths, folder / "out" / f"{kind}-{format}", args.workers, args.parts)
            seconds = time.perf_counter() - started
            tokens = sum(manifest.tokens_by_modality.values())
            print(json.dumps({"bench": "build_shards", "kind": kind, "format": format, "files": args.files, "workers": args.workers, "parts": args.parts,
                              "device": args.device, "encode_in": settings.encode_in, "records": manifest.samples,
                              "records_per_s": round(manifest.samples / seconds, 1), "tokens_per_s": round(tokens / seconds),
                              "image_resolution": vq_config.resolution, "seconds": round(seconds, 2)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
