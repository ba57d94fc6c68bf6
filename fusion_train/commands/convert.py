"""`fusion-convert`: Chameleon weights between fusion_train, HF transformers and Meta's release.

`to-hf`, `to-meta` and `zero-to-safetensors` read any model source (a training checkpoint of any
ZeRO stage, a model folder, an HF or Meta export); `from-hf` and `from-meta` read their format."""

from __future__ import annotations

import argparse
import logging
import sys

from fusion_train.model.formats import ConversionError, hf, meta, native
from fusion_train.model.formats.vocab_sizes import VocabSizes
from fusion_train.weights.source import open_model


def _vocab_arguments(parser: argparse.ArgumentParser, when_missing: str) -> None:
    """The vocabulary sizes a source format may not record (vocab_size always comes from it)."""
    group = parser.add_argument_group(f"vocabulary layout ({when_missing})")
    group.add_argument("--image-codebook-size", type=int, help="image codes (an HF vocabulary map names them)")
    group.add_argument("--image-grid", type=int, help="codes per image side")
    group.add_argument("--n-reserved", type=int, help="reserved control ids")


def _vocab_sizes(args: argparse.Namespace) -> VocabSizes:
    return VocabSizes(args.image_codebook_size, args.image_grid, args.n_reserved)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion-convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, source: str, help_text: str, vocab_when_missing: str = "") -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(source)
        sub.add_argument("out_dir")
        if vocab_when_missing:
            _vocab_arguments(sub, vocab_when_missing)
        return sub

    command(
        "from-hf", "hf_dir", "HF ChameleonForConditionalGeneration folder -> fusion_train model folder",
        "needed only for an export that does not record it and is not of Chameleon's released sizes",
    )  # fmt: skip
    command("to-hf", "model_dir", "any model source (model folder, training checkpoint, ...) -> HF folder")
    command(
        "from-meta", "meta_dir", "Meta params.json + consolidated*.pth -> fusion_train model folder",
        "Meta's format records none; defaults: Chameleon's 8192 codes, 32 x 32 grid, 1024 reserved",
    )  # fmt: skip
    command(
        "zero-to-safetensors", "checkpoint", "a run's checkpoints/step_N (any ZeRO stage) -> fusion_train model folder"
    )
    to_meta = command("to-meta", "model_dir", "any model source -> Meta params.json + consolidated*.pth")
    to_meta.add_argument(
        "--model-parallel", type=int, default=None, help="shards to write (default: the model's qk_norm_groups)"
    )
    return parser


def _convert(args: argparse.Namespace):
    if args.command == "from-hf":
        return hf.import_hf(args.hf_dir, args.out_dir, _vocab_sizes(args))
    if args.command == "from-meta":
        return meta.import_meta(args.meta_dir, args.out_dir, _vocab_sizes(args))
    source = open_model(args.checkpoint if args.command == "zero-to-safetensors" else args.model_dir)
    if args.command == "to-hf":
        return hf.save_hf(source.state_dict(), source.config, source.vocab, args.out_dir)
    if args.command == "to-meta":
        return meta.save_meta(source.state_dict(), source.config, args.out_dir, args.model_parallel)
    return native.save_native(
        source.state_dict(), source.config, source.vocab, args.out_dir, source.trained_with.fingerprints
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        out = _convert(args)
    except (ConversionError, ValueError) as err:
        print(f"fusion-convert {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
