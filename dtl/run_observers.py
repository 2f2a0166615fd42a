"""The observers every run has: metrics.jsonl, the console, and accelerate's trackers (W&B, TensorBoard).

Each one is attached to the event seam (`run_events`); none is called from the loop.
"""
from __future__ import annotations

import json
import os
import time
from itertools import groupby
from pathlib import Path
from typing import Any, Optional

from dtl.classification_metrics import format_confusion
from dtl.run_config import Config, ConfigError
from dtl.run_events import Observer
from dtl.user_errors import first_line


def numeric(record: dict[str, Any]) -> dict[str, Any]:
    """The scalar items of a record (what metrics files and W&B rows hold)."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def recorded_before(record: dict, state) -> bool:
    """Whether a metrics record belongs to the state a run resumes from: written at an earlier
    step, or at its step for an epoch it had reached (the next epoch's record at that step is redone)."""
    step = record.get("step", 0)
    return step < state.step or (step == state.step and record.get("epoch", 0) <= state.epoch)


class MetricsFile(Observer):
    """One JSON object per logged step, per epoch and at the end, appended to `metrics.jsonl`,
    so a resumed run continues the file. `epoch` counts the epochs finished when the record was
    written: 0 during the first epoch and for the probe, 1 for the first epoch's record (the console's
    numbering), the run's epochs in the final record."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def run_start(self, run) -> None:
        """One record per logged step. A run resumed from a checkpoint redoes what came after it:
        its records past the checkpoint (by step, and at the checkpoint's own step by epoch) are
        dropped, with a record cut short or garbled by a kill. A run that starts afresh in a folder
        holding another run's records moves them aside (metrics.TIME.jsonl), never deletes them."""
        if not self.path.is_file() or not self.path.stat().st_size:
            return
        if run.resumed_from is None:
            os.replace(self.path, self.path.with_name(f"metrics.{int(time.time())}.jsonl"))
            return
        data = self.path.read_bytes()
        state, keep = run.state, []
        for line in data.splitlines(keepends=True):
            try:
                rec = json.loads(line)
            except ValueError:  # a torn or garbled line (a kill mid-write, NUL bytes after a crash)
                continue
            if isinstance(rec, dict) and recorded_before(rec, state):
                keep.append(line if line.endswith(b"\n") else line + b"\n")
        if b"".join(keep) != data:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with open(tmp, "wb") as f:
                f.write(b"".join(keep))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def step_end(self, run, record: dict) -> None:
        self.write({"step": run.state.step, "epoch": run.state.epoch, **record})

    epoch_end = step_end
    probe_end = step_end

    def fit_end(self, run, result) -> None:
        if result.status == "finished":
            self.write({"step": run.state.step, "epoch": run.state.epoch, **numeric(result.summary)})


def run_position(run) -> str:
    """Where a checkpointed run stands, numbered as the epoch lines are (epoch 1 is the first).

    `state.epoch` counts finished epochs and `batch_in_epoch` the batches done of the next one;
    printing them raw read as "epoch 1" for a run stopped inside the console's "epoch 2/10".
    """
    state, epochs = run.state, run.cfg.epochs
    if state.batch_in_epoch:
        return f"in epoch {state.epoch + 1}/{epochs} after batch {state.batch_in_epoch}/{run.batches_per_epoch}"
    return f"after epoch {state.epoch}/{epochs}" if state.epoch else f"before epoch 1/{epochs}"


class Console(Observer):
    """What a person watching the job log reads: the setup, one line per epoch, the test result."""

    def run_start(self, run) -> None:
        cfg, acc, state = run.cfg, run.accelerator, run.state
        if run.resumed_from is not None:
            print(f"resumed from {run.resumed_from}: {run_position(run)}, step {state.step}")
        print(f"dtl: {cfg.model.backbone} ({sum(p.numel() for p in run.model.parameters()):,} params), "
              f"{len(run.classes)} classes, {acc.num_processes} process(es) on {acc.device} "
              f"({acc.distributed_type.value}), mixed precision {acc.mixed_precision}")
        print(f"data: {run.data.train.source.total} train samples, {run.steps_per_epoch} steps/epoch of "
              f"{cfg.data.batch_size} x {acc.num_processes} x {cfg.optim.grad_accum_steps}; "
              f"input {run.pre['input_size'][1:]}" + _ramp_line(run))
        print(run.plan.describe(run.cfg.epochs), flush=True)

    def stage_start(self, run, stage, n_trainable: int) -> None:
        n = len(run.plan.groups)
        print(f"epoch {run.state.epoch + 1}: stage {stage.index} - training {n - stage.first_group}/{n} groups, "
              f"{n_trainable:,} parameters", flush=True)

    def epoch_end(self, run, record: dict) -> None:
        line = (f"epoch {record['epoch']}/{run.cfg.epochs} stage {record['stage']} | "
                f"train loss {record['train/loss']:.4f} acc {record['train/acc']:.3f}")
        if "val/acc" in record:
            line += f" | val loss {record['val/loss']:.4f} acc {record['val/acc']:.3f} f1 {record['val/macro_f1']:.3f}"
        if "val_ema/acc" in record:
            line += f" | ema acc {record['val_ema/acc']:.3f} f1 {record['val_ema/macro_f1']:.3f}"
        size = f" at {record['train/img_size']} px" if "train/img_size" in record else ""
        print(line + f" | {record['train/img_per_s']:.1f} img/s{size} | {record['epoch_time_s']:.0f}s", flush=True)

    def eval_end(self, run, split: str, result) -> None:
        m = result.metrics
        line = f"acc {m['acc']:.4f}  macro-F1 {m['macro_f1']:.4f}  balanced acc {m['balanced_acc']:.4f}  " \
               f"({m['samples']} samples)"
        if split == "test_final":
            print(f"test (final weights, model.safetensors): {line}", flush=True)
        elif split == "test":
            best = run.state.best_epoch
            ema = " (EMA)" if run.state.best_source == "ema" else ""
            which = "" if best is None or (best == run.state.epoch - 1 and not ema) else \
                f"  [best.safetensors: {'the probe' if best < 0 else f'epoch {best + 1}'}{ema}, by {run.cfg.checkpoint.monitor}]"
            print(f"test: {line}{which}")
            print(format_confusion(result.confusion, run.classes), flush=True)

    def probe_end(self, run, record: dict) -> None:
        print(f"probe (LP-FT): head on cached features of {record['probe/train_rows']} rows, "
              f"{record['probe/epochs']} epochs (best {record['probe/best_epoch']}) | val loss "
              f"{record['val/loss']:.4f} acc {record['val/acc']:.3f} f1 {record['val/macro_f1']:.3f} | "
              f"features {record['probe/features_s']:.0f}s, head {record['probe/train_s']:.1f}s", flush=True)

    def fit_end(self, run, result) -> None:
        if result.status == "stopped":
            print(f"stopped {run_position(run)}, step {result.steps}: "
                  f"checkpoint written; the same command continues from it", flush=True)


def eval_epoch(run) -> int:
    """The epoch a validation belongs to, as the console counts: 0 for the probe's (before any
    step), else the epoch being finished (the last one for a run's final validation)."""
    return 0 if run.state.step == 0 else min(run.state.epoch + 1, run.cfg.epochs)


WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


def wandb_wanted(cfg: Config) -> bool:
    """W&B is on unless the config or WANDB_MODE=disabled turns it off (checked before any work)."""
    mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
    if cfg.wandb.enabled and mode not in WANDB_MODES:
        raise ConfigError(f"WANDB_MODE={mode!r}: W&B knows {', '.join(WANDB_MODES[:3])} (unset it, or "
                          f"set wandb.enabled=false)")
    return cfg.wandb.enabled and mode != "disabled"


def wandb_settings(cfg: Config, output_dir: Path, run_id: str) -> Optional[dict]:
    """init_kwargs for accelerate's wandb tracker, or None when W&B is off.

    Offline unless the user asked for online (config or WANDB_MODE): offline writes a real run
    under `output_dir/wandb` that `wandb sync` uploads later. The run id is kept in the
    checkpoint so a resumed or requeued job continues the same W&B run.
    """
    if not wandb_wanted(cfg):
        return None
    mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
    return {"wandb": {"dir": str(output_dir), "mode": mode, "id": run_id, "resume": "allow",
                      "name": cfg.wandb.name or output_dir.name, "entity": cfg.wandb.entity, "group": cfg.wandb.group,
                      "tags": cfg.wandb.tags}}


class StepRows:
    """Sends the trackers one row per optimizer step.

    A step's loss, its epoch's validation metrics and the run's final numbers all carry the same
    step. W&B keeps one history row per step and may already have written the row when a second
    log for that step arrives, and then drops it (seen here as a flaky missing `val/acc`), so
    records of one step are merged here and sent once the step moves on (or at `flush`).

    Each row goes to W&B committed (`commit=True`), written at once: uncommitted, a row waits in
    wandb's service for the next step or the run's finish, and a CI run under load still lost
    one epoch's row that way (a `val/acc` missing from the offline run file).
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.step: Optional[int] = None
        self.row: dict[str, Any] = {}

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.step is not None and step != self.step:
            self.flush()
        self.step = step
        self.row.update(record)

    def flush(self) -> None:
        if self.row:
            self.accelerator.log(self.row, step=self.step, log_kwargs={"wandb": {"commit": True}})
            self.row = {}


def flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys with scalar values: TensorBoard's hparams take nothing else."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, f"{key}."))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


class TrackerRows(Observer):
    """Starts accelerate's trackers (W&B, TensorBoard) and sends them every scalar: one row per
    logged step, the epoch records (with `epoch`), the probe's and the final summary."""

    def __init__(self, init_kwargs: dict):
        self.init_kwargs = init_kwargs
        self.rows: Optional[StepRows] = None

    def run_start(self, run) -> None:
        acc = run.accelerator
        try:
            acc.init_trackers(run.cfg.wandb.project, init_kwargs=self.init_kwargs)
        except Exception as e:  # no login or no network for wandb.mode=online: one line, not wandb's traceback
            if not type(e).__module__.startswith(("wandb", "pydantic")):
                raise
            mode = (self.init_kwargs.get("wandb") or {}).get("mode")
            raise ConfigError(f"W&B did not start (mode {mode}): {first_line(e).rstrip('.')}; or run with "
                              f"wandb.mode=offline and `wandb sync` later") from None
        config = run.cfg.model_dump(mode="json")
        for tracker in acc.trackers:  # hparams must be flat scalars for TensorBoard, W&B keeps the nesting
            tracker.store_init_configuration(flat_config(config) if tracker.name == "tensorboard" else config)
        self.rows = StepRows(acc)

    def step_end(self, run, record: dict) -> None:
        self.rows.log(numeric(record), run.state.step)

    def probe_end(self, run, record: dict) -> None:
        self.rows.log(numeric(record), run.state.step)  # `epoch` 0 (W&B's x axis for epoch charts)

    epoch_end = probe_end  # the epoch record carries its `epoch` (1-based)

    def fit_end(self, run, result) -> None:
        if result.status == "finished":
            self.rows.log(numeric(result.summary), run.state.step)
        self.rows.flush()


class TensorBoardFigures(Observer):
    """What TensorBoard shows beyond the scalars: the confusion matrix of every evaluation as a figure."""

    def eval_end(self, run, split: str, result) -> None:
        from dtl.run_report import confusion_figure

        if result.confusion is None:
            return
        writer = run.accelerator.get_tracker("tensorboard", unwrap=True)
        title = f"{split} (epoch {eval_epoch(run)})" if split.startswith("val") else split
        writer.add_figure(f"{split}/confusion", confusion_figure(result.confusion, run.classes, title),
                          global_step=run.state.step, close=True)
        writer.flush()


class WandbTracker(Observer):
    """The run in W&B beyond the scalars of `TrackerRows`: `epoch` declared as the step metric of
    per-epoch values, confusion matrices, per-class and prediction tables with images, PR/ROC
    curves and top losses of the test, model and dataset artifacts.

    A resumed or requeued run continues the same W&B run; what is logged once (the dataset
    artifact, the validation sample) is logged by a fresh run only, and models only at the end,
    so nothing is duplicated.
    """

    def __init__(self, rows: TrackerRows):
        self.tracker_rows = rows
        self.sample: list[str] = []

    @property
    def rows(self) -> StepRows:
        return self.tracker_rows.rows

    def _wb(self, run):
        return run.accelerator.get_tracker("wandb", unwrap=True)

    def run_start(self, run) -> None:
        from dtl import wandb_media

        (run.out / "wandb_run_id").write_text(run.state.wandb_run_id or "")
        # the sample table goes with the run's first validation (the probe's, or epoch 1's): a run
        # resumed from before it (stopped early in epoch 1) has yet to log it
        self.sample_logged = run.resumed_from is not None and (run.state.epoch > 0 or run.state.probe_done)
        wb = self._wb(run)
        wb.define_metric("epoch")
        for pattern in ("train/loss", "train/acc", "train/img_per_s", "train/first_batch_s", "val/*", "val_ema/*",
                        "epoch_time_s", "sys/*"):
            wb.define_metric(pattern, step_metric="epoch")
        if run.resumed_from is None:
            sources = {k: s.source for k, s in (("train", run.data.train), ("val", run.data.val),
                                                ("test", run.data.test)) if s is not None}
            name = wandb_media.safe_name(f"dataset-{Path(run.cfg.data.root).name}")
            art = wandb_media.dataset_artifact(run.cfg.data.root, sources, run.classes, name)
            # W&B refuses use_artifact offline: there the dataset is logged by the run (uploaded by
            # `wandb sync`); online the run uses it, so W&B shows data -> run -> model.
            wb.log_artifact(art) if wb.settings.mode == "offline" or wb.offline else wb.use_artifact(art)

    def eval_end(self, run, split: str, result) -> None:
        from dtl import wandb_media

        if split not in ("val", "test"):
            return
        items = wandb_media.eval_media(result, run.classes, split, curves=split == "test")
        if split == "val":
            if not self.sample and result.keys:
                self.sample = wandb_media.sample_keys(result.keys, run.cfg.seed)
                if not self.sample_logged:
                    labels = {k: int(y) for k, y in zip(result.keys, result.labels)}
                    items["val/sample"] = wandb_media.sample_table(self.sample, run.data.val.source.urls, labels,
                                                                   run.classes)
            items["val/predictions"] = wandb_media.predictions_table(result, self.sample, run.classes,
                                                                     eval_epoch(run))
        else:
            top = wandb_media.top_losses_table(result, run.classes, run.data.test.source.urls)
            if top is not None:
                items["test/top_losses"] = top
        self.rows.log(items, run.state.step)

    def fit_end(self, run, result) -> None:
        if result.status != "finished":
            return
        self._wb(run).summary.update(numeric(result.summary))
        self._log_models(run, result.summary)

    def _log_models(self, run, summary: dict) -> None:
        """best.safetensors (alias best) and model.safetensors (alias latest): two versions per run."""
        from dtl import wandb_media

        wb = self._wb(run)
        name = wandb_media.safe_name(f"model-{run.state.wandb_run_id}")
        meta = {"backbone": run.cfg.model.backbone, "classes": run.classes, "preprocessing": run.pre,
                "metrics": numeric(summary), "monitor": run.cfg.checkpoint.monitor,
                "config": run.cfg.model_dump(mode="json")}
        for file, alias in (("best.safetensors", "best"), ("model.safetensors", "latest")):
            if (run.out / file).is_file():
                wb.log_artifact(wandb_media.model_artifact(run.out / file, name, {**meta, "file": file}),
                                aliases=[alias])


def _ramp_line(run) -> str:
    """Progressive resizing: the training sizes epoch by epoch, sizes in a row collapsed."""
    if run.data.ramp is None:
        return ""
    parts, first = [], 1
    for size, same in groupby(run.data.train_size(e) for e in range(run.cfg.epochs)):
        last = first + len(list(same)) - 1
        parts.append(f"epochs {first}-{last}: {size}" if last != first else f"epoch {first}: {size}")
        first = last + 1
    return "; training sizes " + ", ".join(parts)
