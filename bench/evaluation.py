"""The paper's evaluations on a demo model: lm-evaluation-harness on tasks made from the demo's
data (no network), 2-shot captioning and VQA on its held-out pictures, and what the in-loop tasks
cost a training run. One JSON line per result: the scores (a tiny model's, near chance) and the
throughput.

    python bench/evaluation.py MODEL --demo demo [--chat] [--run RUN_DIR] [--out bench/out/evaluation]

MODEL: a checkpoint of `make demo`'s pretraining (demo/runs/N/checkpoints/step_150) or, with
--chat, of its SFT stage (demo/runs/N/sft/checkpoints/step_500). --run: a training run folder whose
downstream/<task>/seconds are averaged (the in-loop cost per call).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
from pathlib import Path

from fusion_train.commands.eval import main as eval_main

CAPTION_PLACE = ", in the "


def write_tasks(demo: Path, out: Path) -> Path:
    """lm-eval YAML tasks over the demo's data: where the shape is, from its caption's words alone
    (multiple choice, chance 1/5), and the SFT chats' questions answered (generation, exact match)."""
    folder = out / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    captions = [json.loads(line)["caption"] for line in (demo / "held_out" / "captions.jsonl").read_text().splitlines()]
    places = sorted({c.rpartition(CAPTION_PLACE)[2] for c in captions})
    where = [{"context": c.rpartition(CAPTION_PLACE)[0] + CAPTION_PLACE.rstrip(), "choices": places,
              "answer": places.index(c.rpartition(CAPTION_PLACE)[2])} for c in captions]  # fmt: skip
    chats = [json.loads(line)["messages"] for line in (demo / "sft" / "text.jsonl").read_text().splitlines()]
    facts = list({m[0]["content"]: {"question": m[0]["content"], "answer": m[1]["content"]} for m in chats}.values())
    for name, rows in (("where", where), ("facts", facts)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    (folder / "demo_where.yaml").write_text(
        "task: demo_where\n" + head.format(folder / "where.jsonl") + "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "demo_facts.yaml").write_text(
        "task: demo_facts\n" + head.format(folder / "facts.jsonl") + "output_type: generate_until\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 24\nmetric_list:\n  - metric: exact_match\n"
    )
    return folder


def write_vqa(demo: Path, out: Path) -> tuple[Path, Path]:
    """The held-out pictures' colour and shape asked as VQAv2-format questions, ten answers each."""
    questions, annotations = [], []
    for image_id, line in enumerate((demo / "held_out" / "captions.jsonl").read_text().splitlines()):
        _, _, colour, shape, *_ = json.loads(line)["caption"].split()
        for asked, answer in (("What colour is the shape?", colour), ("What shape is it?", shape)):
            questions.append({"question_id": len(questions), "image_id": image_id, "question": asked})
            annotations.append({"question_id": len(annotations), "answers": [{"answer": answer}] * 10})
    paths = out / "vqa_questions.json", out / "vqa_annotations.json"
    paths[0].write_text(json.dumps({"questions": questions}))
    paths[1].write_text(json.dumps({"annotations": annotations}))
    return paths


def last_json_line(argv: list[str]) -> dict:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = eval_main(argv)
    if code:
        sys.exit(f"fusion-eval {' '.join(argv)} failed ({code})")
    return json.loads(printed.getvalue().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--demo", type=Path, default=Path("demo"))
    parser.add_argument("--chat", action="store_true", help="an SFT model: prompts end as its SFT prompts did")
    parser.add_argument("--run", type=Path, help="a run folder whose in-loop task costs to report")
    parser.add_argument("--out", type=Path, default=Path("bench/out/evaluation"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    chat = ["--chat"] if args.chat else []
    label = {"model": args.model, "chat": args.chat}

    tasks = write_tasks(args.demo, args.out)
    harness = last_json_line(["lm-harness", args.model, "--tasks", "demo_where", "demo_facts", "--include-path",
                              str(tasks), "--out", str(args.out / "lm_harness"), *chat])  # fmt: skip
    print(json.dumps({"bench": "lm_harness", **label, "scores": harness["lm_harness"],
                      "examples": harness["examples"], "examples_per_s": harness["examples_per_s"]}))  # fmt: skip
    held_out = args.demo / "held_out"
    questions, annotations = write_vqa(args.demo, args.out)
    for shots in (0,) if args.chat else (0, 2):  # the paper's pretrained-model figures are 2-shot
        images = ["--images", str(held_out / "images"), "--out", str(args.out / f"{shots}_shot"), "--shots",
                  str(shots), *chat]  # fmt: skip
        caption = last_json_line(
            ["caption", args.model, "--annotations", str(held_out / "captions_coco.json"), *images]
        )
        print(json.dumps({"bench": "caption", **label, **caption["caption"]}))
        vqa = last_json_line(["vqa", args.model, "--questions", str(questions), "--annotations", str(annotations),
                              "--image-name", "{image_id:06d}.png", *images])  # fmt: skip
        print(json.dumps({"bench": "vqa", **label, **vqa["vqa"]}))
    if args.run:
        metrics = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines()]
        costs = {}
        for record in metrics:
            for key, value in record.items():
                if key.startswith("downstream/") and key.endswith("/seconds"):
                    costs.setdefault(key.split("/")[1], []).append(value)
        for task, seconds in costs.items():
            print(json.dumps({"bench": "in_loop_cost", "run": str(args.run), "task": task, "calls": len(seconds),
                              "seconds_per_call": round(statistics.mean(seconds), 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
