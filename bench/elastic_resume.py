"""The loss at a change of the number of ranks, with the optimizer state carried over (DeepSpeed's
universal checkpoint) and with Adam restarted (what a weights-only reload does), against an
uninterrupted run. The tiny model on the demo data: 2 ranks for --steps-before steps, then 1 rank
for --steps-after. The two resumed runs read the same batches after the change, so their
difference is the optimizer's alone; the uninterrupted run reads other batches (another split's
order), so its difference includes batch noise. Prints one JSON line per run and one summary.

    python bench/elastic_resume.py [--steps-before 40] [--steps-after 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from data_pipelines.demo import make_demo_data

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(run: Path, shards: dict, ranks: int, *extra: str) -> None:
    overrides = [
        "model.vocab_size=4608", "optim=demo", "optim.warmup_steps=5", "data.seq_len=128", "data.micro_batch_size=4",
        "trainer.global_batch_tokens=2048", f"trainer.run_dir={run}", "logging.log_every=1", "logging.wandb=false",
        "trainer.progress_bar=false", f"data.sources.text.path={shards['text']}",
        f"data.sources.image_text.path={shards['image_text']}", f"data.sources.interleaved.path={shards['interleaved']}",
        f"data.sources.audio_text.path={shards['audio_text']}", *extra,
    ]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "fusion_train.train", *overrides]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"training failed:\n{result.stderr[-3000:]}")


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/total"] for r in records if "loss/total" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-before", type=int, default=40)
    parser.add_argument("--steps-after", type=int, default=6)
    args = parser.parse_args()
    total = f"trainer.steps={args.steps_before + args.steps_after}"
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        shards = make_demo_data(folder / "demo", images=120, vq_steps=5, sounds=40, audio_steps=5)["shards"]
        train(folder / "uninterrupted", shards, 2, total)
        train(folder / "universal", shards, 2, total, f"trainer.stop_after_steps={args.steps_before}")
        shutil.copytree(folder / "universal", folder / "adam_restarted")
        train(folder / "universal", shards, 1, total)
        train(folder / "adam_restarted", shards, 1, total, "trainer.restart_optimizer=true")
        after = {
            name: losses(folder / name)[args.steps_before :]
            for name in ("uninterrupted", "universal", "adam_restarted")
        }
    for name, values in after.items():
        print(json.dumps({"bench": "elastic_resume", "run": name, "steps_before": args.steps_before,
                          "losses_after_the_change": [round(v, 4) for v in values]}), flush=True)  # fmt: skip
    gap = lambda a, b: round(max(abs(x - y) for x, y in zip(after[a], after[b], strict=True)), 4)  # noqa: E731
    print(json.dumps({"bench": "elastic_resume", "max_gap_universal_vs_uninterrupted": gap("universal", "uninterrupted"),
                      "max_gap_adam_restarted_vs_universal": gap("adam_restarted", "universal"),
                      "max_gap_adam_restarted_vs_uninterrupted": gap("adam_restarted", "uninterrupted")}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
