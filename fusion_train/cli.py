"""Console entry points."""

from __future__ import annotations

import argparse
import sys

from fusion_train.model import convert
from fusion_train.vocab import VocabLayout


def _vocab_arguments(parser: argparse.ArgumentParser) -> None:
    """The vocabulary sizes a source format does not record (vocab_size always comes from it)."""
    defaults = VocabLayout()
    group = parser.add_argument_group("vocabulary layout (defaults: Chameleon's)")
    group.add_argument(
        "--image-codebook-size",
        type=int,
        default=defaults.image_codebook_size,
        help="image codes (an HF vocabulary map that names them overrides this)",
    )
    group.add_argument("--image-grid", type=int, default=defaults.image_grid, help="codes per image side")
    group.add_argument("--n-reserved", type=int, default=defaults.n_reserved, help="reserved control ids")


def _vocab(args: argparse.Namespace) -> VocabLayout:
    return VocabLayout(args.image_codebook_size, args.image_grid, n_reserved=args.n_reserved)


def _convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusion-convert",
        description="Convert Chameleon weights between fusion_train, HF transformers and Meta's release.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    from_hf = commands.add_parser(
        "from-hf", help="HF ChameleonForConditionalGeneration folder -> fusion_train model folder"
    )
    from_hf.add_argument("hf_dir")
    from_hf.add_argument("out_dir")
    _vocab_arguments(from_hf)

    to_hf = commands.add_parser(
        "to-hf", help="fusion_train model folder -> HF folder (config.json + model.safetensors)"
    )
    to_hf.add_argument("model_dir")
    to_hf.add_argument("out_dir")

    from_meta = commands.add_parser(
        "from-meta", help="Meta params.json + consolidated*.pth folder -> fusion_train model folder"
    )
    from_meta.add_argument("meta_dir")
    from_meta.add_argument("out_dir")
    _vocab_arguments(from_meta)

    to_meta = commands.add_parser("to-meta", help="fusion_train model folder -> Meta params.json + consolidated*.pth")
    to_meta.add_argument("model_dir")
    to_meta.add_argument("out_dir")
    to_meta.add_argument(
        "--model-parallel", type=int, default=None, help="shards to write (default: the model's qk_norm_groups)"
    )
    return parser


def convert_main(argv: list[str] | None = None) -> int:
    args = _convert_parser().parse_args(argv)
    try:
        if args.command == "from-hf":
            out = convert.import_hf(args.hf_dir, args.out_dir, _vocab(args))
        elif args.command == "to-hf":
            out = convert.export_hf(args.model_dir, args.out_dir)
        elif args.command == "from-meta":
            out = convert.import_meta(args.meta_dir, args.out_dir, _vocab(args))
        else:
            out = convert.export_meta(args.model_dir, args.out_dir, args.model_parallel)
    except (convert.ConversionError, ValueError) as err:
        print(f"fusion-convert {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
