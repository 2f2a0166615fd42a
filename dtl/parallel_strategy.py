"""What differs between one process / DDP and FSDP, in one object; the loop never branches on it.

DDP (and a single process): frozen means `requires_grad=False`. DDP registers the parameters that
require grad when its wrapper is built, so flipping `requires_grad` on a wrapped model leaves the
new ones out of the all-reduce and the ranks drift apart silently: every stage change unwraps the
model and prepares a fresh wrapper. Evaluation runs the bare module on each rank's share.

FSDP (FSDP2, `launch/fsdp_vit.yaml`): every parameter requires grad from the start, because FSDP2
with mixed precision gathers each parameter into a low-precision copy whose `requires_grad` is
fixed at first use, so a group unfrozen later would silently get no gradient (seen on an H100).
A frozen group is one whose lr is 0 (`optimization.lr_factor`); a joining group gets a fresh
optimizer state. Every forward gathers parameters from all ranks, so all ranks evaluate together
and a rank that has run out of data joins with a dummy batch.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn

from dtl.finetune_plan import FinetunePlan, Stage, count_trainable, freeze_batchnorm, set_trainable
from dtl.layer_groups import LayerGroup
from dtl.run_config import Config
from dtl.user_errors import DtlError


def fsdp_plugin(cfg: Config) -> Optional[FullyShardedDataParallelPlugin]:
    """Under `accelerate launch` with FSDP: its settings, but gradients reduced in fp32 as under
    DDP + autocast (accelerate's default reduces them in bf16, which torch refuses to store on
    fp32 parameters on one GPU and which loses precision on many)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    precision = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision not in ("bf16", "fp16"):
        return None
    low = torch.bfloat16 if precision == "bf16" else torch.float16
    return FullyShardedDataParallelPlugin(mixed_precision_policy={
        "param_dtype": low, "reduce_dtype": torch.float32, "output_dtype": low})


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the run is FSDP (parameters flattened and sharded)."""
    return accelerator.distributed_type == DistributedType.FSDP


def launched_world() -> int:
    """Processes the launcher started (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def eval_accelerator() -> Accelerator:
    """An Accelerator for evaluation alone (`dtl eval`): a gloo group of the launched processes on a
    machine without GPU, as training forms (see `create_accelerator`), so each rank scores its share."""
    world = launched_world()
    return _connected(Accelerator(cpu=world > 1 and not torch.cuda.is_available()), world)


def _connected(accelerator: Accelerator, world: int) -> Accelerator:
    """The accelerator, if the launched processes formed one group (else each would run alone)."""
    if accelerator.num_processes != world:
        raise DtlError(f"launched as {world} processes but accelerate formed a group of "
                       f"{accelerator.num_processes}: the processes are not connected")
    return accelerator


def create_accelerator(cfg: Config, project_dir: str, log_with: Optional[list] = None) -> Accelerator:
    """Accelerate as launched (single process, torchrun/accelerate launch DDP, FSDP).

    Without cpu=True accelerate treats torchrun/accelerate-launch processes on a machine with no
    GPU as independent single-process runs (each one "main", each writing everything): a gloo
    group (MULTI_CPU) is what they need.
    """
    world = launched_world()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=log_with or None,
                              gradient_accumulation_steps=cfg.optim.grad_accum_steps, project_dir=project_dir,
                              cpu=world > 1 and not torch.cuda.is_available(), fsdp_plugin=fsdp_plugin(cfg))
    return _connected(accelerator, world)


class ParallelStrategy:
    """Prepare, re-stage, evaluate and export a model the way the launched parallelism needs."""

    def __init__(self, accelerator: Accelerator, rewrap: bool = True):
        self.accelerator = accelerator
        self.sharded = is_sharded(accelerator)
        self.rewrap = rewrap  # false only to reproduce the naive DDP bug in a test

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, groups: list[LayerGroup],
                trainable: list[bool]) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Set the first stage's trainable groups (all, under FSDP), then wrap."""
        set_trainable(model, groups, [True] * len(groups) if self.sharded else trainable)
        return self.accelerator.prepare(model, optimizer)

    def apply_stage(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: FinetunePlan,
                    before: Stage, stage: Stage) -> tuple[nn.Module, int]:
        """Make exactly the stage's groups trainable; returns the (new) model and its trainable count."""
        groups, trainable = plan.groups, plan.trainable(stage)
        if self.sharded:
            params = dict(model.named_parameters())
            for g, was, now in zip(groups, plan.trainable(before), trainable):
                if now and not was:
                    for name in g.params:
                        optimizer.state.pop(params[name], None)
            return model, count_trainable(model, groups, trainable)
        acc = self.accelerator
        wrapped = acc.unwrap_model(model) is not model
        bare = acc.unwrap_model(model, keep_fp32_wrapper=False) if wrapped and self.rewrap else acc.unwrap_model(model)
        n_trainable = set_trainable(bare, groups, trainable)
        if wrapped and self.rewrap:
            # accelerate books the bare module; drop it so save_state does not save it twice
            acc._models[:] = [m for m in acc._models if m is not bare]
            model = acc.prepare_model(bare)
        return model, n_trainable

    def count_trainable(self, model: nn.Module, plan: FinetunePlan, stage: Stage) -> int:
        return count_trainable(self.accelerator.unwrap_model(model), plan.groups, plan.trainable(stage))

    def train_mode(self, model: nn.Module, plan: FinetunePlan, stage: Stage, bn_frozen: bool,
                   bn_eval: bool = False) -> None:
        """model.train(), with BatchNorm of frozen groups (or all, `bn_eval`) back in eval mode."""
        model.train()
        if bn_frozen or bn_eval:
            trainable = [False] * len(plan.groups) if bn_eval else plan.trainable(stage)
            freeze_batchnorm(self.accelerator.unwrap_model(model), plan.groups, trainable)

    def eval_module(self, model: nn.Module) -> nn.Module:
        """The module evaluation calls: the bare one under DDP, the sharded one under FSDP."""
        return model if self.sharded else self.accelerator.unwrap_model(model)

    def more_batches(self, have_batch: bool) -> bool:
        """Whether evaluation goes on: under FSDP while any rank has data (the others join)."""
        if not self.sharded:
            return have_batch
        acc = self.accelerator
        return bool(acc.reduce(torch.tensor(int(have_batch), device=acc.device), "max"))

    def sync_batchnorm(self, model: nn.Module) -> None:
        """Average BatchNorm running statistics across ranks (timm's `--dist-bn reduce`).

        DDP broadcasts rank 0's buffers at the start of each forward, so the last updates of an
        epoch stay local: without this, each rank would evaluate its share with other statistics
        and the export would hold rank 0's alone. Called at the end of every epoch, before
        evaluation and the epoch's checkpoint. Mid-epoch checkpoints keep rank 0's buffers, which
        is what the next forward would broadcast anyway: a resumed run stays bitwise exact.
        """
        if self.accelerator.num_processes > 1 and torch.distributed.is_initialized():
            from timm.utils import distribute_bn

            distribute_bn(self.accelerator.unwrap_model(model), self.accelerator.num_processes, reduce=True)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every rank calls this; under FSDP the shards are gathered (the main process gets them)."""
        return self.accelerator.get_state_dict(model)


def gather_rows(local: tuple, world: int) -> tuple:
    """Every rank's rows on every rank, in rank order: each item of `local` is a list (joined) or a
    tensor (concatenated along dim 0; a rank's empty tensor is skipped, whatever its shape)."""
    if world == 1 or not torch.distributed.is_initialized():
        return local
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, local)
    out: list = []
    for i, item in enumerate(local):
        if isinstance(item, torch.Tensor):
            rows = [p[i] for p in parts if p[i].numel()]
            out.append(torch.cat(rows) if rows else item)
        else:
            out.append([v for p in parts for v in p[i]])
    return tuple(out)
