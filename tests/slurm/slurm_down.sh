#!/usr/bin/env bash
# Stop the test cluster: jobs first (stopping slurmd does not stop them), then the daemons.
BASE=${BASE:-/tmp/fusion-slurm}
export SLURM_CONF=$BASE/slurm.conf
scancel --full --user="$(id -un)" 2>/dev/null || true
for _ in $(seq 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
for name in slurmd slurmctld; do
  pid=$(cat "$BASE/$name.bgpid" 2>/dev/null) || continue
  kill -TERM "$pid" 2>/dev/null; for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
done
exit 0
