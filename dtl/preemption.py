"""Stop cleanly on SIGUSR1/SIGTERM (Slurm preemption, time limit, scancel) and requeue under Slurm.

The handler only sets a flag; the training loop checks it after each optimizer step, writes a
checkpoint and leaves. Ranks agree on the flag with one all-reduce, so they all stop at the same
step even when the signal reaches them at different moments. On GPUs the ranks compare flags
every `GPU_CHECK_EVERY` steps (and at every epoch's end), not after every step: reading a flag
reduced on the GPU makes the host wait for the GPU to finish, so it could never queue the next
step while this one computes. (A CPU-side gloo group would avoid the wait but needs gloo to reach
every node, which clusters set up for NCCL alone do not guarantee.)
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import torch

GPU_CHECK_EVERY = 16  # steps: a stop comes at most 15 steps later, seconds against Slurm's 120 s notice


class PreemptionHandler:
    def __init__(self, accelerator, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.accelerator = accelerator
        self.received: int | None = None
        gpu_ranks = accelerator.num_processes > 1 and accelerator.device.type != "cpu"
        self.check_every = GPU_CHECK_EVERY if gpu_ranks else 1  # steps between the ranks' comparisons
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        when = f"within {self.check_every} steps (where the ranks compare)" if self.check_every > 1 else "after this step"
        who = f"rank {os.environ['RANK']} " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        sys.stderr.write(f"dtl: {who}received {signal.Signals(signum).name}; stopping {when}\n")  # one write: ranks
        sys.stderr.flush()                                                                       # do not interleave

    def should_stop(self, step: int | None = None) -> bool:
        """Whether every rank stops now. `step`: the optimizer step just taken (None: an epoch's end,
        always checked); on GPUs only every GPU_CHECK_EVERY-th step is, on every rank alike."""
        flag = self.received is not None
        if self.accelerator.num_processes == 1:
            return flag
        if step is not None and step % self.check_every:
            return False
        t = torch.tensor(int(flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, "max"))

    def requeue(self) -> None:
        """Under Slurm, put the job back in the queue; it resumes from the checkpoint on restart.

        SIGUSR1 is the early warning the slurm/ scripts ask for (`--signal=B:USR1@120`): always
        requeue. SIGTERM also comes from `scancel` and from the time limit, which must stay final
        (a cancelled job that requeues itself cannot be stopped), so it requeues only a job that
        Slurm marks PREEMPTED (PreemptMode=CANCEL; with REQUEUE Slurm requeues it itself).
        """
        job = os.environ.get("SLURM_ARRAY_JOB_ID") and (
            f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}".rstrip("_"))
        job = job or os.environ.get("SLURM_JOB_ID")
        if not job or not self.accelerator.is_main_process or os.environ.get("DTL_NO_REQUEUE"):
            return
        if self.received == signal.SIGTERM:
            state = slurm_job_state(job)
            if state != "PREEMPTED":
                print(f"dtl: job {job} got SIGTERM while {state or 'in an unknown state'}: not requeued "
                      f"(the checkpoint is there; submit again to continue)", file=sys.stderr, flush=True)
                return
        # said first: once the requeue takes effect Slurm ends the job's processes, this one too,
        # and a line printed after `scontrol` returns can be lost (seen in the Slurm test)
        print(f"dtl: job {job}: checkpoint written, asking Slurm to requeue it", file=sys.stderr, flush=True)
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        msg = "requeued" if result.returncode == 0 else f"requeue failed: {result.stderr.strip()}"
        print(f"dtl: job {job} {msg}", file=sys.stderr, flush=True)


def slurm_job_state(job: str) -> str | None:
    """JobState as slurmctld sees it now (CANCELLED, PREEMPTED, TIMEOUT, RUNNING, ...)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\bJobState=(\S+)", out)
    return m.group(1) if m else None
