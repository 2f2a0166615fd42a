"""From the data config to per-rank loaders: prepare shards if asked, resolve splits, transforms."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from dtl.run_config import AugmentConfig, Config, DataConfig
from dtl.shard_stream import (DataError, ShardStream, SplitSource, StreamOptions, batches_per_epoch,
                              make_loader, read_index, split_source)


def prepare_shards(cfg: DataConfig, seed: int) -> None:
    """Write shards into `cfg.root` when asked to and not yet done (dataset.json marks done)."""
    if cfg.prepare == "none" or read_index(cfg.root) is not None:
        return
    from dtl import shard_writer

    kwargs = dict(val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=seed,
                  maxcount=cfg.shard_maxcount)
    if cfg.prepare == "elpv":
        shard_writer.write_elpv(cfg.root, **kwargs)
    else:
        if not cfg.source:
            raise DataError("data.prepare=imagefolder needs data.source (the image folder)")
        shard_writer.write_imagefolder(cfg.source, cfg.root, **kwargs)


def build_transform(pre: dict, train: bool, aug: AugmentConfig) -> Callable:
    """timm's transforms, configured with the backbone's preprocessing."""
    from timm.data import create_transform

    kwargs = dict(input_size=tuple(pre["input_size"]), interpolation=pre["interpolation"],
                  mean=tuple(pre["mean"]), std=tuple(pre["std"]), crop_pct=pre.get("crop_pct"),
                  crop_mode=pre.get("crop_mode"))
    if not train:
        return create_transform(is_training=False, **kwargs)
    return create_transform(is_training=True, hflip=aug.hflip, vflip=aug.vflip, scale=tuple(aug.crop_scale),
                            ratio=tuple(aug.crop_ratio), color_jitter=aug.color_jitter,
                            auto_augment=aug.auto_augment, **kwargs)


@dataclass
class Data:
    classes: list[str]
    train: ShardStream
    val: Optional[ShardStream]
    test: Optional[ShardStream]
    batch_size: int
    eval_batch_size: int
    num_workers: int

    def loader(self, stream: ShardStream) -> torch.utils.data.DataLoader:
        bs = self.batch_size if stream.opt.train else self.eval_batch_size
        return make_loader(stream, bs, self.num_workers)

    def train_batches(self) -> int:
        return batches_per_epoch(self.train, self.batch_size)


def resolve_classes(d: DataConfig, index: Optional[dict]) -> list[str]:
    """Class names from the config or dataset.json; they must agree when both are given."""
    classes = d.classes or (index or {}).get("classes")
    if not classes:
        raise DataError(f"no class names: {d.root}/dataset.json is missing and data.classes is not set")
    if index and d.classes and d.classes != index["classes"]:
        raise DataError(f"data.classes {d.classes} differ from {d.root}/dataset.json {index['classes']}")
    return classes


def build_data(cfg: Config, pre: dict, rank: int, world_size: int, error_log: Optional[str]) -> Data:
    d = cfg.data
    index = read_index(d.root)
    classes = resolve_classes(d, index)
    size = pre["input_size"][-1]

    def stream(split: Optional[str], train: bool) -> Optional[ShardStream]:
        if split is None or (split not in d.shards and (index is None or split not in index["splits"])):
            if train:
                split_source(d.root, split or "train", index, d.shards, d.samples)  # raises, naming the split
            return None
        source: SplitSource = split_source(d.root, split, index, d.shards, d.samples)
        opts = StreamOptions(classes=classes, label_field=d.label_field, train=train, seed=cfg.seed,
                             shuffle_buffer=d.shuffle_buffer, on_error=d.on_error, max_errors=d.max_errors,
                             draft_size=size, error_log=error_log)
        return ShardStream(source, build_transform(pre, train, d.augment), opts, rank, world_size, d.num_workers)

    return Data(classes, stream(d.train_split, True), stream(d.val_split, False), stream(d.test_split, False),
                d.batch_size, d.eval_batch_size or d.batch_size, d.num_workers)


def class_weights(stream: ShardStream, num_classes: int, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency weights (to the `power`) normalised to mean 1, from the counts in dataset.json."""
    counts = stream.source.class_counts
    if not counts:
        raise DataError("data.class_weights needs class counts from dataset.json")
    c = torch.tensor(counts, dtype=torch.float).clamp(min=1)
    w = (c.sum() / (num_classes * c)) ** power
    return w / w.mean()
