"""What W&B shows beyond scalars: confusion matrices, per-class tables, prediction tables with
images, PR/ROC curves, top losses, and model / dataset artifacts with lineage.

Built from the `EvalResult`s the event seam delivers; the tracker observer (`run_observers`)
decides when. Everything here works offline: tables and artifacts are written into the offline
run and uploaded by `wandb sync`.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional


from dtl.dataset_index import index_path
from dtl.run_report import _images_for, per_class, top_loss_order

SAMPLE_SIZE = 64


def sample_keys(keys: list[str], seed: int, k: int = SAMPLE_SIZE) -> list[str]:
    """A fixed, seeded sample of validation keys: the same rows every epoch and after a resume."""
    return sorted(random.Random(f"wandb-sample/{seed}").sample(sorted(keys), min(k, len(keys))))


def per_class_table(result, classes: list[str]):
    import wandb

    rows = per_class(result.confusion, classes)
    return wandb.Table(columns=["class", "precision", "recall", "f1", "support"],
                       data=[[r["class"], r["precision"], r["recall"], r["f1"], r["support"]] for r in rows])


def confusion_table(result, classes: list[str]):
    """Counts as rows (true, predicted, count): one table per evaluation, so epochs do not overwrite."""
    import wandb

    cm = result.confusion
    return wandb.Table(columns=["true", "predicted", "count"],
                       data=[[classes[i], classes[j], int(cm[i, j])] for i in range(len(classes)) for j in range(len(classes))])


def eval_media(result, classes: list[str], prefix: str, curves: bool = False) -> dict:
    """The row items of one evaluation: confusion matrix chart and table, per-class table (+ PR/ROC)."""
    import wandb

    items = {f"{prefix}/confusion_table": confusion_table(result, classes),
             f"{prefix}/per_class": per_class_table(result, classes)}
    if result.probs is not None and len(result.labels):
        y = result.labels.tolist()
        items[f"{prefix}/confusion_matrix"] = wandb.plot.confusion_matrix(
            y_true=y, preds=result.preds.tolist(), class_names=classes, title=f"{prefix} confusion")
        if curves:
            probs = result.probs.tolist()
            items[f"{prefix}/pr_curve"] = wandb.plot.pr_curve(y, probs, labels=classes, title=f"{prefix} precision-recall")
            items[f"{prefix}/roc_curve"] = wandb.plot.roc_curve(y, probs, labels=classes, title=f"{prefix} ROC")
    return items


def sample_table(keys: list[str], urls: list[str], labels: dict[str, int], classes: list[str]):
    """The seeded validation sample, logged once: key, image, label (the predictions tables join on key)."""
    import wandb

    images = _images_for(set(keys), urls)
    return wandb.Table(columns=["key", "image", "label"],
                       data=[[k, wandb.Image(images[k]) if k in images else None, classes[labels[k]]] for k in keys])


def predictions_table(result, keys: list[str], classes: list[str], epoch: int):
    """Per epoch, for the sampled keys: label, prediction, top-3 probabilities, correct."""
    import wandb

    where = {k: i for i, k in enumerate(result.keys)}
    rows = []
    for k in keys:
        if k not in where:
            continue
        i = where[k]
        p = result.probs[i]
        top = p.topk(min(3, len(classes)))
        label, pred = int(result.labels[i]), int(p.argmax())
        rows.append([k, epoch, classes[label], classes[pred],
                     ", ".join(f"{classes[j]} {float(v):.2f}" for v, j in zip(top.values, top.indices)), label == pred])
    return wandb.Table(columns=["key", "epoch", "label", "prediction", "top3", "correct"], data=rows)


def top_losses_table(result, classes: list[str], urls: list[str], k: int = 32):
    """The most confidently wrong test images (fastai's plot_top_losses), with images."""
    import wandb

    if result.probs is None or not len(result.labels):
        return None
    order, loss = top_loss_order(result, k)
    images = _images_for({result.keys[i] for i in order}, urls)
    rows = []
    for i in order:
        key, label, pred = result.keys[i], int(result.labels[i]), int(result.probs[i].argmax())
        rows.append([key, wandb.Image(images[key]) if key in images else None, classes[label], classes[pred],
                     float(result.probs[i, pred]), float(loss[i])])
    return wandb.Table(columns=["key", "image", "label", "prediction", "p_prediction", "loss"], data=rows)


def dataset_artifact(root: str, sources: dict, classes: list[str], name: str):
    """A `dataset` artifact referencing dataset.json and the shards (file://, http(s)://, s3://, gs://)."""
    import wandb

    art = wandb.Artifact(name, type="dataset", metadata={"root": root, "classes": classes,
                                                         "splits": {k: s.total for k, s in sources.items()}})
    refs = [index_path(root)]
    refs += [u for s in sources.values() for u in s.urls]
    for ref in refs:
        if ref.startswith("pipe:"):
            continue
        uri = ref if "://" in ref else Path(ref).resolve().as_uri()
        if uri.startswith("file://") and not Path(ref).exists():
            continue
        art.add_reference(uri, name=Path(ref).name if "://" not in ref else None, checksum=uri.startswith("file://"))
    return art


def model_artifact(path: Path, name: str, metadata: dict):
    import wandb

    art = wandb.Artifact(name, type="model", metadata=metadata)
    art.add_file(str(path), name=path.name)
    return art


def safe_name(text: Optional[str]) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in (text or "run"))[:100]
