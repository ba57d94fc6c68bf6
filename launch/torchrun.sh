#!/usr/bin/env bash
# One node, N processes (default: one per GPU, or 2 on a CPU-only machine):
#   NPROC=8 launch/torchrun.sh model=1b deepspeed=zero2 data=chameleon_stage1 trainer.run_dir=runs/1b
set -euo pipefail
PY=${PY:-python}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC:-0}" -gt 0 ] || { NPROC=2; export DS_ACCELERATOR=cpu; }
fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m fusion_train.train "$@"
