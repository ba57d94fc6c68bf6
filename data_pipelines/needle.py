"""Retrieval documents that teach a model to find a needle (bench/needle.py trains the tiny model on
them): haystacks of `fusion_train.eval.needle` from shards the evaluation does not use, each with a
text or an image needle (alternating) at a uniformly random depth and the question and answer at
its end (a whole picture: shards hold no cut ones). The loss is on every token, or with
--answer-only on the answer alone: too sparse a signal for the tiny model, whose answers stayed at
chance after 600 steps of it; language modelling of the haystack is what grows the induction heads
that copying needs.

    python -m data_pipelines.needle --haystack SHARDS... --text-tokenizer PATH --out FOLDER
        [--documents 4000] [--length 2048] [--seed 0] [--answer-only]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from data_pipelines.build import ShardSink
from fusion_train.data.haystacks import KINDS, Haystacks, example
from fusion_train.data.manifest import Manifest
from fusion_train.tokenizers.multimodal import TokenizedDocument
from fusion_train.tokenizers.text import TextTokenizer


def write_retrieval_shards(haystack: list[Path], text_tokenizer: str, out: Path, documents: int, length: int,
                           seed: int, answer_only: bool = False) -> Manifest:  # fmt: skip
    text = TextTokenizer(text_tokenizer)
    source = Manifest.read(haystack[0])
    haystacks = Haystacks(haystack, source.vocab, tokens_needed=8 * length, pictures_needed=256)
    manifest = Manifest(kind="text", vocab=source.vocab, fingerprints=source.fingerprints, seed=seed,
                        inputs=[str(p) for p in haystack], tokenizer_paths=source.tokenizer_paths)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    sink = ShardSink(out, manifest, max_samples=500, max_bytes=2**30)
    rng = np.random.default_rng(seed)
    for i in range(documents):
        kind = KINDS[i % len(KINDS)]
        ids, answer = example(kind, length, float(rng.random()), haystacks, text, rng, whole_picture=True)
        loss_mask = None
        if answer_only:
            loss_mask = np.zeros(len(ids), dtype=np.uint8)
            loss_mask[-len(answer) :] = 1
        sink.write((0, i), TokenizedDocument(ids.astype(np.int64), loss_mask))
    sink.close()
    manifest.write(out)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--haystack", type=Path, nargs="+", required=True)
    parser.add_argument("--text-tokenizer", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    manifest = write_retrieval_shards(
        args.haystack, args.text_tokenizer, args.out, args.documents, args.length, args.seed
    )
    print(
        f"{manifest.samples} retrieval documents of {args.length} tokens in {len(manifest.shards)} shards in {args.out}"
    )


if __name__ == "__main__":
    main()
