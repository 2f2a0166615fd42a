"""Head-only stages on cached features: the frozen backbone runs once per sample and view, not per epoch.

While every backbone group is frozen (a stage that trains the head group only), the backbone's
output for a sample depends only on the sample and its augmentation. So the head's inputs, the
pooled pre-logit features, are computed once per view and the epochs train the head on them:

- View `v` of a sample is the training augmentation seeded by (seed, v, key), the augmentation
  the uncached run gives it in epoch `v`. Epoch `e` reads view `e mod K` (`finetune.cache_views`).
  With K equal to the number of head-only epochs (or augmentation off and K = 1) the head gets
  exactly the inputs of the uncached run, in the same order.
- Order and batches: epoch `e` iterates this rank's training stream for epoch `e` exactly as the
  uncached run does (same shard order, shuffle buffer, workers, resume skip), but in "keys only"
  mode (labels and keys, no decode, no transform), and looks the features up. So each rank caches
  its own slice, steps stay equal across ranks, and a resumed run continues exactly. Samples
  missing from the cache (a view not computed yet, samples an earlier epoch left out of its
  last partial batch, or under DDP a rank whose slice changed with the epoch's shard order) are
  read from their shards, decoded and augmented as view `v` exactly as the stream does, and run
  through the frozen backbone in eval mode first.
- The cache lives in memory and, per rank and view, in `output_dir/feature_cache/` (atomic
  writes, reused by a resumed run whose identity, see `linear_probe.cache_identity`, matches).

Only the leading head-only epochs are cached: once a stage has trained a backbone group, a later
head-only stage runs the backbone as it is now. Under DDP the head is called outside the DDP
wrapper, so its gradients are averaged here. Not used under FSDP, with mixup/cutmix (they mix
images), with dropout or stochastic depth before the head (they stay on in frozen blocks), BatchNorm
in train mode (`finetune.bn_frozen=false`: batch statistics), a head group that holds more than the
head (ConvNeXt's `head.norm`), or when `finetune.cache_frozen=false`.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dtl.backbones import head_name
from dtl.device_augment import EncodedImages
from dtl.device_batches import as_input
from dtl.shard_stream import ShardStream, iter_tar_samples


@dataclass
class ViewCache:
    """Features of one view, by sample key (this rank's samples seen so far)."""
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    dirty: bool = False


class FrozenFeatureCache:
    """The per-rank feature cache of head-only stages, and the batches an epoch trains on."""

    def __init__(self, run):
        self.run = run
        self.views: dict[int, ViewCache] = {}
        self.val: Optional[list[dict]] = None
        self.exact = _backbone_is_a_fixed_function(run)
        self.leading = self._head_only_epochs()
        self.k = max(1, min(run.cfg.finetune.cache_views, self.leading))
        from dtl.linear_probe import cache_identity

        rank = run.accelerator.process_index
        self.dir = run.out / "feature_cache" / f"frozen-{cache_identity(run)}-k{self.k}" / f"rank{rank}"

    def _head_only_epochs(self) -> int:
        """The leading epochs that train the head only (the cached ones when the cache is exact)."""
        run, n = self.run, 0
        while n < run.cfg.epochs and self._head_only(run.plan.stage_at(n)):
            n += 1
        return n

    def _head_only(self, stage) -> bool:
        return stage.first_group == len(self.run.plan.groups) - 1

    def applies(self, epoch: int) -> bool:
        """Whether epoch `epoch` trains (and validates) on cached features: only in the leading
        head-only epochs, while the backbone still holds its starting weights, and where its
        train-mode forward is the eval-mode one the cache computes (`self.exact`). An epoch past the
        last (a finished run's final validation) counts as the last."""
        run, cfg = self.run, self.run.cfg
        return (cfg.finetune.cache_frozen and self.exact and run.mixup is None and not run.strategy.sharded
                and max(0, min(epoch, cfg.epochs - 1)) < self.leading)

    # -- storage ---------------------------------------------------------------------------
    def _view(self, v: int) -> ViewCache:
        if v not in self.views:
            path = self.dir / f"view{v}.pt"
            vc = ViewCache()
            if path.is_file():
                saved = torch.load(path, map_location="cpu", weights_only=True)
                vc.rows = dict(zip(saved["keys"], saved["x"]))
            self.views[v] = vc
        return self.views[v]

    def save(self) -> None:
        """Write the views that grew (atomically: a half-written file is never read back)."""
        for v, vc in self.views.items():
            if not vc.dirty or not vc.rows:
                continue
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"view{v}.pt"
            tmp = path.with_name(f".{path.name}.tmp")
            keys = list(vc.rows)
            torch.save({"keys": keys, "x": torch.stack([vc.rows[k] for k in keys])}, tmp)
            os.replace(tmp, path)
            vc.dirty = False

    # -- the epoch's batches -----------------------------------------------------------------
    def _stream(self, keys_only: bool, view: int) -> ShardStream:
        """A copy of this rank's training stream (order, slice, resume skip come with `set_epoch`),
        augmented as `view`, or reading keys and labels only."""
        base = self.run.data.train
        s = copy.copy(base)
        s.opt = copy.copy(base.opt)
        s.opt.keys_only, s.opt.aug_epoch = keys_only, view
        return s

    def batches(self, epoch: int, skip_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features, labels) per training batch of `epoch`, from the cache (filled first where needed)."""
        run = self.run
        v = epoch % self.k
        vc = self._view(v)
        keyed = self._stream(True, v)
        keyed.set_epoch(epoch, skip_batches=skip_batches, batch_size=run.data.batch_size)
        plan = [(b["key"], b["label"]) for b in run.data.loader(keyed)]
        missing = {k for keys, _ in plan for k in keys if k not in vc.rows}
        if missing:
            self._compute(missing, v, vc)
        for keys, labels in plan:
            have = [i for i, k in enumerate(keys) if k in vc.rows]  # an undecodable sample was skipped
            if have:
                yield torch.stack([vc.rows[keys[i]] for i in have]), labels[have]

    def head(self) -> nn.Module:
        net = self.run.accelerator.unwrap_model(self.run.model)
        return net.get_submodule(head_name(net))

    def val_batches(self) -> list[dict]:
        """This rank's validation batches with features as "image" (the eval transform is
        deterministic, so one pass serves every head-only epoch; kept in memory)."""
        if self.val is None:
            self.val = [{"image": head_inputs(self.run, b["image"]), "label": b["label"], "key": b["key"]}
                        for b in self.run.data.loader(self.run.data.val)]
        return self.val

    def _compute(self, keys: set[str], v: int, vc: ViewCache) -> None:
        """Features of `keys` as view `v`: decoded and augmented exactly as the training stream does
        (seeded by (seed, v, key)), through the frozen backbone, in batches."""
        stream = self._stream(False, v)
        stream._errors = 0
        pending: list[tuple[torch.Tensor, str]] = []

        def flush() -> None:
            images = [x for x, _ in pending]
            batch = (EncodedImages.pack(images, [k for _, k in pending]) if isinstance(images[0], tuple)
                     else torch.stack(images))
            feats = head_inputs(self.run, batch).cpu()
            vc.rows.update({k: row for (_, k), row in zip(pending, feats)})
            pending.clear()

        for url in stream.source.urls:
            for sample in iter_tar_samples(url, stream.opt.retry):
                if sample.get("__key__") in keys:
                    item = stream._decode(sample)
                    if item is not None:
                        pending.append((item[0], item[2]))
                    if len(pending) == self.run.data.eval_batch_size:
                        flush()
        if pending:
            flush()
        vc.dirty = True
        self.save()


def _backbone_is_a_fixed_function(run) -> bool:
    """Whether, in a head-only stage, everything before the head computes in train mode what the
    cache computes in eval mode, and the head group is the head module alone: frozen BatchNorm in
    eval mode, no dropout or drop-path with p > 0 outside the head (torchvision's MobileNetV3 and
    AlexNet keep dropout in their classifier body; timm's `drop_path_rate`), and no trainable
    layer between the pooled features and the head (ConvNeXt's head group holds `head.norm`)."""
    cfg = run.cfg
    if not (cfg.finetune.bn_frozen or cfg.finetune.bn_eval):
        return False
    net = run.accelerator.unwrap_model(run.model)
    head = head_name(net)
    inside = lambda name: name == head or name.startswith(head + ".")  # noqa: E731
    if not all(inside(p.rsplit(".", 1)[0]) for p in run.plan.groups[-1].params):
        return False
    for name, m in net.named_modules():
        rate = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "drop_prob", None)
        if rate and not inside(name):
            return False
    return True


def head_inputs(run, images: torch.Tensor) -> torch.Tensor:
    """The head's input (pooled pre-logit features) for a batch of images: the frozen backbone in
    eval mode (no dropout, no drop-path, BatchNorm on running statistics), the modes restored after."""
    acc = run.accelerator
    net = acc.unwrap_model(run.model)
    captured: list[torch.Tensor] = []
    hook = net.get_submodule(head_name(net)).register_forward_pre_hook(
        lambda m, args: captured.append(args[0].detach().float()))
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad(), acc.autocast():
            net(as_input(images, acc.device, run.cfg.model.channels_last, run.data.normalize))
    finally:
        hook.remove()
        for m, mode in modes:  # back to the stage's modes (frozen BatchNorm stays in eval)
            m.training = mode
    return captured.pop().flatten(1)


def head_forward(run) -> nn.Module:
    """What a cached batch goes through: timm's pre-head dropout (`drop_rate`) and the head."""
    net = run.accelerator.unwrap_model(run.model)
    head = net.get_submodule(head_name(net))
    drop = float(getattr(net, "drop_rate", 0.0) or 0.0)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return head(F.dropout(x, p=drop, training=True) if drop else x)
    return forward


def average_head_grads(run) -> None:
    """Under DDP the cached head bypasses the DDP wrapper: average its gradients across ranks."""
    acc = run.accelerator
    if acc.num_processes == 1:
        return
    net = acc.unwrap_model(run.model)
    for p in net.get_submodule(head_name(net)).parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)  # SUM: gloo has no AVG
            p.grad /= acc.num_processes


def build_cache(run) -> Optional[FrozenFeatureCache]:
    """The run's cache if any stage of its plan trains the head only and caching is on."""
    if not run.cfg.finetune.cache_frozen or run.cfg.data.progressive_resize is not None:
        return None  # progressive resizing: an epoch would read a view cached at another epoch's size
    cache = FrozenFeatureCache(run)
    return cache if any(cache.applies(e) for e in range(run.cfg.epochs)) else None
