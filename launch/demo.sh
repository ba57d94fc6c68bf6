#!/usr/bin/env bash
# The embedded default, end to end: generated images and text, both tokenizers, the shards, then
# the tiny Chameleon pretrained through DeepSpeed on 2 CPU ranks (one rank per GPU when there are
# GPUs), W&B offline, with samples of fixed prompts along the way; then the SFT stage from its last
# checkpoint, and fusion-generate drawing and answering held-out instructions. Run again, it
# resumes an unfinished run or starts the next one; data already made is reused.
#   DEMO_DIR=demo DEMO_STEPS=150 DEMO_SFT_STEPS=500 DEMO_IMAGES=2000 DEMO_VQ_STEPS=1200 DEMO_SOUNDS=600 \
#   DEMO_AUDIO_STEPS=1200 launch/demo.sh [OVERRIDES...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO_DIR=${DEMO_DIR:-demo}
STEPS=${DEMO_STEPS:-150}
SFT_STEPS=${DEMO_SFT_STEPS:-500}
EVAL_EVERY=${DEMO_EVAL_EVERY:-100}
started=$(date +%s)

"$PY" -m fusion_train.commands.data make-demo-data --output "$DEMO_DIR" --images "${DEMO_IMAGES:-2000}" \
  --vq-steps "${DEMO_VQ_STEPS:-1200}" --sounds "${DEMO_SOUNDS:-600}" --audio-steps "${DEMO_AUDIO_STEPS:-1200}"

# Resume the newest run unless it has finished; then start the next.
mkdir -p "$DEMO_DIR/runs"
last=$(find "$DEMO_DIR/runs" -mindepth 1 -maxdepth 1 -type d -name '[0-9]*' | sed 's#.*/##' | sort -n | tail -1)
run=${last:-1}
[ -d "$DEMO_DIR/runs/$run/sft/checkpoints/step_$SFT_STEPS" ] && run=$((run + 1))  # finished: SFT done
RUN_DIR="$DEMO_DIR/runs/$run"

if gpus=$(nvidia-smi -L 2>/dev/null | wc -l) && [ "$gpus" -gt 0 ]; then nproc=$gpus; else nproc=2; export DS_ACCELERATOR=cpu; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-offline}
shards="$DEMO_DIR/shards"
# In-loop downstream tasks on the held-out pictures: their colour and shape as multiple choice, and
# captions when Java is there for the COCO toolkit's tokenizer (0-shot: the tiny model takes 2-shot
# prompts, pictures with text between them, for interleaved documents and answers as those go on).
tasks="{name: shapes, path: $DEMO_DIR/held_out/questions.jsonl, limit: 200}"
command -v java >/dev/null && tasks="$tasks, {name: captions, kind: caption, annotations: \
$DEMO_DIR/held_out/captions_coco.json, images: $DEMO_DIR/held_out/images, limit: 20}"
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m fusion_train.train \
  model=tiny model.vocab_size=4608 data=demo optim=demo \
  "data.sources.text.path=$shards/text" "data.sources.image_text.path=$shards/image_text" \
  "data.sources.interleaved.path=$shards/interleaved" "data.sources.audio_text.path=$shards/audio_text" \
  eval_data=demo "eval_data.sources.held_out.path=$shards/held_out" trainer.eval_every="$EVAL_EVERY" \
  eval_samples=demo "eval_samples.image_dir=$DEMO_DIR/held_out/images" \
  "trainer.eval_tasks=[$tasks]" trainer.steps="$STEPS" trainer.global_batch_tokens=8192 trainer.checkpoint_every=100 \
  trainer.run_dir="$RUN_DIR" logging.log_every=10 logging.group=demo "$@"
report=$("$PY" -m fusion_train.commands.report "$RUN_DIR")

# Supervised fine-tuning from the last checkpoint: the paper's recipe with a demo's LR, batch and
# length (the tiny model binds colour words to pictures late: bench/RESULTS.md has the runs).
# Then the fine-tuned model draws and answers what it was not fine-tuned on, without classifier-
# free guidance: the tiny model's unconditional stream is too weak to guide by (1 of the 6 held-out
# drawings came out in the asked colour with Meta's scales, 5 without).
SFT_DIR="$RUN_DIR/sft"
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m fusion_train.train \
  model=tiny model.vocab_size=4608 +stage=sft data=demo_sft optim.lr=3e-3 optim.warmup_steps=10 \
  "data.sources.text.path=$shards/sft_text" "data.sources.visual_chat.path=$shards/sft_visual_chat" \
  "data.sources.image_generation.path=$shards/sft_image_generation" "data.sources.sound.path=$shards/sft_sound" \
  trainer.init_from="$RUN_DIR/checkpoints/step_$STEPS" trainer.steps="$SFT_STEPS" trainer.global_batch_tokens=4096 \
  trainer.checkpoint_every="$SFT_STEPS" trainer.eval_every="$(( SFT_STEPS / 2 ))" \
  eval_samples=demo_sft "eval_samples.image_dir=$DEMO_DIR/held_out/images" \
  trainer.run_dir="$SFT_DIR" logging.log_every=10 logging.group=demo "$@"
"$PY" -m fusion_train.commands.generate "$SFT_DIR/checkpoints/step_$SFT_STEPS" --chat --greedy --no-guidance \
  --prompts "$DEMO_DIR/sft/held_out_prompts.jsonl" --out "$SFT_DIR/generations"
sft_report=$("$PY" -m fusion_train.commands.report "$SFT_DIR")

"$PY" - "$RUN_DIR" "$started" "$report" "$SFT_DIR" "$sft_report" <<'PYTHON'
import json, sys, time
from pathlib import Path
from data_pipelines.demo import colour_check, sound_check
run, sft = Path(sys.argv[1]), Path(sys.argv[4])
matches, drawings = colour_check(sft / "generations" / "outputs.jsonl")
sounds = sound_check(sft / "generations" / "outputs.jsonl", run.parent.parent)
metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
train = [m for m in metrics if "loss/total" in m]
held_out = [f"{m['eval/loss']:.3f} at step {m['step']}" for m in metrics if "eval/loss" in m]
downstream = [f"step {m['step']}: " + ", ".join(f"{k.split('/', 1)[1]} {v:.3g}" for k, v in m.items()
              if k.startswith("downstream/") and not k.endswith("/seconds")) for m in metrics if "downstream/shapes/acc" in m]
print(f"""
fusion_train demo finished in {time.time() - float(sys.argv[2]):.0f} s
  run folder   {run}
  checkpoints  {run / "checkpoints"} ({", ".join(sorted(p.name for p in (run / "checkpoints").glob("step_*")))})
  W&B (offline) {", ".join(str(p) for p in sorted((run / "wandb").glob("offline-run-*")))}
  metrics      {run / "metrics.jsonl"}
  report       {sys.argv[3]} (open it in a browser)
  loss         {train[0]["loss/total"]:.3f} at step {train[0]["step"]} -> {train[-1]["loss/total"]:.3f} at step {train[-1]["step"]}
  held-out     {", ".join(held_out) or "not validated"}
  downstream   {"; ".join(downstream) or "none"} (chance: colour 1/8, shape 1/3)
  samples      {run / "samples.jsonl"} (in the report: prompts by steps)
  SFT run      {sft} (report {sys.argv[5]})
  generations  {sft / "generations" / "index.html"} (pictures in {sft / "generations" / "images"}, sounds in {sft / "generations" / "sounds"})
  colour check {matches}/{drawings} held-out drawings show the colour asked for
  sound check  {sounds["played"][0]}/{sounds["played"][1]} held-out requests play the notes asked for (a note tracker heard: \
{"; ".join(sounds["heard"])}); {sounds["described"][0]}/{sounds["described"][1]} held-out sounds described by their caption""")
PYTHON
