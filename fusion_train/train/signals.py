"""Preemption: SIGTERM (the scheduler is ending the job) and SIGUSR1 (SLURM's advance warning,
`--signal=USR1@120`) ask the trainer to finish its optimizer step, checkpoint and exit 0; under
SLURM the job is then requeued and resumes from that checkpoint by itself."""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self):
        self.received: signal.Signals | None = None
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum)

    def anywhere(self, device: torch.device) -> bool:
        """Whether any rank got a signal: the ranks must stop at the same step. One int
        all-reduced per optimizer step."""
        flag = torch.tensor([int(self.received is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def requeue_slurm_job() -> bool:
    """Put this SLURM job back in the queue (rank 0, after the final checkpoint)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
        return False
    log.warning("SLURM job %s requeued; it resumes from the checkpoint just written", job)
    return True
