#!/usr/bin/env bash
# One node, N processes (default: one per GPU, or 2 on a CPU-only machine):
#   NPROC=8 launch/torchrun.sh model=1b deepspeed=zero2 data=chameleon_stage1 trainer.run_dir=runs/1b
# Several nodes without SLURM: the same command on each node, with the node count and one address
# every node reaches (c10d rendezvous: the first agent there hosts it; ranks are given out as the
# agents arrive). The run folder must be on a file system all nodes share.
#   NNODES=2 RDZV_ENDPOINT=node0:29500 NPROC=8 launch/torchrun.sh model=7b ... trainer.run_dir=/shared/runs/7b
set -euo pipefail
PY=${PY:-python}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC:-0}" -gt 0 ] || { NPROC=2; export DS_ACCELERATOR=cpu; }
fi
if [ "${NNODES:-1}" -gt 1 ]; then
  : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port, an address of one of the nodes that all of them reach}"
  placement=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-fusion_train}")
else
  placement=(--standalone)
fi
exec "$PY" -m torch.distributed.run "${placement[@]}" --nproc_per_node "$NPROC" -m fusion_train.train "$@"
