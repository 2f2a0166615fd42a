"""Build a run from its config: accelerate, output directory, model, data, plan, optimizer, observers.

Order matters for the run directory's promises: nothing is written into `output_dir` until the
checkpoint to resume from (if any) is known to belong to this model, classes and grouping.
"""
from __future__ import annotations

import json
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.optim.lr_scheduler import LambdaLR

from dtl import checkpoints as ckpt
from dtl.backbones import create_classifier, head_name, preprocessing
from dtl.cpu_threads import configure_cpu_threads
from dtl.data_pipeline import (Data, build_data, check_training_sizes, class_weights, prepare_shards, run_classes,
                               training_sizes)
from dtl.dataset_index import DataError
from dtl.finetune_plan import FinetunePlan, Stage
from dtl.layer_groups import identity_names, layer_groups
from dtl.optimization import build_optimizer, build_scheduler, training_loss
from dtl.parallel_strategy import ParallelStrategy, create_accelerator, is_sharded
from dtl.worker_server import start_worker_server
from dtl.preemption import PreemptionHandler
from dtl.prior_correction import corrects_prior, output_bias_key, prior_offset
from dtl.feature_cache import FrozenFeatureCache, build_cache
from dtl.run_config import Config, ConfigError, config_changes, dump_config
from dtl.run_finish import model_build
from dtl.run_events import Events, Observer
from dtl.run_observers import (Console, MetricsFile, TensorBoardFigures, TrackerRows, WandbTracker, wandb_settings,
                               wandb_wanted)
from dtl.run_report import RunReport
from dtl.user_errors import DtlWarning


@dataclass
class Run:
    """Everything one training run holds; `train()` tells its story over it."""
    cfg: Config
    out: Path
    accelerator: Accelerator
    strategy: ParallelStrategy
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    criterion: nn.Module
    data: Data
    classes: list[str]
    plan: FinetunePlan
    pre: dict                      # the backbone's preprocessing (input size, mean/std, crop)
    state: ckpt.TrainState         # what a checkpoint saves: epoch, batch, step, stage, best, ...
    events: Events
    preempt: PreemptionHandler
    steps_per_epoch: int
    batches_per_epoch: int         # steps_per_epoch x grad_accum_steps, equal on every rank
    resumed_from: Optional[Path]
    started: float                 # time.time() when this process started the run
    wall_before: float             # wall time spent by earlier processes of the run (resumes)
    ema: Optional[ModelEmaV3] = None   # moving average of the weights (`ema.enabled`)
    mixup: Optional[Mixup] = None      # timm's mixup/cutmix of a batch (its loss takes soft targets)
    features: Optional[FrozenFeatureCache] = None   # cached backbone features for head-only stages
    prior_offset: Optional[torch.Tensor] = None     # undoes balanced sampling's / class weights' prior
    holds_exported: bool = False   # the model was loaded back from an export (its bias holds the offset)

    @property
    def monitor_key(self) -> str:
        """The metric key (in an `EvalResult`'s metrics) that `checkpoint.monitor` names."""
        return self.cfg.checkpoint.monitor.split("/", 1)[1]

    @property
    def monitor_sign(self) -> float:
        """+1 when larger is better, -1 when smaller is."""
        mode = self.cfg.checkpoint.mode
        return -1.0 if mode == "min" or (mode == "auto" and self.monitor_key == "loss") else 1.0

    @property
    def logit_offset(self) -> Optional[torch.Tensor]:
        """The offset evaluation adds to the model's logits and exports fold into its bias: the prior
        correction once a training step on resampled batches has changed the weights; before it (the
        probe, trained on the real frequencies; a probe-only run) the weights answer for the real prior,
        and so do weights loaded back from an export (`holds_exported`: folded into their bias)."""
        return self.prior_offset if self.state.step > 0 and not self.holds_exported else None

    def wants_probe(self) -> bool:
        """LP-FT's probe runs once, at the start of a fresh run (a resumed one has its head)."""
        return self.cfg.finetune.probe.enabled and not self.state.probe_done and self.state.step == 0

    def patience_spent(self) -> bool:
        patience = self.cfg.checkpoint.patience
        return bool(patience) and self.state.stale_epochs >= patience

    @property
    def stage(self) -> Stage:
        return self.plan.stages[self.state.stage]

    def enter_stage(self, epoch: int) -> None:
        """Apply the plan's stage for `epoch` if it differs from the model's (re-wraps DDP)."""
        stage = self.plan.stage_at(epoch)
        if stage.index == self.state.stage:
            return
        self.model, n_trainable = self.strategy.apply_stage(self.model, self.optimizer, self.plan, self.stage, stage)
        self.state.stage = stage.index
        self.events.stage_start(self, stage, n_trainable)

    def wall_time(self) -> float:
        return self.wall_before + time.time() - self.started

    def save_checkpoint(self) -> Path:
        self.state.scheduler = self.scheduler.state_dict()
        self.state.wall_time_s = self.wall_time()
        ema = self.ema.module.state_dict() if self.ema is not None else None
        saved = ckpt.save_checkpoint(self.accelerator, self.out / "checkpoints", self.state, self.cfg.checkpoint.keep,
                                     ema)
        if self.accelerator.is_main_process:
            ckpt.publish_best(self.out)  # the checkpoint now records the best it holds
        self.accelerator.wait_for_everyone()
        return saved


def build_run(cfg: Config, observers: Sequence[Observer] = ()) -> Run:
    """Everything `train()` needs, resumed from the latest checkpoint when there is one."""
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ConfigError(f"output_dir={cfg.output_dir} is a file, not a folder; set output_dir to a folder for the run")
    threads = configure_cpu_threads(cfg.data.num_workers)
    start_worker_server(cfg.data.worker_start, cfg.data.num_workers)
    out = Path(cfg.output_dir)
    accelerator = create_accelerator(cfg, str(out), log_with=_trackers(cfg, out))
    if cfg.model.compile and is_sharded(accelerator):  # before anything is written
        raise ConfigError("model.compile is not supported under FSDP yet (compile per block, as torchtitan does)")
    if threads:
        accelerator.print(threads)
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    # cuDNN picks the fastest convolution for each input shape once (timm's train.py does the same);
    # deterministic runs keep the fixed algorithms
    torch.backends.cudnn.benchmark = not cfg.deterministic
    resume_from, saved = _find_resume(accelerator, cfg, out)
    model, classes, plan, pre = _build_model(accelerator, cfg)
    state = _train_state(cfg, classes, plan, saved, resume_from)  # raises before anything is written
    if resume_from is not None:
        ckpt.check_resumable(resume_from, model, ema=cfg.ema.enabled)
    _check_prior_head(cfg, model, len(classes))
    data = build_data(cfg, pre, classes, accelerator.process_index, accelerator.num_processes,  # checks the splits
                      error_log=str(out / f"bad_samples.rank{accelerator.process_index}.jsonl"),
                      retry_log=str(out / f"shard_retries.rank{accelerator.process_index}.jsonl"))
    _write_config(accelerator, cfg, out, resume_from)
    _settle_best(accelerator, state, out, resume_from)
    report = getattr(model, "dtl_weights_report", None)  # the bare model: prepare() comes later
    if report is not None and accelerator.is_main_process:  # written with config.yaml: after every check
        (out / "weights_report.json").write_text(json.dumps(report, indent=1) + "\n")
    if cfg.data.augment_on == "device" and accelerator.device.type != "cuda" and accelerator.is_main_process:
        warnings.warn(f"data.augment_on=device on a {accelerator.device.type} run: the crops (and with "
                      f"decode_on=device the decoding) move from the loader workers into the training "
                      f"process, which only pays on a GPU", DtlWarning, stacklevel=2)
    steps_per_epoch = _steps_per_epoch(cfg, data)
    strategy = ParallelStrategy(accelerator, cfg.finetune.ddp_rewrap)
    state.stage = plan.stage_at(state.epoch).index
    optimizer = build_optimizer(model, plan, cfg.optim)
    scheduler = build_scheduler(optimizer, plan, cfg.optim, cfg.finetune.join_warmup_epochs, steps_per_epoch, cfg.epochs)
    model, optimizer = strategy.prepare(model, optimizer, plan.groups, plan.trainable(plan.stages[state.stage]))
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        scheduler.load_state_dict(state.scheduler)
    criterion, mixup = _loss(cfg, data, classes, accelerator)

    init_kwargs = wandb_settings(cfg, out, state.wandb_run_id)
    watchers: list[Observer] = [MetricsFile(out / "metrics.jsonl"), Console()]
    if cfg.report:
        watchers.append(RunReport())
    if init_kwargs or cfg.tensorboard:
        rows = TrackerRows(init_kwargs or {})
        watchers.append(rows)
        if init_kwargs:
            watchers.append(WandbTracker(rows))
        if cfg.tensorboard:
            watchers.append(TensorBoardFigures())
    events = Events([*watchers, *observers], accelerator.is_main_process)
    ema = _build_ema(cfg, accelerator, model, strategy, resume_from)
    if cfg.model.compile:  # after the EMA's copy: a copy of a compiled module would call the original
        _compile(cfg, accelerator.unwrap_model(model), len(plan.stages),
                 len(training_sizes(pre["input_size"][-1], cfg.data.progressive_resize, cfg.epochs)))
    run = Run(cfg, out, accelerator, strategy, model, optimizer, scheduler, criterion, data, classes, plan, pre,
              state, events, PreemptionHandler(accelerator), steps_per_epoch,
              steps_per_epoch * cfg.optim.grad_accum_steps, resume_from, time.time(), state.wall_time_s,
              ema, mixup)
    run.features = build_cache(run)
    run.prior_offset = _prior_offset(cfg, data, accelerator.device)
    return run


def _check_prior_head(cfg: Config, net: nn.Module, num_classes: int) -> None:
    """`eval.prior_correction` folds its offset into the head's output bias: refuse a head without
    one before anything is written."""
    if corrects_prior(cfg) and output_bias_key(net, head_name(net), num_classes) is None:
        raise ConfigError(f"eval.prior_correction: {cfg.model.backbone}'s head has no output Linear with a bias "
                          f"to fold the correction into; set eval.prior_correction=false")


def _prior_offset(cfg: Config, data: Data, device) -> Optional[torch.Tensor]:
    """`eval.prior_correction`'s offset on the device (None when training sees the real frequencies)."""
    offset = prior_offset(cfg, data.train.source.class_counts if data.train is not None else None)
    return None if offset is None else offset.to(device)


def _loss(cfg: Config, data: Data, classes: list[str], accelerator: Accelerator) -> tuple[nn.Module, Optional[Mixup]]:
    """Cross-entropy (class-weighted, label-smoothed, ordinal as configured), or timm's Mixup with a soft-target loss."""
    aug = cfg.data.augment
    if aug.mixup or aug.cutmix:
        mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mix_prob,
                      label_smoothing=cfg.optim.label_smoothing, num_classes=len(classes))
        return SoftTargetCrossEntropy(), mixup
    weights = (class_weights(data.train, len(classes), cfg.data.class_weight_power).to(accelerator.device)
               if cfg.data.class_weights else None)
    return training_loss(cfg, len(classes), weights).to(accelerator.device), None  # the ordinal loss has buffers


def _compile(cfg: Config, bare: nn.Module, stages: int, sizes: int = 1) -> None:
    """torch.compile the bare module in place (`nn.Module.compile`): the DDP wrapper rebuilt at every
    stage change wraps the same compiled module, parameter names stay as they are (no `_orig_mod.`),
    and Dynamo's guards on `requires_grad` and train/eval mode recompile exactly the graphs a stage
    change or an evaluation invalidates. Each stage adds graphs (training, a last short batch, and
    evaluation), so Dynamo's limit of 8 per frame is raised with the stage count: past it, a gradual
    unfreeze would silently run its last, most expensive stages uncompiled. With progressive
    resizing each training size gets its own static graph (`dynamic=False`: Dynamo would otherwise
    turn height and width symbolic at the second size, for the full-size epochs too)."""
    import torch._dynamo

    need = 8 + 4 * stages + 2 * (sizes - 1)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, need)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 8 * need)
    bare.compile(backend=cfg.model.compile_backend, mode=cfg.model.compile_mode,
                 **({"dynamic": False} if sizes > 1 else {}))


def _build_ema(cfg: Config, accelerator: Accelerator, model: nn.Module, strategy: ParallelStrategy,
               resume_from: Optional[Path]) -> Optional[ModelEmaV3]:
    """timm's ModelEmaV3 of the bare model; restored from the checkpoint's ema.safetensors on resume."""
    if not cfg.ema.enabled:
        return None
    if strategy.sharded:
        raise ConfigError("ema.enabled is not supported under FSDP yet")
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.ema.decay, use_warmup=True)
    if resume_from is not None:
        ema.module.load_state_dict(ckpt.load_file(str(resume_from / ckpt.EMA_FILE)))
    return ema


def _trackers(cfg: Config, out: Path) -> list:
    """accelerate's `log_with`: W&B unless off, TensorBoard (under output_dir/tensorboard) if asked."""
    trackers: list = ["wandb"] if wandb_wanted(cfg) else []
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError:
            raise ConfigError("tensorboard=true needs the tensorboard package: pip install 'dtl[tensorboard]'") from None
        from accelerate.tracking import TensorBoardTracker

        trackers.append(TensorBoardTracker("tensorboard", str(out)))
    return trackers


def _find_resume(accelerator: Accelerator, cfg: Config, out: Path) -> tuple[Optional[Path], Optional[ckpt.TrainState]]:
    """The checkpoint to continue from and its train state; resume=never refuses an earlier run."""
    if accelerator.is_main_process:
        ckpt.recover_partial(out / "checkpoints")  # a run killed mid-write leaves only complete checkpoints
    accelerator.wait_for_everyone()
    path = resume_path(cfg, out)
    return path, (ckpt.read_train_state(path) if path is not None else None)


def resume_path(cfg: Config, out: Path) -> Optional[Path]:
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


def _build_model(accelerator: Accelerator, cfg: Config) -> tuple[nn.Module, list[str], FinetunePlan, dict]:
    """Shards (prepared if asked), the class list (resolved once), the model and its plan."""
    with accelerator.main_process_first():
        prepare_shards(cfg.data, cfg.seed)
    classes = run_classes(cfg.data)
    model = create_classifier(cfg.model.backbone, len(classes), cfg.model.pretrained,
                              cfg.model.drop_rate, cfg.model.drop_path_rate, weights_map=cfg.model.weights_map, **model_build(cfg))
    report = getattr(model, "dtl_weights_report", None)
    if report is not None:
        accelerator.print(f"weights: {report['loaded']} tensors loaded from {report['source']}; not loaded: the new "
                          f"head ({len(report['not_loaded_head'])} tensors), {len(report['unused_in_file'])} file "
                          f"tensors nothing maps to {report['unused_in_file'][:6]}")
    pre = preprocessing(model, cfg.data.img_size, cfg.data.crop_pct)
    check_training_sizes(model, cfg.model.backbone, pre["input_size"][-1], cfg.data.progressive_resize, cfg.epochs,
                         cfg.model.head_module)
    if cfg.model.channels_last and not is_sharded(accelerator):
        model = model.to(memory_format=torch.channels_last)  # FSDP flattens parameters: left as they are
    groups = layer_groups(model, cfg.finetune.groups, cfg.finetune.group_regex)
    return model, classes, FinetunePlan(cfg.finetune, groups, cfg.optim.lr), pre


def _train_state(cfg: Config, classes: list[str], plan: FinetunePlan, saved: Optional[ckpt.TrainState],
                 resume_from: Optional[Path]) -> ckpt.TrainState:
    """The saved state when resuming (after checking it is this model's), else a fresh one."""
    identity = {"backbone": cfg.model.backbone, "classes": classes, "groups": identity_names(plan.groups)}
    if saved is None:
        return ckpt.TrainState(identity=identity, wandb_run_id=uuid.uuid4().hex[:12])
    ckpt.check_identity(saved.identity, identity, str(resume_from))
    return saved


def _write_config(accelerator: Accelerator, cfg: Config, out: Path, resume_from: Optional[Path]) -> None:
    """config.yaml of the run; a resumed run first says which keys changed."""
    if resume_from is not None and (out / "config.yaml").is_file():
        changed = config_changes(yaml.safe_load((out / "config.yaml").read_text()) or {}, cfg.model_dump(mode="json"))
        if changed:
            accelerator.print(f"dtl: resuming {out} with a changed config: " + "; ".join(changed))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_text_atomic(out / "config.yaml", dump_config(cfg))
    accelerator.wait_for_everyone()


def _settle_best(accelerator: Accelerator, state: ckpt.TrainState, out: Path, resume_from: Optional[Path]) -> None:
    """best.safetensors as the state resumed from knows it (`checkpoints.settle_best`). Every rank
    reads whether it is newer before the main process moves it, so all reset the selection alike."""
    stale = resume_from is not None and ckpt.best_newer_than(out, state.step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        aside = ckpt.settle_best(out, state.step if resume_from is not None else None)
        if aside is not None:
            accelerator.print(f"dtl: {out / ckpt.BEST_FILE} was selected after {resume_from.name}, the checkpoint "
                              f"resumed from: kept as {aside.name}; selection starts again from here")
    if stale:
        state.best_metric, state.best_epoch, state.best_source, state.stale_epochs = None, None, "model", 0
    accelerator.wait_for_everyone()


def _steps_per_epoch(cfg: Config, data: Data) -> int:
    accum = cfg.optim.grad_accum_steps
    batches = data.train_batches()
    if cfg.max_steps_per_epoch:
        batches = min(batches, cfg.max_steps_per_epoch * accum)
    if batches // accum == 0:
        raise DataError(f"split {cfg.data.train_split!r}: {data.train.samples_per_slot()} samples per "
                        f"rank x worker, fewer than batch_size x grad_accum_steps = {cfg.data.batch_size * accum}")
    return batches // accum
