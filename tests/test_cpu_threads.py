"""The README's `accelerate launch dtl/train.py ...` uses the machine's cores (accelerate sets OMP_NUM_THREADS=1)."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, tiny_config, write_config
from dtl.cpu_threads import available_cpus


def _launch(tmp_path, shard_dir, env_extra: dict) -> str:
    cfg = tiny_config(tmp_path, shard_dir, epochs=1, max_steps_per_epoch=1)
    path = write_config(tmp_path / "c.yaml", cfg)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ACCELERATE_CONFIG_FILE")}
    env.update(WANDB_MODE="disabled", HF_HOME=str(tmp_path / "hf"), **env_extra)  # no accelerate default config
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", str(REPO / "dtl" / "train.py"),
                        "--config", str(path)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.skipif(available_cpus() < 2, reason="needs a machine with several cores")
def test_accelerate_launch_without_config_trains_on_every_core(tmp_path, shard_dir):
    out = _launch(tmp_path, shard_dir, {})
    threads = int(re.search(r"torch uses (\d+) thread", out).group(1))
    assert threads == available_cpus(), out
    (tmp_path / "mine").mkdir()
    mine = _launch(tmp_path / "mine", shard_dir, {"OMP_NUM_THREADS": "1"})  # the user's choice stands
    assert "torch uses 1 thread(s) (OMP_NUM_THREADS=1, set by you)" in mine


def test_slurm_cpus_per_task_caps_the_threads(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert available_cpus() == 1
