"""The ends of a run: the best model so far, the final test and export, a stop, a run already done.

Every function here is called on every rank: exports gather weights under FSDP.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from dtl import checkpoints as ckpt
from dtl.backbones import head_name
from dtl.classifier_heads import head_spec
from dtl.evaluation import EvalResult, evaluate
from dtl.prior_correction import fold_into_bias, output_bias_key, tilt_power
from dtl.run_config import Config, ConfigError, changed_settings


@dataclass
class RunResult:
    """What `train()` returns: whether the run finished or stopped (a finished one is not rerun)."""
    status: str                    # "finished", "stopped" (checkpointed; the same command continues)
    steps: int
    epoch: int
    summary: dict = field(default_factory=dict)   # summary.json's content when finished

    @property
    def stopped(self) -> bool:
        return self.status == "stopped"


def split_tta(cfg, split: str) -> str:
    """Test-time augmentation of a split: the test always gets `eval.tta`, validation only with
    `eval.tta_val` (it runs every epoch, so 4x flips cost 4x there)."""
    return cfg.eval.tta if split != "val" or cfg.eval.tta_val else "none"


def evaluate_split(run, split: str) -> Optional[EvalResult]:
    """Evaluate the `val` or `test` split (None when the dataset has none) and announce the result."""
    stream = {"val": run.data.val, "test": run.data.test, "test_final": run.data.test}[split]
    if stream is None:
        return None
    cached = None
    tta = split_tta(run.cfg, split)
    if split == "val" and run.features is not None and tta == "none" and run.features.applies(run.state.epoch):
        cached = run.features.val_batches(), run.features.head()
    result = evaluate(run.accelerator, run.strategy, run.model, run.data, stream, len(run.classes), split,
                      run.pre["input_size"], tta=tta, cached=cached,
                      channels_last=run.cfg.model.channels_last, logit_offset=run.logit_offset)
    run.events.eval_end(run, split, result)
    return result


def model_build(cfg) -> dict:
    """What `create_classifier` needs beyond name, classes and weights; exports record it."""
    m = cfg.model
    h = m.head
    out: dict = {"head": head_spec(h.hidden, h.activation, h.dropout, h.binary)}  # None: the plain Linear head
    if ":" in m.backbone:
        out["factory"] = {"head_module": m.head_module, "kwargs": m.factory_kwargs}
    elif m.head_module:
        out["head_module"] = m.head_module
    if m.global_pool:
        out["global_pool"] = m.global_pool
    if m.aux_logits_weight:
        out["aux_logits"] = True
    return out


def export_meta(run) -> dict:
    return {"backbone": run.cfg.model.backbone, "classes": run.classes, "preprocessing": run.pre,
            "epoch": run.state.epoch, "step": run.state.step, "format": "dtl-classifier/1",
            **{k: v for k, v in model_build(run.cfg).items() if v},
            **({"label_field": run.cfg.data.label_field} if run.cfg.data.label_field != "cls" else {})}


def export(run, name: str, source: str = "model") -> None:
    """`output_dir/NAME` as safetensors with everything prediction needs; every rank calls it.
    `source="ema"` exports the moving average instead of the trained weights. The prior correction
    of balanced sampling or class weights is folded into the head's bias: the file predicts as
    evaluation did."""
    state_dict = run.ema.module.state_dict() if source == "ema" else run.strategy.full_state_dict(run.model)
    if run.accelerator.is_main_process:
        meta = export_meta(run)
        if run.logit_offset is not None:
            net = run.accelerator.unwrap_model(run.model)
            key = output_bias_key(net, head_name(net), len(run.classes))
            state_dict = fold_into_bias(state_dict, key, run.logit_offset.cpu())
            meta["prior_correction"] = {"bias": key, "offset": [round(float(v), 6) for v in run.logit_offset],
                                        "balanced_sampling": run.cfg.data.balanced_sampling,
                                        "tilt_power": tilt_power(run.cfg)}
        ckpt.export_model(state_dict, run.out / name, meta)


def evaluate_ema(run) -> Optional[EvalResult]:
    """Validation of the EMA weights (None without EMA or validation split)."""
    if run.ema is None or run.data.val is None:
        return None
    run.strategy.sync_batchnorm(run.ema.module)
    return evaluate(run.accelerator, run.strategy, run.ema.module, run.data, run.data.val, len(run.classes),
                    "val_ema", run.pre["input_size"], tta=split_tta(run.cfg, "val"), logit_offset=run.logit_offset)


def select_best(run, epoch: int, candidates: dict[str, Optional[EvalResult | dict]]) -> None:
    """Export the best weights when a candidate's monitored validation value beats the best so far
    (pending until the next checkpoint, `checkpoints.publish_best`).

    Candidates: the trained weights ("model") and the moving average ("ema") of an epoch, or the
    probe (epoch -1). Validation metrics are reduced, so every rank decides the same.
    """
    state, sign, key = run.state, run.monitor_sign, run.monitor_key
    scored = {src: (m.metrics if isinstance(m, EvalResult) else m) for src, m in candidates.items() if m is not None}
    if not scored:
        return
    source = max(scored, key=lambda src: sign * scored[src][key])
    value = scored[source][key]
    if state.best_metric is None or sign * value > sign * state.best_metric:
        state.best_metric, state.best_epoch, state.best_source, state.stale_epochs = value, epoch, source, 0
        export(run, ckpt.BEST_PENDING, source)  # best.safetensors once the next checkpoint records it
    else:
        state.stale_epochs += 1


def memory_record(device: torch.device) -> dict:
    """Peak RSS of the training process so far (not its loader workers) and, on a GPU, the epoch's
    peak allocated memory (rank 0's): what a user sizing batch and stage plan needs per stage."""
    record: dict = {}
    try:
        import resource  # not on Windows
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        record["sys/host_peak_rss_gb"] = peak / (2**30 if sys.platform == "darwin" else 2**20)  # bytes / KiB
    except ImportError:
        pass
    if device.type == "cuda":
        record["sys/gpu_peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def epoch_record(run, stats, val: Optional[EvalResult], val_ema: Optional[EvalResult] = None) -> dict:
    """What metrics.jsonl and W&B get for an epoch; `epoch` is the console's number (1-based, the probe 0),
    so summary.json's `best_epoch` names the record it came from."""
    record = {"epoch": run.state.epoch + 1, "train/loss": stats.loss, "train/acc": stats.acc, "stage": run.state.stage,
              "trainable_params": run.strategy.count_trainable(run.model, run.plan, run.stage),
              "epoch_time_s": stats.seconds, "train/img_per_s": stats.images / max(1e-9, stats.seconds),
              "train/first_batch_s": stats.first_batch_s, **stats.lrs}
    if run.data.ramp is not None:
        record["train/img_size"] = run.data.train_size(run.state.epoch)
    record.update(memory_record(run.accelerator.device))
    retries = sum(len(p.read_text().splitlines()) for p in run.out.glob("shard_retries.rank*.jsonl"))
    if retries:
        record["data/shard_retries"] = retries   # remote shards retried so far in this run (all ranks)
    if val is not None:
        record.update({f"val/{k}": v for k, v in val.metrics.items()})
    if val_ema is not None:
        record.update({f"val_ema/{k}": v for k, v in val_ema.metrics.items()})
    return record


def _test_best(run, final: Optional[EvalResult]) -> Optional[EvalResult]:
    """Test the selected weights (best.safetensors), when they are not the final ones."""
    state = run.state
    last = run.state.epoch - 1
    probe_only = state.best_epoch == -1 and not run.cfg.finetune.probe.install  # the model lacks the probe head
    if final is None or state.best_epoch is None or run.strategy.sharded or \
            (state.best_epoch == last and state.best_source == "model" and not probe_only):
        return final  # FSDP: the sharded model cannot take a full state dict here; final weights reported
    net = run.accelerator.unwrap_model(run.model)
    net.load_state_dict(ckpt.load_file(str(run.out / ckpt.BEST_FILE)))
    run.holds_exported = True  # its bias holds the prior correction already (or it needs none: the probe's)
    return evaluate_split(run, "test")


def finish(run, val: Optional[EvalResult]) -> RunResult:
    """Test, export, write summary.json; `val` is the last epoch's (evaluated again only if this
    process trained no epoch, e.g. resumed from the last epoch's checkpoint).

    `test/*` are the selected weights' (best.safetensors, by `checkpoint.monitor`);
    `test_final/*` the final weights' (model.safetensors) when they differ.
    """
    state = run.state
    if val is None:
        val = evaluate_split(run, "val")
    if run.accelerator.is_main_process:
        ckpt.publish_best(run.out)  # a probe-only run, or epochs after the last checkpoint (every_epochs > 1)
    run.accelerator.wait_for_everyone()
    selected_is_final = state.best_epoch in (None, state.epoch - 1) and state.best_source == "model"
    final = evaluate_split(run, "test" if selected_is_final else "test_final")
    export(run, "model.safetensors")
    test = _test_best(run, final)
    key = run.monitor_key
    summary: dict = {"epochs": run.cfg.epochs, "epochs_trained": state.epoch, "steps": state.step,
                     "best_epoch": state.best_epoch + 1 if state.best_epoch is not None else None,  # as printed
                     "monitor": run.cfg.checkpoint.monitor, f"val/best_{key}": state.best_metric,
                     "best_weights": "probe" if state.best_epoch == -1 else state.best_source,  # model, ema or probe
                     "wall_time_s": run.wall_time(), "train/images": state.images_seen}
    if val is not None:
        summary.update({f"val/{k}": v for k, v in val.metrics.items()})
    if test is not None:
        summary.update({f"test/{k}": v for k, v in test.metrics.items()})
        summary["test/confusion"] = test.confusion.tolist()
    if final is not None and final is not test:
        summary.update({f"test_final/{k}": v for k, v in final.metrics.items()})
        summary["test_final/confusion"] = final.confusion.tolist()
    if run.accelerator.is_main_process:
        ckpt.write_text_atomic(run.out / "summary.json", json.dumps(summary, indent=1))
    result = RunResult("finished", state.step, state.epoch, summary)
    run.events.fit_end(run, result)
    run.accelerator.end_training()
    return result


def stop(run) -> RunResult:
    """Checkpoint where we are and leave; under Slurm a preempted job is requeued."""
    run.save_checkpoint()
    result = RunResult("stopped", run.state.step, run.state.epoch)
    run.events.fit_end(run, result)
    run.accelerator.end_training()
    if run.preempt.received is not None:
        run.preempt.requeue()
    return result


class FinishedRunError(ConfigError):
    """`output_dir` holds a finished run: a rerun would only repeat or hide its results."""


def completed_run(cfg: Config) -> None:
    """Refuse a rerun of a finished run, naming the settings it would change; nothing is written.

    Finished means: summary.json is there and the latest checkpoint is at or past `epochs`, of
    the same backbone (another backbone goes on to be refused by the identity check), or, for a
    probe-only run (`epochs=0`, no checkpoint), that summary.json is one's too. A higher
    `epochs=` is not finished: the run trains on.
    """
    out = Path(cfg.output_dir)
    if cfg.resume == "never" or not (out / "summary.json").is_file():
        return
    try:
        summary = json.loads((out / "summary.json").read_text())
    except ValueError:
        return
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    if latest is None:  # a probe-only run (epochs=0) leaves no checkpoint; finished if this one is one too
        if cfg.epochs or summary.get("epochs") != 0 or summary.get("steps") != 0:
            return
        epochs, steps, stopped_early = 0, 0, False
    else:
        state = ckpt.read_train_state(latest)
        if (state.epoch < cfg.epochs and not state.stopped_early) or state.batch_in_epoch \
                or state.identity.get("backbone") != cfg.model.backbone or summary.get("steps") != state.step:
            return
        epochs, steps, stopped_early = state.epoch, state.step, state.stopped_early
    changed = [c for c in changed_settings(out, cfg) or [] if not c.startswith("epochs:")]
    test = f"test acc {summary['test/acc']:.4f}, " if summary.get("test/acc") is not None else ""
    early = ", stopped early" if stopped_early else ""
    what = f"{out} is a finished run ({epochs} epochs{early}, {test}{steps} steps)"
    if changed:
        raise FinishedRunError(f"{what} trained with other settings ({'; '.join(changed)}): nothing was run or "
                               f"changed; set another output_dir for a run with these settings")
    new_run = "set another output_dir for a new run"
    way_on = new_run.capitalize() if stopped_early else f"Raise epochs= to train on, or {new_run}"
    raise FinishedRunError(f"{what}: nothing was run or changed; its results are in {out / 'summary.json'}. "
                           f"{way_on}")
