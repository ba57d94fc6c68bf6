"""Needle in a haystack on a model trained here: the tiny model taught to retrieve (text and image
needles, data_pipelines/needle.py) at 2,048 tokens, then evaluated at 2K, 8K and 16K tokens as it
is (extrapolated past its context), with RoPE scaling and no training (position interpolation,
linear x8), and after a short long-context stage (+stage=long_context at 8,192 tokens with
LLaMA-3.1 scaling over the 2,048 it was trained at). One JSON line per evaluation; the heat maps and
tables in WORK/report. Each part is skipped when its output is there (rerun to resume).

    python bench/needle.py --work /tmp/needle [--steps 600] [--stage-steps 100] [--demo FOLDER]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LENGTHS = ["2048", "8192", "16384"]


def run(*command: str) -> None:
    subprocess.run(command, cwd=REPO, check=True)


def retrieval_shards(work: Path, demo: Path, length: int, documents: int) -> Path:
    out = work / f"retrieval_{length}"
    if not (out / "manifest.json").is_file():
        run(sys.executable, "-m", "data_pipelines.needle", "--haystack", str(demo / "shards" / "image_text"),
            str(demo / "shards" / "text"), "--text-tokenizer", str(demo / "tokenizers" / "text.model"),
            "--out", str(out), "--documents", str(documents), "--length", str(length))  # fmt: skip
    return out


def train(run_dir: Path, shards: Path, seq_len: int, steps: int, *extra: str) -> Path:
    checkpoint = run_dir / "checkpoints" / f"step_{steps}"
    if not checkpoint.is_dir():
        run(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "fusion_train.train",
            "model=tiny", "model.vocab_size=4608", "optim=demo", f"data.seq_len={seq_len}",
            f"data.micro_batch_size={max(1, 8192 // seq_len)}", "trainer.global_batch_tokens=16384",
            f"trainer.run_dir={run_dir}", "logging.log_every=20", "trainer.progress_bar=false", "logging.wandb=false",
            "~data.sources.text", "~data.sources.image_text", "~data.sources.interleaved",
            f"+data.sources.needle.path={shards}", f"trainer.steps={steps}", f"trainer.checkpoint_every={steps}",
            "monitor.enabled=false", *extra)  # fmt: skip
    return checkpoint


def evaluate(model: Path, demo: Path, out: Path, kind: str, name: str, *extra: str) -> dict:
    result = out / f"{name}.json"
    if not result.is_file():
        run(sys.executable, "-m", "fusion_train.commands.eval", "needle", str(model), "--haystack",
            str(demo / "shards" / "held_out"), str(demo / "shards" / "text"), "--kind", kind, "--lengths", *LENGTHS,
            "--trials", "3", "--out", str(out), "--name", name, "--batch-size", "1", *extra)  # fmt: skip
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--demo", type=Path, help="the demo's data folder (default: made in WORK/demo)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--stage-steps", type=int, default=100)
    args = parser.parse_args()
    demo = args.demo or args.work / "demo"
    if not (demo / "shards").is_dir():
        from data_pipelines.demo import make_demo_data

        make_demo_data(demo, images=120, vq_steps=5, sounds=40, audio_steps=5)
    short = train(args.work / "train_2k", retrieval_shards(args.work, demo, 2048, 4000), 2048, args.steps,
                  "model.max_seq_len=2048")  # fmt: skip
    stage = train(args.work / "stage_8k", retrieval_shards(args.work, demo, 8192, 1000), 8192, args.stage_steps,
                  "+stage=long_context", f"trainer.init_from={short}", "model.max_seq_len=16384",
                  "model.rope_scaling.factor=8.0", "model.rope_scaling.original_max_position_embeddings=2048",
                  "optim.lr=1e-3", "optim.warmup_steps=10")  # fmt: skip
    report = args.work / "report"
    linear = json.dumps({"rope_type": "linear", "factor": 8})
    for kind in ("text", "image"):
        for model, name, extra in [
            (short, f"{kind}_2k_extrapolated", ["--extrapolate"]),
            (short, f"{kind}_2k_linear_x8", ["--rope-scaling", linear]),
            (stage, f"{kind}_after_8k_stage", []),
        ]:
            result = evaluate(model, demo, report, kind, name, *extra)
            print(json.dumps({"bench": "needle", "kind": kind, "model": name, "label": result["label"],
                              "mean_accuracy": result["mean_accuracy"], "accuracy": result["grid"]["accuracy"],
                              "answer_logprob": result["grid"]["answer_logprob"]}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
