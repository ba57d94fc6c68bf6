"""`fusion-data`: the offline jobs that turn raw corpora into token shards."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from data_pipelines.balance import balance_report
from data_pipelines.build import KINDS, BuildSettings, build_shards
from data_pipelines.chat_formats import FORMATS
from data_pipelines.demo import make_demo_data
from data_pipelines.parts import merge_manifests
from data_pipelines.sft import OVER_LENGTH
from data_pipelines.train_audio_tokenizer import train_audio_tokenizer
from data_pipelines.train_image_tokenizer import train_image_tokenizer
from data_pipelines.verify import verify_source
from data_pipelines.video_demo import make_video_demo_data
from fusion_train.data.manifest import DataError, Manifest
from fusion_train.storage import WriteFailed
from fusion_train.tokenizers.audio import AudioTokenizer
from fusion_train.tokenizers.image import image_layout
from fusion_train.tokenizers.text import TokenizerError, train_text_tokenizer
from fusion_train.train.config import ConfigError, load_config
from fusion_train.vocab import VocabLayout


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion-data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    text = commands.add_parser("train-text-tokenizer", help="SentencePiece BPE in Chameleon's id layout")
    text.add_argument("--input", nargs="+", required=True, help='jsonl files of {"text": ...}')
    text.add_argument("--output", required=True, help="the .model file to write (its layout goes beside it)")
    layout = text.add_argument_group(
        "vocabulary layout",
        "image codes and grid come from --image-tokenizer, the tokenizer the shards will be built with; "
        "without it, Chameleon's (8192 codes, 32 x 32, for Meta's VQGAN)",
    )
    layout.add_argument("--image-tokenizer", help="vqgan.ckpt (with vqgan.yaml beside it)")
    layout.add_argument(
        "--audio-tokenizer",
        help="an EnCodec folder (train-audio-tokenizer's, or transformers' layout): its levels x codes are added "
        "after the --vocab-size ids",
    )  # fmt: skip
    defaults = VocabLayout()
    layout.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    layout.add_argument("--n-reserved", type=int, default=defaults.n_reserved)
    layout.add_argument("--image-codebook-size", type=int, help="without --image-tokenizer")
    layout.add_argument("--image-grid", type=int, help="codes per image side, without --image-tokenizer")
    text.add_argument("--max-sentences", type=int, default=2_000_000)
    text.add_argument("--seed", type=int, default=0)

    image = commands.add_parser("train-image-tokenizer", help="a small VQGAN, trained on the CPU in minutes")
    image.add_argument(
        "--images", nargs="+", required=True,
        help="folders of images (searched recursively), image-text .jsonl or WebDataset .tar files",
    )  # fmt: skip
    image.add_argument(
        "--exclude", nargs="+", default=[],
        help="images not to train on, e.g. the held-out set (same kinds of input; matched by content)",
    )  # fmt: skip
    image.add_argument("--output", required=True, help="folder for vqgan.ckpt and vqgan.yaml")
    image.add_argument("--resolution", type=int, default=64)
    image.add_argument("--grid", type=int, default=8)
    image.add_argument("--codebook-size", type=int, default=512)
    image.add_argument("--steps", type=int, default=400)
    image.add_argument("--batch-size", type=int, default=16)
    image.add_argument("--seed", type=int, default=0)

    audio = commands.add_parser("train-audio-tokenizer", help="a small EnCodec, trained on the CPU in minutes")
    audio.add_argument(
        "--audio", nargs="+", required=True,
        help='folders of audio files (searched recursively), .jsonl of {"audio": path} or WebDataset .tar files',
    )  # fmt: skip
    audio.add_argument("--output", required=True, help="folder for config.json and model.safetensors")
    audio.add_argument("--sampling-rate", type=int, default=8000)
    audio.add_argument(
        "--ratios", type=int, nargs="+", default=[8, 5, 4], help="down-sampling per stage (hop = product)"
    )
    audio.add_argument("--codebook-size", type=int, default=256)
    audio.add_argument("--levels", type=int, default=2, help="residual quantizer levels (tokens per frame)")
    audio.add_argument("--steps", type=int, default=600)
    audio.add_argument("--batch-size", type=int, default=16)
    audio.add_argument("--seed", type=int, default=0)

    demo = commands.add_parser("make-demo-data", help="the embedded default data, tokenizers and shards")
    demo.add_argument("--output", default="demo")
    demo.add_argument("--images", type=int, default=2000)
    demo.add_argument("--vq-steps", type=int, default=1200)
    demo.add_argument("--sounds", type=int, default=600)
    demo.add_argument("--audio-steps", type=int, default=1200, help="the audio tokenizer's training steps")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workers", type=int, default=2)

    video = commands.add_parser(
        "make-video-demo", help="the video demo's clips, chats and shards, with the demo's tokenizers (make it first)"
    )
    video.add_argument("--demo", default="demo", help="the make-demo-data folder whose tokenizers encode the clips")
    video.add_argument("--output", default="demo/video")
    video.add_argument("--videos", type=int, default=400, help="training clips (4 s each)")
    video.add_argument("--held-out", type=int, default=20, help="clips the trained model is asked about")
    video.add_argument("--seed", type=int, default=0)
    video.add_argument("--workers", type=int, default=2)

    shards = commands.add_parser("build-shards", help="tokenize records into WebDataset shards + manifest.json")
    shards.add_argument("--kind", required=True, choices=sorted(KINDS))
    shards.add_argument(
        "--input", nargs="+", required=True,
        help=".jsonl files, .json arrays, .parquet files (the Cauldron's) or .tar WebDatasets (media-caption kinds: "
        "img2dataset's and video2dataset's KEY.jpg|mp4|webm|... + KEY.txt|json)",
    )  # fmt: skip
    shards.add_argument("--output", required=True)
    shards.add_argument("--text-tokenizer", required=True)
    shards.add_argument("--image-tokenizer", help="vqgan.ckpt (with vqgan.yaml beside it)")
    shards.add_argument("--audio-tokenizer", help="an EnCodec folder (config.json + model.safetensors)")
    shards.add_argument("--max-audio-seconds", type=float, default=60.0, help="longer clips are skipped, counted")
    shards.add_argument("--video-fps", type=float, default=1.0, help="frames sampled per second of video")
    shards.add_argument("--max-video-frames", type=int, default=64, help="a longer video is cut after this many")
    shards.add_argument(
        "--media-root", help="the folder image and audio paths are relative to (default: their input file's folder)"
    )
    shards.add_argument(
        "--exclude", nargs="+", default=[],
        help="evaluation sets to leave out (Cauldron .parquet, LLaVA/ShareGPT .json(l), messages .jsonl, image "
        "folders): records with one of their images (same bytes) or questions (normalised text)",
    )  # fmt: skip
    chats = shards.add_argument_group("chats (--kind sft)", "docs/sft.md")
    chats.add_argument("--format", default="messages", choices=sorted(FORMATS), help="how the records hold chats")
    chats.add_argument("--max-tokens", type=int, help="the training's data.seq_len: a longer chat is split or dropped")
    chats.add_argument(
        "--over-length", default="split", choices=OVER_LENGTH,
        help="split: between turns, into samples that each fit and repeat the images shown before; drop: leave it out",
    )  # fmt: skip
    chats.add_argument(
        "--split-images", action="store_true",
        help="each prompt image as its four quarters then itself (Idefics2): 5x the image tokens, for OCR-like sets",
    )  # fmt: skip
    shards.add_argument("--seed", type=int, default=0)
    shards.add_argument("--workers", type=int, default=2)
    shards.add_argument("--device", default="cpu", help="where images and audio are encoded: cpu or cuda")
    shards.add_argument(
        "--encode-in", choices=["workers", "main"],
        help="workers: each encodes its own images; main: workers decode, the main process encodes large "
        "batches on --device (default: main with cuda, else workers)",
    )  # fmt: skip
    shards.add_argument("--max-samples-per-shard", type=int, default=10_000)
    shards.add_argument("--max-mb-per-shard", type=int, default=256)
    shards.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    shards.add_argument(
        "--part",
        type=int,
        default=0,
        help="this part of the build, 0 to --parts - 1: every --parts-th input file from the --part-th "
        "(with fewer files than parts, every --parts-th chunk of 64 records)",
    )
    shards.add_argument(
        "--parts", type=int, default=1,
        help="split the build into this many parts (e.g. SLURM array tasks); join them with merge-manifests",
    )  # fmt: skip

    merge = commands.add_parser("merge-manifests", help="join the finished parts of a build into manifest.json")
    merge.add_argument("output", help="the --output folder the parts were built into")

    balance = commands.add_parser(
        "sft-balance", help="an SFT mixture's answer tokens by modality; with --target, the weights that reach it"
    )
    balance.add_argument(
        "overrides",
        nargs="*",
        help="fusion-train overrides that pick the data, e.g. data=demo_sft data.sources.text.path=...",
    )
    balance.add_argument(
        "--target", nargs="+", default=None, metavar="MODALITY=SHARE",
        help="answer-token shares to reach, e.g. text=0.5 image=0.4 audio=0.1 (modalities left out share the rest)",
    )  # fmt: skip

    verify = commands.add_parser("verify", help="check every shard of a source against its manifest")
    verify.add_argument("source_dir", help="a folder with manifest.json and its shards")
    verify.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    return parser


def _text_layout(args: argparse.Namespace) -> VocabLayout:
    """The layout a text tokenizer is trained for: its image part is the image tokenizer's."""
    chosen = {"image_codebook_size": args.image_codebook_size, "image_grid": args.image_grid}
    if args.image_tokenizer:
        images = image_layout(args.image_tokenizer)
        for name, value in chosen.items():
            if value is not None and value != images[name]:
                flag = "--" + name.replace("_", "-")
                raise TokenizerError(
                    f"{flag} {value} contradicts --image-tokenizer {args.image_tokenizer}, whose {name} is "
                    f"{images[name]}: drop {flag}"
                )
        chosen = images
    defaults = VocabLayout()
    sizes = {name: getattr(defaults, name) if value is None else value for name, value in chosen.items()}
    audio = AudioTokenizer.load(args.audio_tokenizer, device="cpu").layout() if args.audio_tokenizer else {}
    audio_ids = audio.get("audio_codebook_size", 0) * audio.get("audio_levels", 0)
    try:
        return VocabLayout(vocab_size=args.vocab_size + audio_ids, n_reserved=args.n_reserved, **sizes, **audio)
    except ValueError as err:
        raise TokenizerError(
            f"{err} (set by --vocab-size {args.vocab_size}, --n-reserved {args.n_reserved}, and "
            f"{'--image-tokenizer' if args.image_tokenizer else '--image-codebook-size/--image-grid'}: "
            f"{sizes['image_codebook_size']} codes, {sizes['image_grid']} x {sizes['image_grid']})"
        ) from None


def _run(args: argparse.Namespace) -> dict:
    if args.command == "train-text-tokenizer":
        tokenizer = train_text_tokenizer(
            args.input, args.output, _text_layout(args), max_sentences=args.max_sentences, seed=args.seed
        )
        return {
            "model": str(tokenizer.path),
            "pieces": tokenizer.sp.get_piece_size(),
            "fingerprint": tokenizer.fingerprint,
        }
    if args.command == "train-image-tokenizer":
        return train_image_tokenizer(
            args.images, args.output, exclude=args.exclude, resolution=args.resolution, grid=args.grid, codebook_size=args.codebook_size,
            steps=args.steps, batch_size=args.batch_size, seed=args.seed,
        )  # fmt: skip
    if args.command == "train-audio-tokenizer":
        return train_audio_tokenizer(
            args.audio, args.output, sampling_rate=args.sampling_rate, ratios=tuple(args.ratios),
            codebook_size=args.codebook_size, levels=args.levels, steps=args.steps, batch_size=args.batch_size,
            seed=args.seed,
        )  # fmt: skip
    if args.command == "make-demo-data":
        return make_demo_data(
            args.output, images=args.images, vq_steps=args.vq_steps, sounds=args.sounds, audio_steps=args.audio_steps,
            seed=args.seed, workers=args.workers,
        )  # fmt: skip
    if args.command == "make-video-demo":
        tokenizers = Path(args.demo) / "tokenizers"
        demo = {"text_tokenizer": str(tokenizers / "text.model"), "image_tokenizer": str(tokenizers / "vq" / "vqgan.ckpt"),
                "audio_tokenizer": str(tokenizers / "audio")}  # fmt: skip
        missing = [path for path in demo.values() if not Path(path).exists()]
        if missing:
            raise DataError(f"{', '.join(missing)} not found: make the demo's data first (fusion-data make-demo-data "
                            f"--output {args.demo}, or make demo)")  # fmt: skip
        return make_video_demo_data(demo, args.output, videos=args.videos, held_out=args.held_out, seed=args.seed,
                                    workers=args.workers)  # fmt: skip
    if args.command == "merge-manifests":
        return _summary(merge_manifests(args.output))
    if args.command == "sft-balance":
        return _balance(args)
    settings = BuildSettings(
        args.kind, args.text_tokenizer, args.image_tokenizer, args.seed, args.device, args.encode_in,
        args.audio_tokenizer, args.max_audio_seconds, format=args.format, max_tokens=args.max_tokens,
        over_length=args.over_length, split_images=args.split_images, exclude=tuple(args.exclude),
        media_root=args.media_root, video_fps=args.video_fps, max_video_frames=args.max_video_frames,
    )  # fmt: skip
    manifest = build_shards(
        settings, args.input, args.output, workers=args.workers, max_samples_per_shard=args.max_samples_per_shard,
        max_bytes_per_shard=args.max_mb_per_shard * 2**20, overwrite=args.overwrite, part=args.part, parts=args.parts,
    )  # fmt: skip
    return _summary(manifest)


def _summary(manifest: Manifest) -> dict:
    answers = {"answer_tokens": manifest.answer_tokens_by_modality, "answer_tokens_by_source": manifest.answer_tokens_by_source,
               "over_length": manifest.over_length} if manifest.kind == "sft" else {}  # fmt: skip
    return {
        "shards": len(manifest.shards),
        "samples": manifest.samples,
        "tokens": manifest.tokens_by_modality,
        **answers,
        **({"videos": manifest.videos} if manifest.videos else {}),
        "skipped": manifest.skipped,
    }


def _balance(args: argparse.Namespace) -> dict:
    data = load_config(args.overrides).data
    manifests = {name: Manifest.read(source.path) for name, source in data.sources.items()}
    target = None
    if args.target is not None:
        try:
            target = {key: float(value) for key, _, value in (item.partition("=") for item in args.target)}
        except ValueError:
            raise DataError(
                f"--target {' '.join(args.target)}: give MODALITY=SHARE pairs, e.g. text=0.5 image=0.5"
            ) from None
    return balance_report(data, manifests, target)


def _verify(args: argparse.Namespace) -> int:
    """Problems one per line on stderr, the summary as JSON; exit 1 when anything is wrong."""
    summary, problems = verify_source(args.source_dir, args.workers)
    for line in problems:
        print(line, file=sys.stderr)
    print(json.dumps(summary))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command == "verify":
            return _verify(args)
        print(json.dumps(_run(args)))
    except (DataError, TokenizerError, ConfigError, ValueError, WriteFailed, HydraException,
            OmegaConfBaseException) as err:  # fmt: skip
        print(f"fusion-data {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
