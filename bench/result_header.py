"""The block every result under bench/results/ starts with: the command that made it, when, on what
machine and with which versions (dtl's commit included), so each number the README quotes can be
traced to a rerunnable command. One builder, so the benches' JSONs read alike."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from portable_json import REPO, portable_json


def gpu_name() -> Optional[str]:
    """The GPU this process computes on: torch's device 0 when CUDA is already up here, else
    nvidia-smi's first visible GPU (no CUDA context made: a bench that runs its arms as subprocesses
    never starts CUDA itself)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return torch.cuda.get_device_name(0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader",
                              *(["-i", visible] if visible else [])],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0] if out else None


def cpu_model() -> str:
    """The CPU's model name (Linux), else what platform knows: CPU results depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    """Python, torch (and its CUDA), torchvision, timm and the repository's commit (`+dirty` when the
    tree had uncommitted changes: the result then came from code no commit holds)."""
    import timm
    import torch
    import torchvision

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:  # no git: not a checkout
            return ""

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    # uncommitted code, not results or prose: rerunning a bench into a committed JSON is not "dirty"
    if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!*.md"):
        sha += "+dirty"
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "dtl": sha}


def _cpus() -> int:
    """The CPUs this process may use (its affinity; all of them where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def result_header(**extra: Any) -> dict:
    """`command`, `date`, `machine` and `versions`, then `extra`'s keys: a result's first keys."""
    import torch

    machine = {"platform": platform.platform(), "processor": cpu_model(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels torch picked: AVX2, AVX512
               "cpus": _cpus(), "torch_threads": torch.get_num_threads(), "gpu": gpu_name()}
    return {"command": "python " + shlex.join(sys.argv),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine, "versions": versions(), **extra}


def write_result(path: str | Path, result: dict) -> None:
    """`result` as indented JSON at `path`, with this machine's paths made portable."""
    Path(path).write_text(portable_json(result, indent=1) + "\n")
