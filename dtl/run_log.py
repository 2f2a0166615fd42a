"""Where metrics go: `metrics.jsonl` in the run directory and accelerate's trackers (W&B)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from dtl.run_config import Config


class MetricsFile:
    """One JSON object per logged step or epoch; appended, so a resumed run continues the file."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def wandb_settings(cfg: Config, output_dir: Path, run_id: str) -> Optional[dict]:
    """init_kwargs for accelerate's wandb tracker, or None when W&B is off.

    Offline unless the user asked for online (config or WANDB_MODE): offline writes a real run
    under `output_dir/wandb` that `wandb sync` uploads later. The run id is kept in the
    checkpoint so a resumed or requeued job continues the same W&B run.
    """
    mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
    if not cfg.wandb.enabled or mode == "disabled":
        return None
    return {"wandb": {"dir": str(output_dir), "mode": mode, "id": run_id, "resume": "allow",
                      "name": cfg.wandb.name or output_dir.name, "entity": cfg.wandb.entity, "group": cfg.wandb.group,
                      "tags": cfg.wandb.tags}}


class StepRows:
    """Sends the trackers one row per optimizer step.

    A step's loss, its epoch's validation metrics and the run's final numbers all carry the same
    step. W&B keeps one history row per step and may already have written the row when a second
    log for that step arrives, and then drops it (seen here as a flaky missing `val/acc`), so
    records of one step are merged here and sent once the step moves on (or at `flush`).
    """

    def __init__(self, accelerator, enabled: bool):
        self.accelerator, self.enabled = accelerator, enabled
        self.step: Optional[int] = None
        self.row: dict[str, Any] = {}

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        if self.step is not None and step != self.step:
            self.flush()
        self.step = step
        self.row.update(record)

    def flush(self) -> None:
        if self.row:
            self.accelerator.log(self.row, step=self.step)
            self.row = {}
