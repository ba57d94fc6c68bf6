"""Tokens per second of the real training path with full monitoring on and off.

Runs `python -m fusion_train.train` (tiny model on the demo data, one process) alternately with
`monitor.enabled=true` (block-output norms every micro-batch; attention-logit maxima, per-group
gradient/weight/update norms on logged steps; the guard after every step) and `false` (losses,
LR, grad norm, data and throughput only), several times each. Each run's figure is the median of
its logged windows after the first (warm-up). Prints one JSON line per setting and one with the ratio.

    python bench/monitor_overhead.py [--data DIR] [--steps 40] [--repeats 3] [--log-every 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def demo_shards(folder: Path) -> dict:
    from data_pipelines.demo import make_demo_data

    return make_demo_data(folder, images=120, vq_steps=5, sounds=40, audio_steps=5)["shards"]


def run_once(shards: dict, run_dir: Path, monitoring: bool, args) -> float:
    overrides = [
        "model.vocab_size=4608", "optim=demo", "data.seq_len=256", "data.micro_batch_size=8",
        f"trainer.global_batch_tokens={8 * 256 * args.micro_steps}", f"trainer.steps={args.steps}",
        "trainer.checkpoint_every=100000", f"logging.log_every={args.log_every}", "logging.wandb=false",
        "trainer.progress_bar=false", f"trainer.run_dir={run_dir}", f"monitor.enabled={str(monitoring).lower()}",
        *(f"data.sources.{name}.path={shards[name]}" for name in ("text", "image_text", "interleaved", "audio_text")),
    ]  # fmt: skip
    subprocess.run([sys.executable, "-m", "fusion_train.train", *overrides], cwd=REPO, check=True, capture_output=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if "perf/tokens_per_s" in r]
    return statistics.median(r["perf/tokens_per_s"] for r in rows[1:])  # the first window warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a folder make_demo_data built (default: build one in a temporary folder)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-steps", type=int, default=8, help="micro-batches per optimizer step")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        shards = demo_shards(scratch / "demo") if not args.data else {
            name: str(Path(args.data) / "shards" / name) for name in ("text", "image_text", "interleaved")
        }  # fmt: skip
        figures = {True: [], False: []}
        for repeat in range(args.repeats):
            for monitoring in (False, True):  # alternate, so that drifts in machine speed hit both alike
                figures[monitoring].append(run_once(shards, scratch / f"run_{monitoring}_{repeat}", monitoring, args))
    common = {"bench": "monitor_overhead", "model": "tiny", "device": "cpu", "seq_len": 256, "micro_batch": 8,
              "micro_steps": args.micro_steps, "log_every": args.log_every, "steps": args.steps}  # fmt: skip
    medians = {m: statistics.median(v) for m, v in figures.items()}
    for monitoring in (False, True):
        print(json.dumps({**common, "monitoring": monitoring, "tokens_per_s": round(medians[monitoring], 1),
                          "runs": [round(v, 1) for v in figures[monitoring]]}))  # fmt: skip
    print(json.dumps({**common, "on_over_off": round(medians[True] / medians[False], 4)}))


if __name__ == "__main__":
    main()
