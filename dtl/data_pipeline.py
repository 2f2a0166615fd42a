"""From the data config to per-rank loaders: prepare shards if asked, resolve splits, transforms."""
from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from dtl.dataset_index import DataError, has_split, is_local, read_index, resolve_classes, split_source
from dtl.run_config import AugmentConfig, Config, ConfigError, DataConfig, ProgressiveResizeConfig
from dtl.shard_fetch import RetryPolicy, ShardCache
from dtl.shard_stream import (ShardStream, StreamOptions, balanced_repeats, batches_per_epoch, close_loader,
                              make_loader)
from dtl.user_errors import DtlWarning

DROP_WARN_FRACTION = 0.05


def prepare_shards(cfg: DataConfig, seed: int) -> None:
    """Write shards into `cfg.root` when asked to and not yet done (dataset.json marks done).

    Only into a missing or empty folder: a mistyped `data.root` that points at a folder of the
    user's own files must not receive ELPV shards (and train on solar cells) without a word.
    """
    if cfg.prepare == "none" or read_index(cfg.root) is not None:
        return
    root = Path(cfg.root)
    if not is_local(cfg.root):
        raise DataError(f"data.prepare={cfg.prepare} writes local folders; data.root={cfg.root} is a URL")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"data.root={cfg.root} is not empty and holds no dataset.json: data.prepare="
                        f"{cfg.prepare} writes only into a missing or empty folder (is data.root mistyped? "
                        f"for shards written elsewhere set data.prepare=none)")
    if cfg.prepare == "imagefolder" and not cfg.source:
        raise DataError("data.prepare=imagefolder needs data.source (the image folder)")
    from dtl import shard_writer

    kwargs = dict(val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=seed,
                  maxcount=cfg.shard_maxcount)
    # Written next to `root` and renamed into place: a prepare killed half-way leaves no half-set.
    partial = root.with_name(f".{root.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    if cfg.prepare == "elpv":
        shard_writer.write_elpv(partial, **kwargs)
    else:
        shard_writer.write_imagefolder(cfg.source, partial, **kwargs)
    os.replace(partial, root)


def build_transform(pre: dict, train: bool, aug: AugmentConfig, uint8: bool = False) -> Callable:
    """timm's transforms, configured with the backbone's preprocessing. `uint8` (training only, no
    random erasing): stop at a uint8 tensor, as for timm's prefetcher; `DeviceNormalize` finishes it."""
    from timm.data import create_transform

    kwargs = dict(input_size=tuple(pre["input_size"]), interpolation=pre["interpolation"],
                  mean=tuple(pre["mean"]), std=tuple(pre["std"]), crop_pct=pre.get("crop_pct"),
                  crop_mode=pre.get("crop_mode"))
    if not train:
        return create_transform(is_training=False, **kwargs)
    tf = create_transform(is_training=True, hflip=aug.hflip, vflip=aug.vflip, scale=tuple(aug.crop_scale),
                          ratio=tuple(aug.crop_ratio), color_jitter=aug.color_jitter,
                          auto_augment=aug.auto_augment, re_prob=aug.random_erasing, re_mode="pixel",
                          use_prefetcher=uint8 and not aug.random_erasing, **kwargs)
    if aug.rotate or aug.translate or aug.shear or aug.zoom:  # Keras' ImageDataGenerator geometry, first
        from torchvision import transforms

        affine = transforms.RandomAffine(degrees=aug.rotate, translate=(aug.translate,) * 2 if aug.translate else None,
                                         scale=(1 - aug.zoom, 1 + aug.zoom) if aug.zoom else None,
                                         shear=aug.shear or None, interpolation=transforms.InterpolationMode.BILINEAR)
        tf.transforms.insert(0, affine)
    if aug.rot90:  # before the crop: the crop's aspect ratio stays the sampled one
        tf.transforms.insert(0, RandomQuarterTurn(aug.rot90))
    return tf


class RandomQuarterTurn:
    """Turn a PIL image by 90 degrees with probability p (either way: the flips around it make
    the direction immaterial). A class, not a lambda: workers started by forkserver unpickle it."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        from PIL import Image

        return img.transpose(Image.Transpose.ROTATE_90) if torch.rand(1).item() < self.p else img

    def __repr__(self) -> str:
        return f"RandomQuarterTurn(p={self.p})"


class DeviceNormalize:
    """Normalise a uint8 image batch where it is (the GPU): (x - 255 mean) / (255 std), which is timm's
    ToTensor + Normalize up to float rounding. Workers then collate, pin and copy a quarter of the bytes."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor([255 * m for m in mean]).view(1, -1, 1, 1)
        self.std = torch.tensor([255 * s for s in std]).view(1, -1, 1, 1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self._on:
            self._on[x.device] = (self.mean.to(x.device), self.std.to(x.device))
        mean, std = self._on[x.device]
        return x.float().sub_(mean).div_(std)  # float() keeps the memory format


def train_size_at(epoch: int, final: int, ramp: Optional[ProgressiveResizeConfig]) -> int:
    """Training image size of `epoch` (0-based): `final` without a ramp; with one, start_size up to
    start_epoch, then linear to `final` at end_epoch, rounded to `ramp.multiple` as FFCV's
    ResolutionScheduler does (np.interp, then round to a multiple of 32), kept within the two ends."""
    if ramp is None:
        return final
    t = min(1.0, max(0.0, (epoch - ramp.start_epoch) / (ramp.end_epoch - ramp.start_epoch)))
    size = round((ramp.start_size + t * (final - ramp.start_size)) / ramp.multiple) * ramp.multiple
    return final if t >= 1 else min(final, max(ramp.start_size, size))


def training_sizes(final: int, ramp: Optional[ProgressiveResizeConfig], epochs: int) -> list[int]:
    """The distinct training sizes of a run, in the order its epochs use them."""
    return list(dict.fromkeys(train_size_at(e, final, ramp) for e in range(epochs)))


def check_ramp_bounds(ramp: Optional[ProgressiveResizeConfig], final: int) -> None:
    """A ramp grows toward the input size, never past it."""
    if ramp is not None and ramp.start_size > final:
        raise ConfigError(f"data.progressive_resize.start_size={ramp.start_size} is larger than the input "
                          f"size {final} (data.img_size) it grows to")


def _check_aux_sizes(model: torch.nn.Module, backbone: str, final: int, sizes: list[int]) -> None:
    """The auxiliary classifier (model.aux_logits_weight) runs in training only, on a feature map
    that must stay 5x5 after its pooling: at 224 px inception_v3's fails on the first batch."""
    import copy

    twin = copy.deepcopy(model).train()  # train mode moves BatchNorm statistics: never on the real model
    p = next(twin.parameters())
    with torch.no_grad():
        for size in sorted(set(sizes)):
            try:
                twin(torch.zeros(2, 3, size, size, dtype=p.dtype, device=p.device))
            except Exception as e:  # noqa: BLE001
                first = (str(e).strip().splitlines() or [""])[0][:160]
                key = "data.img_size" if size == final else "data.progressive_resize"
                raise ConfigError(f"{key}: {backbone}'s auxiliary classifier (model.aux_logits_weight) fails on a "
                                  f"{size}x{size} image ({type(e).__name__}: {first}); train at 299 px, or set "
                                  f"model.aux_logits_weight=0") from None


def check_training_sizes(model: torch.nn.Module, backbone: str, final: int,
                         ramp: Optional[ProgressiveResizeConfig], epochs: int,
                         head_module: Optional[str] = None) -> None:
    """Refuse an input size the model cannot take, before anything is written: one blank image per
    training size, in eval mode. A backbone with a fixed input size (the patch grid of timm's and
    torchvision's ViTs), or a `model.head_module` that is not the classifier (the new head then
    meets feature maps), would otherwise fail on the first batch, after the probe; an auxiliary
    classifier (inception_v3), which runs in training only, is then tried in train mode on a copy."""
    if ramp is not None:
        check_ramp_bounds(ramp, final)
    fixed_grid = getattr(model, "patch_embed", None) is not None or hasattr(model, "image_size")  # timm's, torchvision's ViTs
    aux = bool(getattr(model, "aux_logits", False)) and getattr(model, "AuxLogits", None) is not None  # inception_v3
    if ramp is None and not head_module and not fixed_grid and not aux:
        return  # any size goes through a CNN; the blank forward would only cost a large model's startup
    sizes = training_sizes(final, ramp, epochs) if ramp is not None else [final]
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for size in sorted(set(sizes), key=lambda s: s != final):  # the final size first
                try:
                    model(torch.zeros(1, 3, size, size, dtype=p.dtype, device=p.device))
                except Exception as e:  # noqa: BLE001 - any failure means this size cannot train
                    first = (str(e).strip().splitlines() or [""])[0][:160]
                    key = "data.img_size" if size == final else "data.progressive_resize"
                    if head_module:
                        raise ConfigError(f"model.head_module={head_module} (or {key}): {backbone} with its head "
                                          f"there fails on a {size}x{size} image ({type(e).__name__}: {first}); "
                                          f"name the module the classifier's input comes through") from None
                    raise ConfigError(f"{key}: {backbone} fails on a blank {size}x{size} image "
                                      f"({type(e).__name__}: {first}); every training size must be one the "
                                      f"backbone takes (ViTs: multiples of the patch size, or only the size "
                                      f"they were built for)") from None
    finally:
        model.train(was_training)
    if aux:  # after the network itself passed: then a failure is the auxiliary classifier's
        _check_aux_sizes(model, backbone, final, sizes)


@dataclass
class Data:
    classes: list[str]
    train: ShardStream
    val: Optional[ShardStream]
    test: Optional[ShardStream]
    batch_size: int
    eval_batch_size: int
    num_workers: int
    worker_start: str = "forkserver"
    normalize: Optional[DeviceNormalize] = None   # finishes training batches on the device (uint8, or encoded)
    final_size: int = 224                          # validation, test and the probe; training's last epochs
    ramp: Optional[ProgressiveResizeConfig] = None  # progressive resizing of the training images
    train_transform: Optional[Callable[[int], Callable]] = None  # size -> the training transform at that size
    _kept: dict = field(default_factory=dict, repr=False)  # (stream, batch size) -> (transform, persistent loader)

    def train_size(self, epoch: int) -> int:
        return train_size_at(epoch, self.final_size, self.ramp)

    def resize_train(self, epoch: int) -> int:
        """Give the training stream `epoch`'s image size (progressive resizing); returns it. A new
        transform gets a new loader (`loader`), whose workers carry it; a resumed epoch gets the same."""
        size = self.train_size(epoch)
        if self.train_transform is not None and size != self.train.opt.draft_size:
            self.train.transform = self.train_transform(size)
            self.train.opt.draft_size = size
        return size

    def loader(self, stream: ShardStream, batch_size: Optional[int] = None) -> torch.utils.data.DataLoader:
        """Every DataLoader of a run: this run's workers and their start method. The training and
        validation loaders keep their workers from one epoch to the next (timm's persistent
        workers): starting 12 workers costs about 0.3 s, a tenth of an ELPV epoch on a GPU. A new
        training transform (progressive resizing) gets new workers."""
        bs = batch_size or (self.batch_size if stream.opt.train else self.eval_batch_size)
        if not self.num_workers or (stream is not self.train and stream is not self.val):
            return make_loader(stream, bs, self.num_workers, self.worker_start)
        key = (id(stream), bs)
        held = self._kept.get(key)
        if held is None or held[0] is not stream.transform:
            if held is not None:
                close_loader(held[1])
            held = self._kept[key] = (stream.transform, make_loader(stream, bs, self.num_workers, self.worker_start,
                                                                     persistent=True))
        return held[1]

    def close(self) -> None:
        """End the kept loaders' workers (a run's end; they would otherwise wait for the process's)."""
        for _, loader in self._kept.values():
            close_loader(loader)
        self._kept.clear()

    def train_batches(self) -> int:
        return batches_per_epoch(self.train, self.batch_size)


def run_classes(d: DataConfig) -> list[str]:
    """The run's class list, resolved once and handed to both the model and `build_data`."""
    return resolve_classes(d.root, d.classes, read_index(d.root))


def build_data(cfg: Config, pre: dict, classes: list[str], rank: int, world_size: int,
               error_log: Optional[str], retry_log: Optional[str] = None) -> Data:
    d = cfg.data
    cache = ShardCache(d.cache_dir, int(d.cache_max_gb * 2**30)) if d.cache_dir else None
    retry = RetryPolicy(d.retries, d.retry_max_s, d.read_timeout_s, log=retry_log, cache=cache)
    index = read_index(d.root)
    size = pre["input_size"][-1]
    check_ramp_bounds(d.progressive_resize, size)  # also for callers without a model (lr-find)

    def train_transform(at: int) -> Callable:
        if d.augment_on == "device":  # the workers draw the crop; DeviceAugment applies it
            from dtl.device_augment import CropDraw

            a = d.augment
            return CropDraw(at, a.crop_scale, a.crop_ratio, a.hflip, a.vflip, a.rot90, d.decode_on == "device")
        return build_transform({**pre, "input_size": (pre["input_size"][0], at, at)}, True, d.augment,
                               uint8=d.normalize_on_device)

    def stream(split: Optional[str], train: bool, key: str = "train_split") -> Optional[ShardStream]:
        if not has_split(split, index, d.shards):
            if train:
                split_source(d.root, split or "train", index, d.shards, d.samples)  # raises, naming the split
            have = sorted({*(index or {}).get("splits", {}), *d.shards})
            if split is not None and split != DataConfig.model_fields[key].default:
                raise DataError(f"data.{key}={split!r}: {d.root} has no such split; it has {have}")
            if split is not None and key == "val_split" and cfg.checkpoint.patience:
                raise DataError(f"checkpoint.patience stops on a validation metric, and {d.root} has no split "
                                f"{split!r} (data.val_split); it has {have}")
            if split is not None and rank == 0:  # the default name, absent from this dataset: say so once
                warnings.warn(f"data.{key}={split!r}: {d.root} has no such split, so the run goes without "
                              f"(data.{key}=null says that on purpose)", DtlWarning, stacklevel=2)
            return None
        source = split_source(d.root, split, index, d.shards, d.samples)
        repeats = None
        if train and d.balanced_sampling:
            if not source.class_counts or len(source.class_counts) != len(classes):
                raise DataError(f"data.balanced_sampling needs the {split!r} split's class counts from "
                                f"{d.root}/dataset.json (`dtl shards index` writes them)")
            repeats = balanced_repeats(source.class_counts, d.balanced_sampling)
        opts = StreamOptions(classes=classes, label_field=d.label_field, train=train, seed=cfg.seed,
                             shuffle_buffer=d.shuffle_buffer, on_error=d.on_error, max_errors=d.max_errors,
                             draft_size=size, error_log=error_log, retry=retry, repeats=repeats)
        tf = train_transform(size) if train else build_transform(pre, False, d.augment)
        return ShardStream(source, tf, opts, rank, world_size, d.num_workers)

    data = Data(classes, stream(d.train_split, True), stream(d.val_split, False, "val_split"),
                stream(d.test_split, False, "test_split"),
                d.batch_size, d.eval_batch_size or d.batch_size, d.num_workers, d.worker_start,
                finishing(d.augment_on)(pre["mean"], pre["std"]), size, d.progressive_resize, train_transform)
    if rank == 0:
        warn_dropped_samples(data.train, d.batch_size, world_size)
    _check_label_field(data.train, d)
    return data


def _check_label_field(stream: ShardStream, d: DataConfig) -> None:
    """Read the first sample of a local training shard before any work, so a wrong
    `data.label_field` is one line at start, not after the model and the probe's features. Remote
    shards are not fetched here (their first read comes a moment later anyway)."""
    from dtl.shard_stream import iter_tar_samples, read_label

    url = stream.source.urls[0] if stream.source.urls else ""
    if d.on_error != "error" or not url or not is_local(url) or not os.path.isfile(url):
        return
    try:
        sample = next(iter(iter_tar_samples(url)))
    except Exception:  # noqa: BLE001 - a damaged shard: the stream names it, with on_error's policy
        return
    try:
        read_label(sample, d.label_field, len(stream.opt.classes), stream.opt.classes)
    except ValueError as e:
        raise DataError(f"shard {url}, sample {sample.get('__key__')}: {e}") from None


def finishing(augment_on: str) -> type:
    """What finishes a training batch on the device: normalisation, or (augment_on=device) decode,
    crop, resize, flips and normalisation."""
    if augment_on == "device":
        from dtl.device_augment import DeviceAugment

        return DeviceAugment
    return DeviceNormalize


def dropped_per_epoch(total: int, slots: int, batch_size: int) -> int:
    """Training samples an epoch leaves out: each rank x worker slot delivers whole batches only."""
    per_slot = total // slots
    return total - slots * (per_slot // batch_size) * batch_size


def warn_dropped_samples(stream: ShardStream, batch_size: int, world_size: int) -> None:
    """Say so when more than a few percent of the training split never reaches the model."""
    total, workers = stream.source.total, stream.num_workers
    dropped = dropped_per_epoch(total, world_size * workers, batch_size)
    if dropped <= DROP_WARN_FRACTION * total:
        return
    options = {w: dropped_per_epoch(total, world_size * w, batch_size) for w in range(1, workers + 1)}
    best = min(options, key=lambda w: (options[w], -w))
    hint = (f"data.num_workers={best} drops {options[best]}" if best != workers
            else "a smaller data.batch_size drops fewer")
    warnings.warn(f"split {stream.source.name!r}: {dropped} of {total} training samples ({dropped / total:.0%}) "
                  f"are left out of every epoch: each of {world_size} rank(s) x {workers} worker(s) "
                  f"reads {total // (world_size * workers)} samples and delivers only whole batches of "
                  f"{batch_size}; {hint}", DtlWarning, stacklevel=2)


def class_weights(stream: ShardStream, num_classes: int, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency weights (to the `power`) normalised to mean 1, from the counts in dataset.json."""
    counts = stream.source.class_counts
    if not counts:
        raise DataError("data.class_weights needs class counts from dataset.json")
    c = torch.tensor(counts, dtype=torch.float).clamp(min=1)
    w = (c.sum() / (num_classes * c)) ** power
    return w / w.mean()
