#!/usr/bin/env bash
# The video demo (issue 32's proof at demo size, apart from `make demo`): clips of a shape that
# slides, knocks on a wall and slides back, made here; the tiny model trained on them through
# DeepSpeed on 2 CPU ranks with sequence parallelism 2 (1,024-token sequences: a clip and its text
# whole); then it answers "Which way does the circle move?" about held-out clips and continues
# their first halves in video mode, and both are scored by reading the frames (where the shape is).
# Uses the demo's tokenizers: it makes the demo's data first if it is not there.
#   DEMO_DIR=demo VIDEO_CLIPS=400 VIDEO_STEPS=600 launch/video_demo.sh [OVERRIDES...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO_DIR=${DEMO_DIR:-demo}
VIDEO_DIR="$DEMO_DIR/video"
STEPS=${VIDEO_STEPS:-600}
RUN_DIR="$VIDEO_DIR/run"
started=$(date +%s)

"$PY" -m fusion_train.commands.data make-demo-data --output "$DEMO_DIR" >/dev/null
"$PY" -m fusion_train.commands.data make-video-demo --demo "$DEMO_DIR" --output "$VIDEO_DIR" --videos "${VIDEO_CLIPS:-400}"

if gpus=$(nvidia-smi -L 2>/dev/null | wc -l) && [ "$gpus" -gt 0 ]; then nproc=$gpus; else nproc=2; export DS_ACCELERATOR=cpu; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-offline}
shards="$VIDEO_DIR/shards"
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m fusion_train.train \
  model=tiny model.vocab_size=4608 data=video_demo optim=demo trainer.sequence_parallel=2 \
  "data.sources.video_text.path=$shards/video_text" "data.sources.video_chat.path=$shards/video_chat" \
  eval_data=video_demo "eval_data.sources.held_out.path=$shards/held_out" trainer.eval_every=200 \
  trainer.steps="$STEPS" trainer.global_batch_tokens=8192 trainer.checkpoint_every=200 \
  trainer.run_dir="$RUN_DIR" logging.log_every=10 logging.group=video_demo "$@"
"$PY" -m fusion_train.commands.generate "$RUN_DIR/checkpoints/step_$STEPS" --greedy --video-fps 2 --video-frames 8 \
  --max-new-tokens 8 --prompts "$VIDEO_DIR/held_out/prompts.jsonl" --out "$RUN_DIR/generations"

"$PY" - "$RUN_DIR" "$VIDEO_DIR" "$started" <<'PYTHON'
import json, sys, time
from pathlib import Path
from data_pipelines.video_demo import video_scores
run, videos = Path(sys.argv[1]), Path(sys.argv[2])
scores = video_scores(run / "generations" / "outputs.jsonl", videos / "held_out" / "videos.jsonl")
metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
last = [m for m in metrics if "loss/total" in m][-1]
held_out = [m for m in metrics if "eval/loss" in m][-1]
print(json.dumps({"video_demo": str(run), "seconds": round(time.time() - float(sys.argv[3])), "steps": last["step"],
                  **{k: round(v, 3) for k, v in last.items() if k.startswith("loss/video")},
                  **{k: round(v, 3) for k, v in held_out.items() if k.startswith("eval/held_out/loss")}, **scores}))
PYTHON
echo "page: $RUN_DIR/generations/index.html"
