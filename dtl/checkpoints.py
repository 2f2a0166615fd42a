"""Atomic training checkpoints (accelerate state + our JSON train state) and safetensors exports.

A checkpoint is written by `accelerator.save_state` into `checkpoints/.tmp-NAME`, completed with
`train_state.json`, and only then renamed to `checkpoints/NAME`: a rename is atomic, so a run
killed mid-write leaves a `.tmp-` folder that is never picked up (and is removed on the next
start). Model weights go through safetensors and the rest through `torch.load(weights_only=True)`
(accelerate's default); our own state is JSON, so nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dtl.backbones import state_misfit
from dtl.user_errors import DtlError, first_line

STATE_FILE = "train_state.json"
_NAME = re.compile(r"^ckpt-(\d{8})$")


class CheckpointError(DtlError, ValueError):
    """A checkpoint or exported model does not belong to this run's model."""


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint."""
    epoch: int = 0                 # epoch being trained (or next one, when batch_in_epoch == 0)
    batch_in_epoch: int = 0        # batches of `epoch` already consumed
    step: int = 0                  # optimizer steps so far
    stage: int = -1                # stage index applied to the model
    best_metric: Optional[float] = None   # the monitored validation value of best.safetensors
    best_epoch: Optional[int] = None      # 0-based, as `epoch`; -1 is the probe; summary.json counts from 1
    best_source: str = "model"            # "model" or "ema": whose weights best.safetensors holds
    stale_epochs: int = 0          # epochs since the monitored value last improved (early stopping)
    stopped_early: bool = False    # patience spent: the run is finished before `epochs`
    probe_done: bool = False       # the LP-FT probe has trained the head
    wall_time_s: float = 0.0       # the whole run's, across resumes and requeues
    images_seen: int = 0           # training images, all ranks, across resumes
    epoch_sums: dict = field(default_factory=dict)  # `epoch`'s training so far (loss, correct, images, seconds
                                                    # on all ranks; the last step's lrs) when checkpointed
                                                    # mid-epoch; {} between epochs
    wandb_run_id: Optional[str] = None
    identity: dict = field(default_factory=dict)   # backbone, classes, groups: checked on resume
    scheduler: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def recover_partial(root: str | Path) -> None:
    """Tidy up after a run killed while writing a checkpoint.

    `.tmp-X` is an unfinished write: deleted. `.old-X` is a complete checkpoint being replaced by
    a newer write of the same step: put back if the kill came before the new `X` was in place.
    """
    root = Path(root)
    if not root.is_dir():
        return
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".old-*"):
        final = root / p.name[len(".old-"):]
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.replace(p, final)


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder below `path` to disk, so a crash after the rename finds data."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


EMA_FILE = "ema.safetensors"


def save_checkpoint(accelerator, root: str | Path, state: TrainState, keep: int,
                    ema: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Every rank calls this; the main process publishes the finished folder with one rename.

    A folder named `ckpt-*` is always complete: it is written as `.tmp-ckpt-*` and renamed only
    after every rank has written its part and the files are on disk. Re-saving a step moves the
    old folder aside first (`.old-*`), so a kill at any moment leaves a complete one to resume.
    """
    root = Path(root)
    final = root / f"ckpt-{state.step:08d}"
    tmp, old = root / f".tmp-{final.name}", root / f".old-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(state.to_json())
        if ema is not None:  # safetensors, not accelerate's pickled custom state (loaded with weights_only=False)
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / EMA_FILE))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_train_state(path: str | Path) -> TrainState:
    path = Path(path)
    try:
        return TrainState.from_json((path / STATE_FILE).read_text())
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a dtl checkpoint ({e})") from None


def check_resumable(path: str | Path, model: nn.Module, ema: bool = False) -> None:
    """Refuse, before anything is written, a checkpoint whose files do not read back or whose
    weights do not fit this model (a changed head keeps backbone, classes and groups, so only the
    tensors tell): accelerate would fail mid-load with a traceback (or, for the RNG states, carry on
    silently and lose the bitwise resume). Safetensors are checked by their header (names, shapes,
    the file covering its data); accelerate's torch.save files by their zip directory, which sits at
    the end (a cut file has none). FSDP's sharded folders are left to their loader."""
    import zipfile

    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.iterdir())
    names = {f.name for f in files}
    lacking = [n for n in ("model.safetensors", *([EMA_FILE] if ema else []))
               if n not in names and not any(m.startswith("pytorch_model_fsdp") for m in names)]
    if lacking:
        raise CheckpointError(f"{path}: no {' or '.join(lacking)} in this checkpoint (incomplete, or written "
                              f"{'without ema.enabled' if lacking[-1] == EMA_FILE else 'by another tool'}); resume "
                              f"from another checkpoint with resume=PATH")
    state = model.state_dict()
    shared = _shared_keys(state)
    expected = {k: tuple(v.shape) for k, v in state.items()}
    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as f:
                    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception as e:
                raise CheckpointError(f"{file}: unreadable checkpoint file ({first_line(e)}); resume from an "
                                      f"earlier checkpoint with resume=PATH, or remove this one") from None
            misfit = state_misfit(shapes, expected, shared) if file.name in ("model.safetensors", EMA_FILE) else None
            if misfit:
                raise CheckpointError(f"{file} belongs to another model (a changed model.* setting, e.g. model.head?): {misfit}")
        elif file.suffix in (".bin", ".pkl", ".pt", ".pth"):
            with open(file, "rb") as f:
                if f.read(4) != b"PK\x03\x04":
                    continue  # not torch's zip format (its legacy one): left to the loader
            try:
                zipfile.ZipFile(file).close()
            except (zipfile.BadZipFile, OSError) as e:
                raise CheckpointError(f"{file}: unreadable checkpoint file (truncated or damaged: {first_line(e)}); "
                                      f"resume from an earlier checkpoint with resume=PATH, or remove this one") from None


def _shared_keys(state: dict[str, torch.Tensor]) -> set[str]:
    """Names of a state dict's tensors that share storage with another (safetensors keeps one of them)."""
    seen: dict[tuple, list[str]] = {}
    for k, v in state.items():
        if v.device.type != "meta" and v.numel():
            seen.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)), []).append(k)
    return {k for names in seen.values() if len(names) > 1 for k in names}


def check_identity(saved: dict, current: dict, source: str) -> None:
    """Refuse a checkpoint from another model, class list or grouping, naming what differs."""
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {current[k]!r}"
             for k in current if saved.get(k) != current[k]]
    if diffs:
        raise CheckpointError(f"{source} belongs to another model or dataset: " + "; ".join(diffs))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _umask_mode(mode: int = 0o666) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def export_model(weights: nn.Module | dict[str, torch.Tensor], path: str | Path, meta: dict[str, Any]) -> None:
    """Weights as safetensors with everything prediction needs (arch, classes, preprocessing)."""
    path = Path(path)
    state_dict = weights.state_dict() if isinstance(weights, nn.Module) else weights
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"dtl": json.dumps(meta)})
    os.chmod(tmp, _umask_mode())  # as any file the user writes: teammates on a shared file system can read it
    os.replace(tmp, path)


BEST_FILE, BEST_PENDING = "best.safetensors", ".best-pending.safetensors"


def publish_best(out: str | Path) -> None:
    """Make the weights selected since the last checkpoint `best.safetensors`. Called once that
    checkpoint (which records best_epoch and best_metric) is on disk, and at the end: so the file
    is always the best of the state a resumed run continues from, never of an epoch it redoes."""
    pending = Path(out) / BEST_PENDING
    if pending.is_file():
        os.replace(pending, Path(out) / BEST_FILE)


def _export_step(path: Path) -> Optional[int]:
    """The optimizer step an export was written at (its metadata); None if unreadable."""
    try:
        return int(read_export_meta(path)["step"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def _best_step(out: Path) -> Optional[int]:
    best = out / BEST_FILE
    return _export_step(best) if best.is_file() else None


def best_newer_than(out: str | Path, step: int) -> bool:
    """Whether best.safetensors was selected after `step`: a run resumed (resume=PATH) from a
    checkpoint older than the one that recorded it."""
    exported = _best_step(Path(out))
    return exported is not None and exported > step


def settle_best(out: str | Path, resume_step: Optional[int]) -> Optional[Path]:
    """At start, make the best weights on disk those of the state the run continues from (`resume_step`,
    None for a fresh start). Weights a killed process left pending were selected either at or before
    that checkpoint's step (published now) or after it (dropped: their epoch is trained again). A
    best.safetensors selected after it (resume=PATH to an older checkpoint) is moved aside, never
    deleted; its new name is returned, and the run's selection starts again."""
    out = Path(out)
    pending = out / BEST_PENDING
    if pending.is_file():
        step = _export_step(pending)
        if resume_step is not None and step is not None and step <= resume_step:
            publish_best(out)
        else:
            pending.unlink()
    exported = _best_step(out) if resume_step is not None else None
    if exported is None or exported <= resume_step:
        return None
    aside = out / f"best.step{exported}.safetensors"
    os.replace(out / BEST_FILE, aside)
    return aside


def read_export_meta(path: str | Path) -> dict:
    from safetensors import safe_open

    if Path(path).is_dir():
        raise CheckpointError(f"{path} is a folder: pass an exported file (model.safetensors, best.safetensors or "
                              f"probe.safetensors of a run)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    if "dtl" not in meta:
        raise CheckpointError(f"{path}: no dtl metadata (was it written by dtl?)")
    try:
        info = json.loads(meta["dtl"])
    except ValueError as e:
        raise CheckpointError(f"{path}: its dtl metadata is not valid JSON ({e})") from None
    lacking = [k for k in ("backbone", "classes") if k not in info] if isinstance(info, dict) else ["a mapping"]
    if lacking:
        raise CheckpointError(f"{path}: its dtl metadata lacks {', '.join(lacking)} (damaged, or not written by dtl)")
    return info


def load_exported(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the classifier from an export alone: no training config needed."""
    from dtl.backbones import create_classifier

    meta = read_export_meta(path)
    try:
        model = create_classifier(meta["backbone"], len(meta["classes"]), pretrained=False, head=meta.get("head"),
                                  factory=meta.get("factory"), aux_logits=bool(meta.get("aux_logits")),
                                  head_module=meta.get("head_module"), global_pool=meta.get("global_pool"))
    except DtlError as e:  # e.g. a backbone this install lacks: say which file asked for it
        raise CheckpointError(f"{path}: {first_line(e)}") from None
    sd = load_file(str(path))
    state = model.state_dict()
    misfit = state_misfit({k: tuple(v.shape) for k, v in sd.items()},
                          {k: tuple(v.shape) for k, v in state.items()}, _shared_keys(state))
    if misfit:
        raise CheckpointError(f"{path}: weights do not fit its metadata ({meta['backbone']}, "
                              f"{len(meta['classes'])} classes): {misfit}")
    model.load_state_dict(sd, strict=False)
    return model.eval(), meta
