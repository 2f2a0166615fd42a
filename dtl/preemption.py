"""Stop cleanly on SIGUSR1/SIGTERM (Slurm preemption, time limit, scancel) and requeue under Slurm.

The handler only sets a flag; the training loop checks it after each optimizer step, writes a
checkpoint and leaves. Ranks agree on the flag with one all-reduce, so they all stop at the same
step even when the signal reaches them at different moments. That all-reduce runs on the CPU
(over a gloo group beside NCCL): reading a flag reduced on the GPU would make every step wait
for the GPU to finish, and the host could never queue the next step while this one computes.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import torch
import torch.distributed


class PreemptionHandler:
    def __init__(self, accelerator, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.accelerator = accelerator
        self.received: int | None = None
        self._group = None  # the default group when it is already gloo (CPU ranks)
        if accelerator.num_processes > 1 and torch.distributed.get_backend() != "gloo":
            self._group = torch.distributed.new_group(backend="gloo")  # every rank builds it here, together
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        print(f"dtl: received {signal.Signals(signum).name}; stopping after this step", file=sys.stderr, flush=True)

    def should_stop(self) -> bool:
        flag = self.received is not None
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor(int(flag))
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return bool(t)

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
