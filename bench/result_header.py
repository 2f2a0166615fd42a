"""The block every result under bench/results/ starts with: the command that made it, when, on what
machine and with which versions (dtl's own `versions()`, as `dtl compare` records them, its commit
included), so each number the README quotes can be traced to a rerunnable command. One builder, so
the benches' JSONs read alike."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # dtl from this checkout, installed or not

from dtl.cpu_threads import available_cpus  # noqa: E402
from dtl.recipe_compare import versions  # noqa: E402
from portable_json import portable_json  # noqa: E402


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


def result_header(**extra: Any) -> dict:
    """`command`, `date`, `machine` and `versions`, then `extra`'s keys: a result's first keys."""
    import torch

    machine = {"platform": platform.platform(), "processor": cpu_model(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels torch picked: AVX2, AVX512
               "cpus": available_cpus(), "torch_threads": torch.get_num_threads(), "gpu": gpu_name()}
    return {"command": "python " + shlex.join(sys.argv),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine, "versions": versions(), **extra}


def write_result(path: str | Path, result: dict) -> None:
    """`result` as indented JSON at `path`, with this machine's paths made portable."""
    Path(path).write_text(portable_json(result, indent=1) + "\n")
