"""Chameleon §3.2 on the demo: the modality balance of the SFT mixture decides whether the model
learns an unconditional prior for one modality. Fine-tunes the demo's pretrained checkpoint twice
on the demo's SFT sources, once with weights that balance the answer tokens (sft-balance's
derivation) and once heavily toward pictures, then asks both the same text questions and picture
requests with unconstrained (interleaved) sampling and counts the answers in the wrong modality:
a text question answered with a picture or a clip, a picture request answered without a picture.
The text questions are the SFT data's own and unfamiliar ones (phrasings and topics it never
has), where a model has only its prior to go on. A fine-tuned model already in --out is reused.
Prints one JSON line per mixture.

    python bench/sft_balance.py --demo demo --checkpoint demo/runs/1/checkpoints/step_150
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from data_pipelines.balance import modality_shares, weights_for, with_weights
from data_pipelines.demo import HELD_OUT_DRAWINGS, OBJECT_COLOURS, SIDES, drawing_instruction
from fusion_train.data.manifest import Manifest
from fusion_train.train.config import load_config

SOURCES = ("text", "visual_chat", "image_generation", "sound")
MIXTURES = {  # answer-token shares asked of sft-balance
    "balanced": {"text": 0.45, "image": 0.45, "audio": 0.10},
    "pictures_heavy": {"text": 0.02, "image": 0.95, "audio": 0.03},
    "pictures_only": {"text": 0.001, "image": 0.995, "audio": 0.004},
}
# Text questions as the SFT data asks them, and unfamiliar ones; picture requests: the held-out
# drawings and shorter ones like the SFT data's.
FAMILIAR_QUESTIONS = [f"What colour is {thing}?" for thing in list(OBJECT_COLOURS)[:6]]
FAMILIAR_QUESTIONS += [f"How many sides does a {shape} have?" for shape in SIDES] + ["Which shapes can you draw?"]
FAMILIAR_QUESTIONS += ["What colour is a cherry?"]
UNFAMILIAR_QUESTIONS = ["Is the sky blue?", "Name a yellow fruit.", "Tell me about circles.", "Hello!",
                        "What is your name?", "Why is grass green?", "Count to three.", "Describe a red square.",
                        "Which is bigger, a circle or a square?", "Say something about colours."]  # fmt: skip
PICTURE_REQUESTS = [drawing_instruction(*d) for d in HELD_OUT_DRAWINGS]
PICTURE_REQUESTS += ["Draw a red circle.", "Draw a blue square in the centre.", "Draw a small green triangle.",
                     "Draw a yellow square."]  # fmt: skip


def data_overrides(demo: Path) -> list[str]:
    return ["data=demo_sft"] + [f"data.sources.{name}.path={demo / 'shards' / f'sft_{name}'}" for name in SOURCES]


def fine_tune(demo: Path, checkpoint: Path, weights: dict, run_dir: Path, steps: int) -> Path:
    overrides = [
        "model=tiny", "model.vocab_size=4608", "+stage=sft", *data_overrides(demo), "optim.lr=3e-3",
        "optim.warmup_steps=10", *[f"data.sources.{name}.weight={w:.6f}" for name, w in weights.items()],
        f"trainer.init_from={checkpoint}", f"trainer.steps={steps}", "trainer.global_batch_tokens=4096",
        f"trainer.checkpoint_every={steps}", f"trainer.run_dir={run_dir}", "trainer.progress_bar=false",
        "eval_samples=none", "logging.log_every=50",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fusion_train.train", *overrides]  # fmt: skip
    model = run_dir / "checkpoints" / f"step_{steps}"
    if not model.is_dir():
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return model


def ask(model: Path, out: Path, samples: int, seed: int) -> list[dict]:
    prompts = out / "prompts.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    asked = [(q, "familiar_question") for q in FAMILIAR_QUESTIONS] + [
        (q, "unfamiliar_question") for q in UNFAMILIAR_QUESTIONS
    ]
    asked += [(r, "picture_request") for r in PICTURE_REQUESTS]
    prompts.write_text("".join(json.dumps({"prompt": [q], "mode": "interleaved"}) + "\n"
                               for q, _ in asked for _ in range(samples)))  # fmt: skip
    subprocess.run([sys.executable, "-m", "fusion_train.commands.generate", str(model), "--chat", "--prompts",
                    str(prompts), "--seed", str(seed), "--max-new-tokens", "160", "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    outputs = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    return [
        {"kind": kind, **record}
        for (_, kind), record in zip([a for a in asked for _ in range(samples)], outputs, strict=True)
    ]


def wrong_modality(answers: list[dict]) -> dict:
    """Per kind of prompt: how many were asked, and how many answered in the wrong modality (a text
    question with a picture or clip, a picture request without a picture)."""
    counts = {}
    for answer in answers:
        kinds = {key for segment in answer["output"] for key in segment if key in ("text", "image", "audio")}
        wrong = "image" not in kinds if answer["kind"] == "picture_request" else bool(kinds & {"image", "audio"})
        asked, wrongly = counts.get(answer["kind"], (0, 0))
        counts[answer["kind"]] = (asked + 1, wrongly + wrong)
    return {kind: {"asked": asked, "wrong_modality": wrong} for kind, (asked, wrong) in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("demo"))
    parser.add_argument("--checkpoint", type=Path, required=True, help="the demo's pretrained checkpoint (step_N)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--samples", type=int, default=4, help="answers sampled per prompt")
    parser.add_argument("--out", type=Path, default=Path("bench/out/sft_balance"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_config(data_overrides(args.demo)).data
    manifests = {name: Manifest.read(source.path) for name, source in data.sources.items()}
    for name, target in MIXTURES.items():
        weights = weights_for(data, manifests, target)
        model = fine_tune(args.demo, args.checkpoint, weights, args.out / name, args.steps)
        answers = ask(model, args.out / name / "generations", args.samples, args.seed)
        shares = modality_shares(with_weights(data, weights), manifests)
        print(json.dumps({"bench": "sft_balance", "mixture": name, "answer_token_shares": {m: round(s, 3) for m, s in shares.items()},
                          "weights": {n: round(w, 4) for n, w in weights.items()}, "sft_steps": args.steps,
                          **wrong_modality(answers)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
