"""Preemption: SIGTERM (the scheduler is ending the job) and SIGUSR1 (SLURM's advance warning,
`--signal=USR1@120`) ask the trainer to finish its optimizer step, checkpoint and exit 0; under
SLURM the job is then requeued and resumes from that checkpoint by itself. And a rank whose
launcher dies dies with it."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys

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


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_launcher() -> None:
    """Under torchrun, have the kernel SIGKILL this rank when torchrun dies. torchrun starts its
    ranks in sessions of their own, so a `kill -9` of torchrun alone leaves them training, and a
    restart would then have two trainers writing one run folder. With the launcher gone nobody can
    coordinate a clean stop: the last checkpoint is what a restart resumes from. (A SLURM step kill
    reaches every process anyway.) Not for a rank started without torchrun: a `nohup fusion-train`
    must outlive its shell."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher:  # it died before the request was in place
        os._exit(1)
