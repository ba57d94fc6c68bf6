"""`fusion-generate`: text and pictures from a trained model.

  fusion-generate demo/runs/1/checkpoints/step_150 --prompt "a big red circle" --mode image
  fusion-generate MODEL --prompts prompts.jsonl --out generations/ --chat

A prompts file holds one JSON object per line: {"prompt": [SEGMENT, ...], "mode": "text" | "image" |
"audio" | "video" | "interleaved", "chat": true | false}, a segment being text, {"image": PATH},
{"audio": PATH} or {"video": PATH, "frames": N (optional: its first N)} (relative to the file); a
record without "mode" or "chat" takes --mode and --chat. A video-mode record makes a clip of
--video-frames frames (its own "frames" if it says), continuing its prompt's video if the prompt
ends with one. Writes OUT/outputs.jsonl, OUT/images/*.png, OUT/sounds/*.wav, OUT/videos/*.mp4
(each with a .png poster frame) and OUT/index.html.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from fusion_train.data.trained_with import load_tokenizers
from fusion_train.generate.constraints import Mode
from fusion_train.generate.documents import Codec, PromptError, VideoSettings, read_prompt_records
from fusion_train.generate.generator import Generator
from fusion_train.generate.guidance import Guidance
from fusion_train.generate.load import load_model
from fusion_train.generate.page import Sample, write_outputs
from fusion_train.generate.sampling import Sampling

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMAGE_SCALE, TEXT_SCALE = 1.2, 3.0  # Meta's inference settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusion-generate", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("model", help="a training checkpoint (step_N, any ZeRO stage), a model folder or an HF export")
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    prompts.add_argument("--image", action="append", default=[], help="an image put before each --prompt's text")
    prompts.add_argument("--prompts", help="a jsonl of prompts (see above)")
    prompts.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default="text",
        help="for --prompt and the --prompts records that name none (default text)",
    )
    prompts.add_argument("--chat", action="store_true", help="prompts end as SFT prompts do: for a fine-tuned model "
                         "(--prompt, and the --prompts records that do not say)")  # fmt: skip
    sampling = parser.add_argument_group("sampling (defaults: Meta's inference settings)")
    sampling.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    sampling.add_argument("--greedy", action="store_true", help="the same as --temperature 0")
    sampling.add_argument("--top-p", type=float, default=0.9)
    sampling.add_argument("--top-k", type=int, default=0)
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--max-new-tokens", type=int, help="for text and interleaved prompts (an image-mode prompt "
                          "gets its picture); default: 512 or room for two pictures, whichever is more")  # fmt: skip
    sampling.add_argument(
        "--image-scale", type=float, help=f"guidance towards the prompt's images (default {IMAGE_SCALE})"
    )
    sampling.add_argument("--text-scale", type=float, help=f"guidance towards the prompt's text (default {TEXT_SCALE})")
    sampling.add_argument("--no-guidance", action="store_true", help="images without classifier-free guidance")
    video = parser.add_argument_group("video (prompt videos, and what video mode makes)")
    video.add_argument("--video-fps", type=float, default=1.0, help="frames a second: the shards' --video-fps")
    video.add_argument("--video-frames", type=int, default=8, help="frames of a video-mode clip, given ones included")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default="generations", help="output folder (default ./generations)")
    run.add_argument("--text-tokenizer", help="default: the path the run's shard manifests record")
    run.add_argument("--image-tokenizer", help="the VQ tokenizer's vqgan.ckpt; default as --text-tokenizer")
    run.add_argument(
        "--audio-tokenizer", help="the EnCodec folder (audio prompts, sounds); default as --text-tokenizer"
    )
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--dtype", choices=DTYPES, help="default: bf16 on a GPU, fp32 on the CPU")
    run.add_argument("--no-cache", action="store_true", help="recompute every position for each token (slow)")
    return parser


def read_prompts(args: argparse.Namespace) -> tuple[list[dict], Path]:
    """Prompt records, and the folder their relative image paths start from."""
    if args.image and not args.prompt:
        raise PromptError("--image goes before each --prompt's text, and there is no --prompt: give one, or put the "
                          'image in the prompts file\'s records ({"image": PATH})')  # fmt: skip
    records = [{"prompt": [*({"image": p} for p in args.image), text], "mode": args.mode, "chat": args.chat}
               for text in args.prompt]  # fmt: skip
    base = Path()
    if args.prompts:
        path = Path(args.prompts)
        base = path.parent
        for number, record in read_prompt_records(path):
            records.append({"mode": args.mode, "chat": args.chat, **record, "where": f"{path}, line {number}"})
    if not records:
        raise PromptError("no prompts: give --prompt TEXT or --prompts FILE.jsonl")
    return records, base


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        return _generate(args)
    except (PromptError, ValueError, FileNotFoundError) as err:
        print(f"fusion-generate: error: {err}", file=sys.stderr)
        return 2


def _guidance(args: argparse.Namespace) -> Guidance | None:
    if args.no_guidance:
        if (args.image_scale, args.text_scale) != (None, None):
            raise PromptError(
                "--image-scale and --text-scale set the guidance that --no-guidance turns off: give either"
            )
        return None
    image = IMAGE_SCALE if args.image_scale is None else args.image_scale
    return Guidance(image, TEXT_SCALE if args.text_scale is None else args.text_scale)


def _generate(args: argparse.Namespace) -> int:
    records, base = read_prompts(args)
    guidance = _guidance(args)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    loaded = load_model(args.model, device, dtype)
    if args.video_fps <= 0 or args.video_frames < 1:
        raise PromptError(f"--video-fps {args.video_fps} --video-frames {args.video_frames}: both must be positive")
    tokenizers = load_tokenizers(loaded.trained_with, args.text_tokenizer, args.image_tokenizer, device, args.model,
                                 args.audio_tokenizer)  # fmt: skip
    codec = Codec(*tokenizers, VideoSettings(args.video_fps, args.video_frames))
    requests = [codec.request(r["prompt"], r["mode"], r["chat"], r.get("where", f"prompt {i}"), base, r.get("frames"))
                for i, r in enumerate(records)]  # fmt: skip
    sampling = Sampling(0.0 if args.greedy else args.temperature, args.top_p, args.top_k, args.seed)
    max_new_tokens = args.max_new_tokens or max(512, 2 * codec.vocab.image_block_length)
    generator = Generator(loaded.model, codec.vocab, use_cache=not args.no_cache)
    samples = []
    batches = range(0, len(requests), args.batch_size)
    for start in tqdm(batches, desc="batches", disable=len(batches) < 2 or not sys.stderr.isatty()):
        batch = requests[start : start + args.batch_size]
        outputs = generator.generate(batch, sampling, max_new_tokens, guidance, progress=sys.stderr.isatty())
        for record, request, output in zip(records[start:], batch, outputs, strict=False):
            segments = ([codec.decode_video(request.prompt, output.tokens)] if request.mode == Mode.VIDEO
                        else codec.decode(output.tokens, request.mode))  # fmt: skip
            samples.append(Sample(record["prompt"], request.mode.value, segments, output.stop, len(output.tokens)))
    page = write_outputs(args.out, samples, base)
    pictures = sorted((Path(args.out) / "images").glob("*.png"))
    sounds = sorted((Path(args.out) / "sounds").glob("*.wav"))
    videos = sorted((Path(args.out) / "videos").glob("*.mp4"))
    print(f"{len(samples)} prompts, {len(pictures)} pictures, {len(sounds)} sounds, {len(videos)} videos: "
          f"{Path(args.out) / 'outputs.jsonl'}")  # fmt: skip
    for media in [*pictures, *sounds, *videos]:
        print(f"  {media}")
    print(f"page: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
