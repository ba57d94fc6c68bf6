"""`fusion-eval`: evaluations of a trained model (any source fusion_train opens: a training
checkpoint of any ZeRO stage, a model folder, an HF or Meta import).

    fusion-eval needle MODEL --haystack HELD_OUT_SHARDS... [--kind text|image] [--lengths 2048 8192 16384]
        [--depths 0 0.25 0.5 0.75 1] [--trials 4] [--rope-scaling JSON | --extrapolate] [--out DIR]

    fusion-eval lm-harness MODEL --tasks hellaswag arc_easy ... [--include-path MY_TASKS] [--num-fewshot N]
        [--limit N] [--batch-size 8] [--chat] [--log-samples] [--wandb-project P] [--out DIR]

    fusion-eval caption MODEL --annotations captions.json --images DIR [--shots 2] [--limit N] [--out DIR]
    fusion-eval vqa MODEL --questions questions.json --annotations answers.json --images DIR
        [--image-name COCO_val2014_{image_id:012d}.jpg] [--shots 2] [--limit N] [--out DIR]

    fusion-eval human-page PROMPTS.jsonl --answers NAME=GENERATIONS_DIR --answers NAME=GENERATIONS_DIR
        [--out judge.html] [--seed 0]
    fusion-eval human-score JUDGEMENTS.jsonl... --system NAME --other NAME [--rounds 2000]

`needle` (fusion_train/eval/needle.py): exact retrieval of a needle hidden at each depth of
haystacks of each length, written as DIR/needle_KIND.json, .md (a table) and .png (a heat map).
`lm-harness` (fusion_train/eval/harness.py, the `eval` extra): lm-evaluation-harness's tasks by their
names (or YAML tasks of one's own in --include-path), written as DIR/results.json (lm-eval's JSON),
printed as its table, logged to W&B with --wandb-project.
`caption` and `vqa` (fusion_train/eval/image_to_text.py): COCO-format captioning scored by CIDEr and
BLEU-4 (the COCO caption toolkit), VQAv2 accuracy; each answer in DIR/caption.jsonl or vqa.jsonl.
`human-page` (fusion_train/eval/human_page.py): one self-contained HTML page on which raters judge
two systems' answers to the same prompts, blind and in an order drawn per rater, and export their
judgements as JSONL. `human-score` (fusion_train/eval/human.py): raters' blind judgements of two systems' answers as
the paper's table: fulfils / partially / does not, win / tie / loss with 95% bootstrap intervals,
rater agreement; printed as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from fusion_train.data.haystacks import KINDS, Haystacks, NeedleError
from fusion_train.data.trained_with import load_tokenizers
from fusion_train.eval import image_to_text
from fusion_train.eval.human import JudgementError, read_judgements, score
from fusion_train.eval.human_page import HumanPageError, read_prompts, read_system, write_page
from fusion_train.eval.image_to_text import CAPTION_PROMPT, VQA_PROMPT, ImageTextError
from fusion_train.eval.needle import NeedleSettings, evaluate, write_report
from fusion_train.generate.documents import Codec, PromptError
from fusion_train.generate.generator import Generator
from fusion_train.generate.load import load_model
from fusion_train.model.chameleon import Chameleon
from fusion_train.storage import WriteFailed, writing
from fusion_train.weights.source import open_model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion-eval", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    needle = commands.add_parser("needle", help="needle in a haystack, text or image, over lengths x depths")
    needle.add_argument("model", help="a training checkpoint, model folder, HF export or Meta checkpoint")
    needle.add_argument(
        "--haystack",
        required=True,
        type=Path,
        nargs="+",
        help="folders of held-out token shards: text ones, and for --kind image some with pictures",
    )
    needle.add_argument("--kind", choices=KINDS, default="text")
    needle.add_argument("--lengths", type=int, nargs="+", default=[2048], help="haystack lengths in tokens")
    needle.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    needle.add_argument("--trials", type=int, default=4, help="haystacks per (length, depth)")
    needle.add_argument("--seed", type=int, default=0)
    stretch = needle.add_mutually_exclusive_group()
    stretch.add_argument("--rope-scaling", type=json.loads, help="RoPE scaling for this evaluation, as the model "
                         "setting (JSON), e.g. '{\"rope_type\": \"linear\", \"factor\": 4}'")  # fmt: skip
    stretch.add_argument("--extrapolate", action="store_true", help="allow haystacks past the model's context as is")
    needle.add_argument("--text-tokenizer", help="when the model source does not say where its tokenizer is")
    needle.add_argument("--batch-size", type=int, default=4)
    needle.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    needle.add_argument("--out", type=Path, default=Path("needle"), help="the report's folder")
    needle.add_argument("--name", help="the report files' name (default: needle_KIND)")

    harness = commands.add_parser("lm-harness", help="lm-evaluation-harness tasks: hellaswag, arc_easy, mmlu, ...")
    harness.add_argument("model", help="a training checkpoint, model folder, HF export or Meta checkpoint")
    harness.add_argument("--tasks", nargs="+", required=True, help="lm-eval task or group names")
    harness.add_argument("--include-path", type=Path, help="a folder of lm-eval YAML tasks of one's own")
    harness.add_argument("--num-fewshot", type=int, help="examples before each question (default: the task's)")
    harness.add_argument("--limit", type=float, help="examples per task (a fraction of each task when below 1)")
    harness.add_argument("--batch-size", type=int, default=8)
    harness.add_argument("--chat", action="store_true", help="a model after SFT: prompts end with its end of prompt")
    harness.add_argument("--max-gen-toks", type=int, default=256, help="for generation tasks that do not say")
    harness.add_argument("--text-tokenizer", help="when the model source does not say where its tokenizer is")
    harness.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    harness.add_argument("--log-samples", action="store_true", help="each example's prompt, answers and scores too")
    harness.add_argument("--wandb-project", help="log the results (a table and each metric) to this W&B project")
    harness.add_argument("--seed", type=int, default=0)
    harness.add_argument("--out", type=Path, default=Path("lm_harness"))

    caption = commands.add_parser("caption", help="COCO-format captioning: CIDEr and BLEU-4")
    caption.add_argument("--annotations", required=True, type=Path, help="COCO captions JSON: images and annotations")
    caption.add_argument("--prompt", default=CAPTION_PROMPT, help="text after the picture (default: none)")
    vqa = commands.add_parser("vqa", help="VQAv2-format visual question answering: VQA accuracy")
    vqa.add_argument("--questions", required=True, type=Path, help="VQAv2 questions JSON")
    vqa.add_argument("--annotations", required=True, type=Path, help="VQAv2 annotations JSON: ten answers a question")
    vqa.add_argument("--image-name", default="COCO_val2014_{image_id:012d}.jpg", help="an image id's file name")
    vqa.add_argument("--prompt", default=VQA_PROMPT, help="text after the picture; {question} is the question")
    for command in (caption, vqa):
        command.add_argument("model", help="a training checkpoint, model folder, HF export or Meta checkpoint")
        command.add_argument("--images", required=True, type=Path, help="the folder of the annotations' images")
        command.add_argument("--shots", type=int, default=0, help="examples before each one asked (the paper: 2)")
        command.add_argument("--limit", type=int, help="evaluate the first N examples (shots come from all)")
        command.add_argument("--batch-size", type=int, default=8)
        command.add_argument("--max-new-tokens", type=int, default=30 if command is caption else 10)
        command.add_argument(
            "--chat", action="store_true", help="a model after SFT: prompts end with its end of prompt"
        )
        command.add_argument("--text-tokenizer", help="when the model source does not say where its tokenizer is")
        command.add_argument("--image-tokenizer", help="when the model source does not say where its tokenizer is")
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        command.add_argument("--seed", type=int, default=0, help="draws each example's shots")
        command.add_argument("--out", type=Path, default=Path(command.prog.split()[-1]))

    page = commands.add_parser("human-page", help="a page for raters to judge two systems' answers blind")
    page.add_argument("prompts", type=Path, help="the prompts file both systems were given (fusion-generate --prompts)")
    page.add_argument("--answers", required=True, action="append", metavar="NAME=DIR",
                      help="a system's name and the folder fusion-generate wrote for it; give two")  # fmt: skip
    page.add_argument("--out", type=Path, default=Path("judge.html"))
    page.add_argument("--seed", type=int, default=0, help="with each rater's name, draws the order of the answers")

    human = commands.add_parser("human-score", help="raters' blind judgements of two systems as the paper's table")
    human.add_argument(
        "judgements", type=Path, nargs="+", help="JSONL files, one per rater (fusion_train/eval/human.py)"
    )
    human.add_argument("--system", required=True, help="the system whose wins are counted")
    human.add_argument("--other", required=True, help="the system it is compared with")
    human.add_argument("--rounds", type=int, default=2000, help="bootstrap resamples of the prompts")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command == "human-score":
            print(json.dumps(score(read_judgements(args.judgements), args.system, args.other, args.rounds), indent=2))
            return 0
        if args.command == "human-page":
            return _human_page(args)
        if args.command == "lm-harness":
            return _lm_harness(args)
        if args.command in ("caption", "vqa"):
            return _image_to_text(args)
        return _needle(args)
    except (NeedleError, JudgementError, HumanPageError, ImageTextError, PromptError, ValueError, WriteFailed,
            FileNotFoundError) as error:  # fmt: skip
        print(f"fusion-eval: error: {error}", file=sys.stderr)
        return 2


def _lm_harness(args: argparse.Namespace) -> int:
    try:
        from fusion_train.eval import harness
    except ImportError as missing:
        raise ValueError(f"fusion-eval lm-harness needs lm-evaluation-harness ({missing}): "
                         "pip install 'fusion-train[eval]'") from None  # fmt: skip
    try:
        manager = harness.check_tasks(args.tasks, args.include_path)
        model = harness.FusionLM(args.model, args.text_tokenizer, args.batch_size, args.device, chat=args.chat,
                                 max_gen_toks=args.max_gen_toks)  # fmt: skip
        started = time.perf_counter()
        results = harness.evaluate(
            model, args.tasks, manager, args.num_fewshot, args.limit, args.log_samples, args.seed
        )
    except harness.HarnessError as error:
        raise ValueError(str(error)) from None
    seconds = time.perf_counter() - started
    with writing(args.out, "the results", setting="--out"):
        path, table = harness.write_results(results, args.out)
    if args.wandb_project:
        harness.log_to_wandb(results, args.wandb_project, args.out)
    examples = sum(n["effective"] for n in results["n-samples"].values())
    print(table)
    print(json.dumps({"lm_harness": harness.scores(results), "examples": examples, "seconds": round(seconds, 2),
                      "examples_per_s": round(examples / seconds, 2), "written": str(path)}))  # fmt: skip
    return 0


def _image_to_text(args: argparse.Namespace) -> int:
    if args.command == "caption":
        examples = image_to_text.read_captions(args.annotations, args.images)
    else:
        examples = image_to_text.read_vqa(args.questions, args.annotations, args.images, args.image_name)
    asked = examples[: args.limit] if args.limit else examples
    device = torch.device(args.device)
    loaded = load_model(args.model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    text, images, _ = load_tokenizers(
        loaded.trained_with, args.text_tokenizer, args.image_tokenizer, device, args.model
    )
    if images is None:
        raise ImageTextError(f"{args.model} does not say where its image tokenizer is: pass --image-tokenizer PATH")
    prompting = image_to_text.Prompting(args.prompt, args.shots, args.chat, args.seed)
    codec = Codec(text, images)
    started = time.perf_counter()
    prompts = image_to_text.prompt_ids(codec, asked, prompting, examples)
    answers = image_to_text.answer(Generator(loaded.model, codec.vocab), codec, prompts, args.batch_size,
                                   args.max_new_tokens)  # fmt: skip
    seconds = time.perf_counter() - started
    predictions = {e.key: a for e, a in zip(asked, answers, strict=True)}
    if args.command == "caption":
        scores = image_to_text.caption_scores(predictions, {e.key: e.references for e in asked})
    else:
        scores = image_to_text.vqa_score(predictions, asked)
    scores |= {"examples": len(asked), "shots": args.shots, "examples_per_s": round(len(asked) / seconds, 2)}
    with writing(args.out, "the answers and scores", setting="--out"):
        written = image_to_text.write_answers(asked, predictions, scores, args.out, args.command)
    print(json.dumps({args.command: scores, "written": str(written)}))
    return 0


def _human_page(args: argparse.Namespace) -> int:
    named = [answer.partition("=") for answer in args.answers]
    if len(named) != 2 or any(not name or not folder for name, _, folder in named):
        raise HumanPageError("--answers NAME=DIR, twice: the two systems' names and generation folders")
    prompts = read_prompts(args.prompts)
    first, second = (read_system(name, Path(folder), prompts, args.prompts) for name, _, folder in named)
    with writing(args.out.parent, "the judging page", setting="--out"):
        page = write_page(args.prompts, (first, second), args.out, args.seed)
    print(f"{len(prompts)} prompts, {first.name} vs {second.name}: {page} (open it in a browser; each rater exports "
          "a JSONL for fusion-eval human-score)")  # fmt: skip
    return 0


def _needle(args: argparse.Namespace) -> int:
    settings = NeedleSettings(args.kind, tuple(args.lengths), tuple(args.depths), args.trials, args.seed)
    source = open_model(args.model)
    context = source.config.max_seq_len
    settings.check(context, args.rope_scaling is not None, args.extrapolate)
    scaling = args.rope_scaling if args.rope_scaling is not None else source.config.rope_scaling
    config = dataclasses.replace(source.config, max_seq_len=max(context, *settings.lengths), rope_scaling=scaling)
    device = torch.device(args.device)
    model = Chameleon(config, seed=None)
    model.load_state_dict(source.state_dict())
    model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    text, *_ = load_tokenizers(source.trained_with, args.text_tokenizer, None, device, args.model)
    haystacks = Haystacks(args.haystack, source.vocab, tokens_needed=2 * max(settings.lengths),
                          pictures_needed=4 * settings.trials)  # fmt: skip
    label = (f"RoPE scaling {json.dumps(args.rope_scaling)}" if args.rope_scaling
             else "extrapolated past its context" if max(settings.lengths) > context else "as trained")  # fmt: skip
    result = evaluate(model, text, haystacks, settings, args.batch_size, device, label)
    with writing(args.out, "the report", setting="--out"):
        written = write_report(result, args.out, args.name or f"needle_{args.kind}")
    print((args.out / f"{written[1].name}").read_text())
    print(json.dumps({"needle": args.kind, "label": label, "mean_accuracy": result["mean_accuracy"],
                      "grid": result["grid"]["accuracy"], "written": [str(p) for p in written]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
