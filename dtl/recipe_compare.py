"""`dtl compare`: feature extractor or fine-tuning? The tutorials' question, answered on your data.

Three arms on the config's split, backbone, resolution, augmentation and epoch budget, each a
real `dtl train` run in its own folder under `--out`:
  linear probe  : the head trained to convergence on cached features of the frozen backbone
  full, one lr  : everything trainable from the start at one learning rate (no probe, no decay)
  your plan     : the config as given
Printed as a table and written to OUT/compare.json (with wall times, machine and versions).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from dtl.user_errors import DtlError

REPO = Path(__file__).resolve().parent.parent
ARMS = {
    "linear probe": ["epochs=0", "finetune.probe.enabled=true", "finetune.probe.install=true"],
    "full, one lr": ["finetune.stages=[{epoch: 0, train: all}]", "finetune.decay=1.0",
                     "finetune.probe.enabled=false"],
    "your plan": [],
}
METRICS = ("test/acc", "test/macro_f1", "test/balanced_acc", "test_final/acc", "test_final/macro_f1",
           "best_epoch", "val/best_acc", "wall_time_s")


def versions() -> dict:
    """What a compared or benched number came from: Python, torch (and its CUDA), torchvision, timm
    and dtl's commit, `+dirty` when its code had uncommitted changes (results and prose do not
    count: rerunning a bench into a committed JSON is not dirty), `unknown` outside a git checkout."""
    import timm
    import torch
    import torchvision

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:  # no git installed
            return ""

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    code_changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!*.md")
    if sha != "unknown" and code_changed:
        sha += "+dirty"
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "dtl": sha}


class ArmError(DtlError):
    """An arm's `dtl train` refused its input (exit 2); the message is that run's own line."""


def arm_overrides(arm: str, seed: int, out: Path, extra: list[str], full_lr: Optional[float]) -> list[str]:
    """The overrides that make `config` this arm's run, after the user's `--set` ones."""
    lr = [f"optim.lr={full_lr}"] if arm == "full, one lr" and full_lr else []
    return [f"output_dir={out}", f"seed={seed}", "wandb.enabled=false", *extra, *ARMS[arm], *lr]


def _finished_row(out: Path, overrides: list[str], config: str) -> Optional[dict]:
    """The summary of an earlier compare's run of this arm with the same settings (`changed_settings`:
    W&B, workers and the like aside), when it finished; else None."""
    from dtl.run_config import changed_settings, load_config

    if not (out / "summary.json").is_file() or changed_settings(out, load_config(config, overrides)) != []:
        return None
    return json.loads((out / "summary.json").read_text())


def arm_dir(out_root: Path, arm: str, seed: int) -> Path:
    return out_root / f"{arm.replace(' ', '_').replace(',', '')}-seed{seed}"


def _refuse_other_finished(out: Path, overrides: list[str], config: str) -> None:
    """An arm folder holding a finished run of other settings (an earlier compare's, with another
    --set or config) is refused, naming the changes, before any arm trains."""
    from dtl.run_config import changed_settings, load_config

    if not (out / "summary.json").is_file():
        return
    changed = changed_settings(out, load_config(config, overrides))
    if changed:
        raise DtlError(f"{out} holds a finished run with other settings ({'; '.join(changed)}): nothing was "
                       f"run or removed; pass another --out")


def run_arm(config: str, arm: str, seed: int, out_root: Path, extra: list[str], full_lr: Optional[float]) -> dict:
    """One arm, one seed, as its own `dtl train` process; returns its summary row.

    An arm that an earlier `dtl compare` into the same `--out` finished with the same settings is
    read back, not trained again; an unfinished one (an interrupted compare's) is replaced.
    """
    out = arm_dir(out_root, arm, seed)
    overrides = arm_overrides(arm, seed, out, extra, full_lr)
    overrides.append("resume=never")  # the folder was just cleared: a checkpoint there would not be this arm's
    cmd = [sys.executable, "-m", "dtl.train", "--config", config, *overrides]
    s = _finished_row(out, overrides, config)
    if s is None:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        r = subprocess.run(cmd, cwd=os.getcwd(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        if r.returncode == 2:
            raise ArmError(f"{arm} (seed {seed}): {last.removeprefix('dtl: error: ')}")
        if r.returncode != 0:
            raise RuntimeError(f"{arm} (seed {seed}) failed with exit code {r.returncode}: {last}")
        s = json.loads((out / "summary.json").read_text())
        wall, how = round(time.time() - t0, 1), ""
        (out / "compare_wall_s.json").write_text(json.dumps(wall))  # the process's wall, for a rerun to quote
    else:
        measured = out / "compare_wall_s.json"
        wall = json.loads(measured.read_text()) if measured.is_file() else round(s.get("wall_time_s", 0.0), 1)
        how = ", finished earlier: read back"
    row = {"arm": arm, "seed": seed, "wall_s": wall, "command": " ".join(cmd[1:]), **{k: s.get(k) for k in METRICS}}
    print(f"  {arm}, seed {seed}: test acc {s['test/acc']:.4f}, macro-F1 {s['test/macro_f1']:.4f} "
          f"({row['wall_s']:.0f} s{how})", file=sys.stderr, flush=True)
    return row


def stats(rows: list[dict]) -> dict:
    out: dict = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        out[arm] = {}
        for key in ("test/acc", "test/macro_f1", "wall_s"):
            vals = [r[key] for r in mine]
            out[arm][key] = {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                             "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


def table(summary: dict) -> str:
    lines = [f"{'arm':<14} {'test acc (mean ± sd)':>22} {'macro-F1 (mean ± sd)':>22} {'wall s':>7}"]
    for arm, st in summary.items():
        a, f, w = st["test/acc"], st["test/macro_f1"], st["wall_s"]
        lines.append(f"{arm:<14} {a['mean']:>13.4f} ± {a['sd']:.4f} {f['mean']:>13.4f} ± {f['sd']:.4f} {w['mean']:>7.0f}")
    return "\n".join(lines)


def compare(config: str, seeds: list[int], out: str, arms: Optional[list[str]] = None,
            extra: Optional[list[str]] = None, full_lr: Optional[float] = None) -> dict:
    """Run the arms for every seed; write and return compare.json's content.

    Every arm's config is checked before the first one trains: a bad key or file stops the
    comparison at once, with one line (exit 2), not after an hour of the first arms.
    """
    from dtl.run_config import load_config

    unknown = sorted(set(arms or []) - set(ARMS))
    if unknown:
        raise DtlError(f"--only {unknown}: no such arm; the arms are {list(ARMS)}")
    if len(set(seeds)) != len(seeds):
        raise DtlError(f"--seeds {' '.join(map(str, seeds))}: each seed once (a repeated seed repeats the same "
                       f"run and shrinks the spread)")
    out_root = Path(out)
    if out_root.exists() and not out_root.is_dir():
        raise DtlError(f"--out {out_root} is a file; compare writes a folder (an arm per seed and compare.json)")
    for arm in ARMS:
        if not arms or arm in arms:
            cfg = load_config(config, arm_overrides(arm, seeds[0], out_root / "check", extra or [], full_lr))
    _check_test_split(cfg.data)
    for seed in seeds:  # a finished arm of other settings is someone's results: never replaced
        for arm in ARMS:
            if not arms or arm in arms:
                folder = arm_dir(out_root, arm, seed)
                _refuse_other_finished(folder, arm_overrides(arm, seed, folder, extra or [], full_lr), config)
    out_root.mkdir(parents=True, exist_ok=True)
    rows = [run_arm(config, arm, seed, out_root, extra or [], full_lr)
            for seed in seeds for arm in ARMS if not arms or arm in arms]
    result = {"config": config, "seeds": seeds, "overrides": extra or [],
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
                          "gpu": _gpu()}, "versions": versions(), "rows": rows, "summary": stats(rows)}
    (out_root / "compare.json").write_text(json.dumps(result, indent=1))
    return result


def _check_test_split(data) -> None:
    """The arms are ranked on the test split: refuse data without one before any arm trains (data
    without a dataset.json yet, e.g. one `data.prepare` will write, is left to the first arm)."""
    from dtl.dataset_index import DataError, has_split, read_index

    if data.test_split is None:
        raise DtlError("dtl compare ranks the arms on the test split: data.test_split is null")
    index = read_index(data.root)
    if index is not None and not has_split(data.test_split, index, data.shards):
        raise DataError(f"dtl compare ranks the arms on the test split: {data.root} has no split "
                        f"{data.test_split!r} (data.test_split)")


def _gpu() -> Optional[str]:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
