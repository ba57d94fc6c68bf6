#!/usr/bin/env bash
# The embedded default, end to end: generated images and text, both tokenizers, the three kinds
# of shards, then the tiny Chameleon pretrained through DeepSpeed on 2 CPU ranks (one rank per
# GPU when there are GPUs), W&B offline. Run again, it resumes an unfinished run or starts the
# next one; data already made is reused.
#   DEMO_DIR=demo DEMO_STEPS=300 DEMO_IMAGES=2000 DEMO_VQ_STEPS=400 launch/demo.sh [OVERRIDES...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO_DIR=${DEMO_DIR:-demo}
STEPS=${DEMO_STEPS:-300}
started=$(date +%s)

"$PY" -m data_pipelines.cli make-demo-data --output "$DEMO_DIR" --images "${DEMO_IMAGES:-2000}" --vq-steps "${DEMO_VQ_STEPS:-400}"

# Resume the newest run unless it has finished; then start the next.
mkdir -p "$DEMO_DIR/runs"
last=$(find "$DEMO_DIR/runs" -mindepth 1 -maxdepth 1 -type d -name '[0-9]*' | sed 's#.*/##' | sort -n | tail -1)
run=${last:-1}
[ -d "$DEMO_DIR/runs/$run/checkpoints/step_$STEPS" ] && run=$((run + 1))
RUN_DIR="$DEMO_DIR/runs/$run"

if gpus=$(nvidia-smi -L 2>/dev/null | wc -l) && [ "$gpus" -gt 0 ]; then nproc=$gpus; else nproc=2; export DS_ACCELERATOR=cpu; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-offline}
shards="$DEMO_DIR/shards"
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m fusion_train.train \
  model=tiny model.vocab_size=4096 data=demo optim=demo \
  "data.sources.text.path=$shards/text" "data.sources.image_text.path=$shards/image_text" \
  "data.sources.interleaved.path=$shards/interleaved" \
  eval_data=demo "eval_data.sources.held_out.path=$shards/held_out" trainer.eval_every="${DEMO_EVAL_EVERY:-100}" \
  trainer.steps="$STEPS" trainer.global_batch_tokens=8192 trainer.checkpoint_every=100 \
  trainer.run_dir="$RUN_DIR" logging.log_every=10 logging.group=demo "$@"

report=$("$PY" -m fusion_train.monitor.report "$RUN_DIR")

"$PY" - "$RUN_DIR" "$started" "$report" <<'PYTHON'
import json, sys, time
from pathlib import Path
run = Path(sys.argv[1])
metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
train = [m for m in metrics if "loss/total" in m]
held_out = [f"{m['eval/loss']:.3f} at step {m['step']}" for m in metrics if "eval/loss" in m]
print(f"""
fusion_train demo finished in {time.time() - float(sys.argv[2]):.0f} s
  run folder   {run}
  checkpoints  {run / "checkpoints"} ({", ".join(sorted(p.name for p in (run / "checkpoints").glob("step_*")))})
  W&B (offline) {", ".join(str(p) for p in sorted((run / "wandb").glob("offline-run-*")))}
  metrics      {run / "metrics.jsonl"}
  report       {sys.argv[3]} (open it in a browser)
  loss         {train[0]["loss/total"]:.3f} at step {train[0]["step"]} -> {train[-1]["loss/total"]:.3f} at step {train[-1]["step"]}
  held-out     {", ".join(held_out) or "not validated"}""")
PYTHON
