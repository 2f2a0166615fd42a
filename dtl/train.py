"""Fine-tune an ImageNet backbone on WebDataset shards.

    accelerate launch dtl/train.py --config configs/quickstart.yaml [key=value ...]
    python -m dtl.train --config configs/quickstart.yaml [key=value ...]

The story: read the config; set up accelerate; make sure the shards exist; build the model and
cut it into layer groups; build the fine-tune plan, optimizer and schedule; resume if asked;
then for each epoch apply the plan's stage (re-wrapping DDP when the trainable set changes),
train, validate and checkpoint; finally test and export the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script: dtl/ is on sys.path, the repo root is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, set_seed
from tqdm.auto import tqdm

from dtl import checkpoints as ckpt
from dtl.backbones import BackboneError, create_classifier, preprocessing
from dtl.classification_metrics import confusion_update, format_confusion, summarize
from dtl.data_pipeline import Data, build_data, class_weights, prepare_shards, resolve_classes
from dtl.finetune_plan import FinetunePlan, Stage, count_trainable, freeze_batchnorm, set_trainable
from dtl.layer_groups import GroupingError, LayerGroup, layer_groups
from dtl.optimization import build_optimizer, build_scheduler, group_lrs
from dtl.preemption import PreemptionHandler
from dtl.run_config import Config, ConfigError, config_changes, dump_config, load_config
from dtl.run_log import MetricsFile, StepRows, wandb_settings
from dtl.shard_stream import DataError, ShardStream, read_index


def apply_stage(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                groups: list[LayerGroup], plan: FinetunePlan, before: Stage, stage: Stage,
                rewrap: bool = True) -> tuple[torch.nn.Module, int]:
    """Make exactly the stage's groups trainable; under DDP build a fresh wrapper around them.

    DDP registers the parameters that require grad when it is built; flipping requires_grad on a
    wrapped model leaves the new ones out of the all-reduce and the ranks drift apart silently.
    Under FSDP every parameter requires grad from the start (see `train`): a joining
    group gets a fresh optimizer state here, as a group that had no gradients would under DDP.
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        params = dict(model.named_parameters())
        for g, was, now in zip(groups, plan.trainable(before), plan.trainable(stage)):
            if now and not was:
                for name in g.params:
                    optimizer.state.pop(params[name], None)
        return model, count_trainable(model, groups, plan.trainable(stage))
    wrapped = accelerator.unwrap_model(model) is not model
    bare = accelerator.unwrap_model(model, keep_fp32_wrapper=False) if wrapped and rewrap else \
        accelerator.unwrap_model(model)
    n_trainable = set_trainable(bare, groups, plan.trainable(stage))
    if wrapped and rewrap:
        # accelerate books the bare module; drop it so save_state does not save it twice
        accelerator._models[:] = [m for m in accelerator._models if m is not bare]
        model = accelerator.prepare_model(bare)
    return model, n_trainable


def evaluate(accelerator: Accelerator, model: torch.nn.Module, data: Data, stream: ShardStream,
             num_classes: int, desc: str, input_size: list[int]) -> tuple[dict, torch.Tensor]:
    """Every sample of the split exactly once across ranks; metrics from the summed confusion matrix.

    Under DDP each rank runs the bare model on its own share (ranks may hold one batch more or
    less). Under FSDP every forward gathers parameters from all ranks, so all ranks step together
    and a rank that has run out of data joins with a dummy batch whose output is ignored.
    """
    sharded = accelerator.distributed_type == DistributedType.FSDP
    net = model if sharded else accelerator.unwrap_model(model)
    net.eval()
    dev = accelerator.device
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=dev)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    batches = iter(tqdm(data.loader(stream), desc=desc, leave=False, disable=_no_bars(accelerator)))
    with torch.no_grad():
        while True:
            batch = next(batches, None)
            if sharded and not accelerator.reduce(torch.tensor(int(batch is not None), device=dev), "max"):
                break
            if batch is None:
                if not sharded:
                    break
                with accelerator.autocast():
                    net(torch.zeros(1, *input_size, device=dev))
                continue
            x, y = batch["image"].to(dev), batch["label"].to(dev)
            with accelerator.autocast():
                logits = net(x)
            loss_sum += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()
            confusion_update(cm, logits.argmax(1), y)
    cm = accelerator.reduce(cm, "sum")
    loss_sum = accelerator.reduce(loss_sum, "sum")
    metrics = summarize(cm.cpu())
    metrics["loss"] = float(loss_sum) / max(1, int(cm.sum()))
    metrics["samples"] = int(cm.sum())
    return metrics, cm.cpu()


def train(cfg: Config, on_epoch_end: Optional[Callable[[Accelerator, torch.nn.Module, ckpt.TrainState], None]] = None) -> dict:
    """Run the whole job; `on_epoch_end(accelerator, model, state)` is called on every rank after validation."""
    out = Path(cfg.output_dir)
    wants_wandb = cfg.wandb.enabled and os.environ.get("WANDB_MODE", cfg.wandb.mode) != "disabled"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Without cpu=True accelerate treats torchrun/accelerate-launch processes on a machine with no
    # GPU as independent single-process runs (each one "main", each writing everything): a gloo
    # group (MULTI_CPU) is what they need.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with="wandb" if wants_wandb else None,
                              gradient_accumulation_steps=cfg.optim.grad_accum_steps, project_dir=str(out),
                              cpu=world > 1 and not torch.cuda.is_available(), fsdp_plugin=_fsdp_plugin(cfg))
    if accelerator.num_processes != world:
        raise RuntimeError(f"launched as {world} processes but accelerate formed a group of "
                           f"{accelerator.num_processes}: the processes are not connected")
    main = accelerator.is_main_process
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    if main:
        ckpt.recover_partial(out / "checkpoints")  # a run killed mid-write leaves only complete checkpoints
    accelerator.wait_for_everyone()
    resume_from = _resume_path(cfg, out)  # before anything is written: resume=never must not overwrite a run
    if resume_from is not None and (out / "config.yaml").is_file():
        changed = config_changes(yaml.safe_load((out / "config.yaml").read_text()) or {}, cfg.model_dump(mode="json"))
        if changed:
            accelerator.print(f"dtl: resuming {out} with a changed config: " + "; ".join(changed))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
    accelerator.wait_for_everyone()

    # -- data and model --------------------------------------------------------------------
    with accelerator.main_process_first():
        prepare_shards(cfg.data, cfg.seed)
    model = create_classifier(cfg.model.backbone, len(resolve_classes(cfg.data, read_index(cfg.data.root))),
                              cfg.model.pretrained,
                              cfg.model.drop_rate, cfg.model.drop_path_rate)
    pre = preprocessing(model, cfg.data.img_size, cfg.data.crop_pct)
    data = build_data(cfg, pre, accelerator.process_index, accelerator.num_processes,
                      error_log=str(out / f"bad_samples.rank{accelerator.process_index}.jsonl"))
    classes = data.classes
    groups = layer_groups(model, cfg.finetune.groups, cfg.finetune.group_regex)
    plan = FinetunePlan(cfg.finetune, groups, cfg.optim.lr)
    accum = cfg.optim.grad_accum_steps
    batches = data.train_batches()
    if cfg.max_steps_per_epoch:
        batches = min(batches, cfg.max_steps_per_epoch * accum)
    steps_per_epoch = batches // accum
    if steps_per_epoch == 0:
        raise DataError(f"split {cfg.data.train_split!r}: {data.train.samples_per_slot()} samples per "
                        f"rank x worker, fewer than batch_size x grad_accum_steps = {cfg.data.batch_size * accum}")
    batches = steps_per_epoch * accum  # equal on every rank, whole accumulation cycles only

    # -- resume? -----------------------------------------------------------------------------
    identity = {"backbone": cfg.model.backbone, "classes": classes, "groups": [g.name for g in groups]}
    state = ckpt.TrainState(identity=identity, wandb_run_id=uuid.uuid4().hex[:12])
    if resume_from is not None:
        saved = ckpt.read_train_state(resume_from)
        ckpt.check_identity(saved.identity, identity, str(resume_from))
        state = saved

    # -- optimizer, schedule, accelerate ---------------------------------------------------
    stage = plan.stage_at(state.epoch)
    # Before DDP is built. Under FSDP everything requires grad: FSDP2 with mixed precision gathers
    # each parameter into a low-precision copy whose requires_grad is fixed at its first use, so a
    # group unfrozen later would silently get no gradient (seen on an H100). A frozen group is one
    # whose lr is 0 there (optimization.lr_factor): AdamW leaves it as loaded, at the price of its backward.
    sharded = accelerator.distributed_type == DistributedType.FSDP
    set_trainable(model, groups, [True] * len(groups) if sharded else plan.trainable(stage))
    n_trainable = count_trainable(model, groups, plan.trainable(stage))
    state.stage = stage.index
    optimizer = build_optimizer(model, plan, cfg.optim)
    scheduler = build_scheduler(optimizer, plan, cfg.optim, cfg.finetune.join_warmup_epochs,
                                steps_per_epoch, cfg.epochs)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        scheduler.load_state_dict(state.scheduler)
        accelerator.print(f"resumed from {resume_from}: epoch {state.epoch}, batch {state.batch_in_epoch}, "
                          f"step {state.step}")
    weights = class_weights(data.train, len(classes), cfg.data.class_weight_power).to(accelerator.device) if cfg.data.class_weights else None
    criterion = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.optim.label_smoothing)

    # -- trackers ------------------------------------------------------------------------------
    metrics_file = MetricsFile(out / "metrics.jsonl", enabled=main)
    init_kwargs = wandb_settings(cfg, out, state.wandb_run_id)
    if init_kwargs:
        accelerator.init_trackers(cfg.wandb.project, config=cfg.model_dump(mode="json"), init_kwargs=init_kwargs)
    if main:
        (out / "wandb_run_id").write_text(state.wandb_run_id or "")
    accelerator.print(f"dtl: {cfg.model.backbone} ({sum(p.numel() for p in model.parameters()):,} params), "
                      f"{len(classes)} classes, {accelerator.num_processes} process(es) on {accelerator.device} "
                      f"({accelerator.distributed_type.value}), "
                      f"mixed precision {accelerator.mixed_precision}")
    accelerator.print(f"data: {data.train.source.total} train samples, {steps_per_epoch} steps/epoch of "
                      f"{cfg.data.batch_size} x {accelerator.num_processes} x {accum}; input {pre['input_size'][1:]}")
    accelerator.print(plan.describe())

    tracker_rows = StepRows(accelerator, enabled=bool(init_kwargs))

    def log(record: dict) -> None:
        metrics_file.write({"step": state.step, "epoch": state.epoch, **record})
        tracker_rows.log(record, state.step)

    def save() -> None:
        state.scheduler = scheduler.state_dict()
        ckpt.save_checkpoint(accelerator, out / "checkpoints", state, cfg.checkpoint.keep)

    preempt = PreemptionHandler(accelerator)
    t_start = time.time()
    images_seen = 0

    # -- epochs --------------------------------------------------------------------------------
    for epoch in range(state.epoch, cfg.epochs):
        state.epoch = epoch
        stage = plan.stage_at(epoch)
        if stage.index != state.stage:
            model, n_trainable = apply_stage(accelerator, model, optimizer, groups, plan,
                                             plan.stages[state.stage], stage, cfg.finetune.ddp_rewrap)
            accelerator.print(f"epoch {epoch + 1}: stage {stage.index} - training {len(groups) - stage.first_group}"
                              f"/{len(groups)} groups, {n_trainable:,} parameters")
            state.stage = stage.index
        trainable = plan.trainable(stage)
        model.train()
        if cfg.finetune.bn_frozen:
            freeze_batchnorm(accelerator.unwrap_model(model), groups, trainable)
        data.train.set_epoch(epoch, skip_batches=state.batch_in_epoch, batch_size=data.batch_size)
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        correct = torch.zeros((), dtype=torch.long, device=accelerator.device)
        seen = 0
        t_epoch = time.time()
        bar = tqdm(total=batches, initial=state.batch_in_epoch, desc=f"epoch {epoch}", leave=False,
                   disable=_no_bars(accelerator))
        stopped = False
        for batch in data.loader(data.train):
            if state.batch_in_epoch >= batches:
                break
            x, y = batch["image"].to(accelerator.device), batch["label"].to(accelerator.device)
            with accelerator.accumulate(model):
                logits = model(x)
                loss = criterion(logits.float(), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.clip_grad_norm:
                    accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                cfg.optim.clip_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            state.batch_in_epoch += 1
            bar.update(1)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            if state.step % cfg.log_every_steps == 0:
                log({"train/loss_step": loss.item(), **group_lrs(optimizer)})
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
                save()
            if preempt.should_stop() or state.step == cfg.stop_after_steps:
                stopped = True
                break
        bar.close()
        images_seen += seen * accelerator.num_processes
        if stopped:
            return _stop(accelerator, save, preempt, state, tracker_rows)

        train_loss = float(accelerator.reduce(loss_sum, "sum")) / max(1, seen * accelerator.num_processes)
        train_acc = float(accelerator.reduce(correct, "sum")) / max(1, seen * accelerator.num_processes)
        record = {"train/loss": train_loss, "train/acc": train_acc, "stage": stage.index,
                  "trainable_params": n_trainable, "epoch_time_s": time.time() - t_epoch,
                  "train/img_per_s": seen * accelerator.num_processes / max(1e-9, time.time() - t_epoch),
                  **group_lrs(optimizer)}
        line = f"epoch {epoch + 1}/{cfg.epochs} stage {stage.index} | train loss {train_loss:.4f} acc {train_acc:.3f}"
        if data.val is not None:
            val, _ = evaluate(accelerator, model, data, data.val, len(classes), "val", pre["input_size"])
            record.update({f"val/{k}": v for k, v in val.items()})
            line += f" | val loss {val['loss']:.4f} acc {val['acc']:.3f} f1 {val['macro_f1']:.3f}"
            if val["acc"] > state.best_metric:  # the same on every rank: val metrics are reduced
                state.best_metric, state.best_epoch = val["acc"], epoch
                _export(accelerator, model, out / "best.safetensors", _export_meta(cfg, classes, pre, state))
        accelerator.print(line + f" | {record['train/img_per_s']:.1f} img/s | {record['epoch_time_s']:.0f}s")
        log(record)
        if on_epoch_end is not None:
            on_epoch_end(accelerator, model, state)
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        if (epoch + 1) % cfg.checkpoint.every_epochs == 0 or epoch + 1 == cfg.epochs:
            save()
        if preempt.should_stop():
            return _stop(accelerator, save, preempt, state, tracker_rows)

    # -- test and export ---------------------------------------------------------------------
    summary: dict = {"epochs": cfg.epochs, "steps": state.step, "best_epoch": state.best_epoch,
                     "val/best_acc": state.best_metric, "wall_time_s": time.time() - t_start,
                     "train/images": images_seen}
    if data.val is not None:
        val, _ = evaluate(accelerator, model, data, data.val, len(classes), "val", pre["input_size"])
        summary.update({f"val/{k}": v for k, v in val.items()})
    if data.test is not None:
        test, cm = evaluate(accelerator, model, data, data.test, len(classes), "test", pre["input_size"])
        summary.update({f"test/{k}": v for k, v in test.items()})
        summary["test/confusion"] = cm.tolist()
        accelerator.print(f"test: acc {test['acc']:.4f}  macro-F1 {test['macro_f1']:.4f}  "
                          f"balanced acc {test['balanced_acc']:.4f}  ({test['samples']} samples)")
        accelerator.print(format_confusion(cm, classes))
    _export(accelerator, model, out / "model.safetensors", _export_meta(cfg, classes, pre, state))
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    tracker_rows.flush()
    if init_kwargs and main:
        run = accelerator.get_tracker("wandb", unwrap=True)
        run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    accelerator.end_training()
    return summary


def _fsdp_plugin(cfg: Config) -> Optional[FullyShardedDataParallelPlugin]:
    """Under `accelerate launch` with FSDP (launch/fsdp_vit.yaml): its settings, but gradients
    reduced in fp32 as under DDP + autocast (accelerate's default reduces them in bf16, which
    torch refuses to store on fp32 parameters on one GPU and which loses precision on many)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    precision = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision not in ("bf16", "fp16"):
        return None
    low = torch.bfloat16 if precision == "bf16" else torch.float16
    return FullyShardedDataParallelPlugin(mixed_precision_policy={
        "param_dtype": low, "reduce_dtype": torch.float32, "output_dtype": low})


def _export(accelerator: Accelerator, model: torch.nn.Module, path: Path, meta: dict) -> None:
    """Full weights as safetensors; every rank calls it (under FSDP the shards are gathered)."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        ckpt.export_model(state_dict, path, meta)


def _no_bars(accelerator: Accelerator) -> bool:
    """Progress bars on the local main process of an interactive terminal only, not in job logs."""
    return not (accelerator.is_local_main_process and sys.stderr.isatty())


def _stop(accelerator: Accelerator, save, preempt: PreemptionHandler, state: ckpt.TrainState,
          tracker_rows: StepRows) -> dict:
    """Checkpoint where we are and leave; under Slurm a preempted job is requeued."""
    tracker_rows.flush()
    save()
    accelerator.print(f"stopped at epoch {state.epoch}, batch {state.batch_in_epoch}, step {state.step}: "
                      f"checkpoint written; the same command continues from it")
    accelerator.end_training()
    if preempt.received is not None:
        preempt.requeue()
    return {"stopped": True, "steps": state.step, "epoch": state.epoch}


def _resume_path(cfg: Config, out: Path) -> Optional[Path]:
    if cfg.resume == "never":
        found = ckpt.latest_checkpoint(out / "checkpoints")
        if found is not None:
            raise ckpt.CheckpointError(f"resume=never, but {found} holds an earlier run's checkpoint: continue it "
                                       f"with resume=auto, or choose another output_dir (nothing was overwritten)")
        return None
    if cfg.resume == "auto":
        return ckpt.latest_checkpoint(out / "checkpoints")
    path = Path(cfg.resume)
    if not path.is_dir():
        raise ckpt.CheckpointError(f"resume={cfg.resume}: no such checkpoint folder")
    return path


def _export_meta(cfg: Config, classes: list[str], pre: dict, state: ckpt.TrainState) -> dict:
    return {"backbone": cfg.model.backbone, "classes": classes, "preprocessing": pre,
            "epoch": state.epoch, "step": state.step, "format": "dtl-classifier/1"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dtl-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML run config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 data.batch_size=64")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except (ConfigError, DataError, BackboneError, GroupingError, ckpt.CheckpointError) as e:
        print(f"dtl: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
