"""slurm/ scripts on a real Slurm cluster (munge + slurmctld + slurmd on this machine).

The preemption test submits slurm/one_node.sbatch as a user would, sends the batch shell the
SIGUSR1 that `--signal=B:USR1@120` sends before a time limit, and checks that the job
checkpoints, requeues itself, resumes from its checkpoint and ends with the step count and the
weights of an uninterrupted run, in the same W&B run.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtl.run_config import load_config
from conftest import PROCESSES, REPO, tiny_config, write_config, write_imagefolder
from slurm_cluster import SlurmUnavailable, start_cluster, stop_cluster

pytestmark = PROCESSES  # multi-process: one such test at a time (conftest)

POSITION = r"(?:in epoch \d+/\d+ after batch \d+/\d+|after epoch \d+/\d+)"  # the console's stop/resume lines


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    try:
        env = start_cluster(folder)
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm cluster: {e}")
    yield env
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
    stop_cluster(folder)


@pytest.fixture(scope="module")
def long_shards(tmp_path_factory) -> Path:
    """300 images: enough steps (2 ranks x batch 4) to signal a run in the middle."""
    from dtl.shard_writer import write_imagefolder as convert

    root = tmp_path_factory.mktemp("slurm_data")
    write_imagefolder(root / "img", per_class=100)
    convert(root / "img", root / "shards", val_fraction=0.1, test_fraction=0.1, seed=0, maxcount=16)
    return root / "shards"


def _job(env: dict, job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def _unique(name: str) -> str:
    """Job names unique per test run: a fresh cluster numbers jobs from 1 again, and the logs
    (slurm/logs/NAME-ID.out, appended across requeues) must not mix with an earlier run's."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def _sbatch(env: dict, *args: str) -> str:
    r = subprocess.run(["sbatch", "--parsable", *args], env=env, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


@pytest.mark.timeout(420)
def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(slurm, long_shards, tmp_path):
    cfg = tiny_config(tmp_path, long_shards, epochs=8, **{"data.batch_size": 4, "data.img_size": 40,
                                                          "checkpoint.keep": 2})
    cfg["wandb"] = {"enabled": True, "mode": "offline", "project": "dtl-slurm-test"}
    config = write_config(tmp_path / "job.yaml", cfg)
    env = {**slurm, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
           "DTL_ACCELERATE_CONFIG": "launch/cpu_2proc_gloo.yaml"}

    # the uninterrupted run: the command the Slurm node runs, started directly
    base = tmp_path / "uninterrupted"
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        "launch/cpu_2proc_gloo.yaml", "dtl/train.py", "--config", str(config),
                        f"output_dir={base}", "wandb.enabled=false"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    total = json.loads((base / "summary.json").read_text())["steps"]
    assert total == 8 * 30  # 240 training images / (2 ranks x 4) per step, 8 epochs

    name = _unique("dtl-preempt")
    job = _sbatch({**env, "DTL_RUNS": str(tmp_path)}, "--gpus-per-node=2", "--cpus-per-task=2", "--time=15",
                  f"--job-name={name}", "slurm/one_node.sbatch", str(config))
    run = tmp_path / f"{name}-{job}"
    log = REPO / "slurm" / "logs" / f"{name}-{job}.out"
    try:
        _wait(lambda: _last_step(run) >= 20, 120, "the job to train 20 steps")
        # what Slurm sends 120 s before the time limit: SIGUSR1 to the batch shell only
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
        _wait(lambda: _job(env, job).get("Restarts") == "1", 120, "the job to requeue itself")
        # Slurm holds a requeued job back for about two minutes (BeginTime); let it start now
        _wait(lambda: _job(env, job).get("JobState") == "PENDING", 60, "the requeued job to be pending")
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
        _wait(lambda: _job(env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 240,
              "the restarted job to finish")
        text = log.read_text()
        assert _job(env, job)["JobState"] == "COMPLETED", text[-3000:]
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)

    assert "batch shell got SIGUSR1" in text
    # where the signal lands: inside an epoch or in its validation / end-of-epoch checkpoint
    assert re.search(rf"stopped {POSITION}, step \d+: checkpoint written", text), text[-3000:]
    # the requeue itself: asked for, and the job ran again (`... requeued`, printed after scontrol
    # returns, can be lost when Slurm ends the process first)
    assert f"job {job}: checkpoint written, asking Slurm to requeue it" in text
    assert "restart 1 on" in text
    resumed_step = int(re.search(rf"resumed from \S+: {POSITION}, step (\d+)", text).group(1))
    assert 20 <= resumed_step < total  # it really stopped in the middle

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == total  # exactly the optimizer steps of the uninterrupted run
    ours, theirs = load_file(str(run / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k

    # one W&B run across both starts: same id in the run folder and both offline runs
    run_id = (run / "wandb_run_id").read_text().strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(run_id) for d in offline), offline
    steps_logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(steps_logged)  # the resumed job continues the metrics file
    log.unlink()


@pytest.mark.timeout(300)
def test_scancel_stops_with_a_checkpoint_and_is_not_requeued(slurm, long_shards, tmp_path):
    """SIGTERM from `scancel` checkpoints like a preemption, but the job stays cancelled."""
    cfg = tiny_config(tmp_path, long_shards, epochs=8, **{"data.batch_size": 4, "data.img_size": 40})
    config = write_config(tmp_path / "job.yaml", cfg)
    env = {**slurm, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "DTL_RUNS": str(tmp_path),
           "DTL_ACCELERATE_CONFIG": "launch/cpu_2proc_gloo.yaml"}
    name = _unique("dtl-cancel")
    job = _sbatch(env, "--gpus-per-node=2", "--cpus-per-task=2", "--time=15", f"--job-name={name}",
                  "slurm/one_node.sbatch", str(config))
    run, log = tmp_path / f"{name}-{job}", REPO / "slurm" / "logs" / f"{name}-{job}.out"
    try:
        _wait(lambda: _last_step(run) >= 10, 120, "the job to train 10 steps")
        subprocess.run(["scancel", job], env=env, check=True)
        _wait(lambda: _job(env, job).get("JobState") == "CANCELLED" and "not requeued" in log.read_text(), 60,
              "the job to end cancelled")
        time.sleep(3)  # a requeue would show up here as PENDING with Restarts=1
        info = _job(env, job)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)
    text = log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), text[-2000:]
    assert re.search(rf"stopped {POSITION}, step \d+: checkpoint written", text), text[-2000:]
    # slurmctld reports the cancelled job as COMPLETING while its processes wind down
    assert re.search(rf"job {job} got SIGTERM while (CANCELLED|COMPLETING): not requeued", text), text[-2000:]
    assert list((run / "checkpoints").glob("ckpt-*"))  # the same command would continue from here
    log.unlink()


@pytest.mark.timeout(300)
def test_sweep_array_trains_each_grid_point_in_its_own_run(slurm, shard_dir, tmp_path):
    cfg = tiny_config(tmp_path, shard_dir, epochs=1)
    config = write_config(tmp_path / "sweep.yaml", cfg)
    env = {**slurm, "OMP_NUM_THREADS": "1", "DTL_ACCELERATE_CONFIG": "launch/cpu.yaml", "DTL_RUNS": str(tmp_path),
           "DTL_SWEEP_LRS": "0.001 0.01", "DTL_SWEEP_DECAYS": "0.7 0.9"}
    name = _unique("dtl-sweep")
    job = _sbatch(env, "--array=0-3", "--gpus-per-node=1", "--cpus-per-task=1", "--time=10",
                  f"--job-name={name}", "slurm/sweep.sbatch", str(config), "finetune.join_warmup_epochs=0")
    runs = [tmp_path / f"{name}-{job}_{i}" for i in range(4)]
    logs = [REPO / "slurm" / "logs" / f"{name}-{job}_{i}.out" for i in range(4)]
    try:
        _wait(lambda: all(p.exists() and "step ended" in p.read_text() for p in logs), 240, "4 array tasks", poll=0.5)
        seen = set()
        for i, r in enumerate(runs):
            c = load_config(str(r / "config.yaml"), [])
            assert (c.optim.lr, c.finetune.decay) == ([0.001, 0.01][i // 2], [0.7, 0.9][i % 2])
            assert c.wandb.group == f"{name}-{job}"
            assert c.finetune.join_warmup_epochs == 0  # the user's override reached every task
            seen.add((c.optim.lr, c.finetune.decay))
            assert "step ended with exit code 0" in logs[i].read_text()
            assert json.loads((r / "summary.json").read_text())["steps"] > 0
        assert len(seen) == 4
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)
    for p in logs:
        p.unlink()
