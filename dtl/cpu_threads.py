"""Use the CPU cores the job was given.

`accelerate launch` without a config (the README's command) and torchrun with several processes
set OMP_NUM_THREADS=1 for every training process, so on a CPU machine torch would compute on one
core of many. dtl sets torch's intra-op threads to the CPUs available to the job (affinity mask,
Slurm's SLURM_CPUS_PER_TASK) divided by the processes on this machine, unless the user chose a
number themselves: OMP_NUM_THREADS in the environment the launcher itself was started with, or
accelerate's --num_cpu_threads_per_process. DataLoader workers run one thread each (torch's
default in workers). On GPUs nothing changes.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

_LAUNCHERS = ("accelerate", "torchrun", "torch.distributed.run", "torch.distributed.launch")


def available_cpus() -> int:
    """CPUs this process may run on, capped by Slurm's per-task allocation."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cpus, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else cpus


def _proc(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _launcher_ancestor(max_depth: int = 4) -> Optional[tuple[str, set[str]]]:
    """(command line, names of its initial environment variables) of the launcher that started us."""
    pid = os.getppid()
    for _ in range(max_depth):
        if pid <= 1:
            return None
        cmdline = _proc(pid, "cmdline").replace(b"\0", b" ").decode("utf-8", "replace")
        if any(name in cmdline for name in _LAUNCHERS):
            env = {item.split(b"=", 1)[0].decode("utf-8", "replace") for item in _proc(pid, "environ").split(b"\0") if item}
            return cmdline, env
        stat = _proc(pid, "stat").decode("utf-8", "replace")
        try:
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (IndexError, ValueError):
            return None
    return None


def user_chose_threads() -> bool:
    """OMP_NUM_THREADS is the user's unless a launcher put it there."""
    if "OMP_NUM_THREADS" not in os.environ:
        return False
    launcher = _launcher_ancestor()
    if launcher is None:
        return True
    cmdline, env = launcher
    return "OMP_NUM_THREADS" in env or "--num_cpu_threads_per_process" in cmdline


def configure_cpu_threads(num_workers: int) -> Optional[str]:
    """Set torch's threads for a CPU run; returns the line to print (None on GPUs)."""
    if torch.cuda.is_available():
        return None
    cpus = available_cpus()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if user_chose_threads():
        return (f"cpu: {cpus} CPUs, {local} process(es) here; torch uses {torch.get_num_threads()} thread(s) "
                f"(OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, set by you), {num_workers} data worker(s) each")
    threads = max(1, cpus // local)
    torch.set_num_threads(threads)
    return (f"cpu: {cpus} CPUs, {local} process(es) here; torch uses {threads} thread(s), "
            f"{num_workers} data worker(s) each")
