"""A report on disk, in `output_dir/report/`: curves, confusion matrix, per-class metrics, top losses.

For an engineer on an air-gapped cluster the same pictures W&B would show, good enough to paste
into a pull request: `curves.png` (loss, accuracy and macro-F1 per epoch, the probe as epoch 0;
every layer group's learning rate over steps with the stage boundaries), `confusion.png` (counts
and row-normalised), `per_class.csv`, `top_losses.png` (the most confidently wrong test images)
and `report.md` tying them to the summary. Curves are redrawn every epoch; the rest at the end.
A resumed run reads the history back from metrics.jsonl.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

import torch

from dtl.run_events import Observer
from dtl.run_observers import recorded_before

FIG_DPI = 100


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


class RunReport(Observer):
    """Writes output_dir/report/ (main process only)."""

    def __init__(self, top_losses: int = 16):
        self.top_losses = top_losses
        self.epochs: list[dict] = []
        self.steps: list[dict] = []
        self.probe: Optional[dict] = None
        self.test = None

    def run_start(self, run) -> None:
        """A resumed run's history so far: the records up to the checkpoint it resumed from (records
        written after it, e.g. an epoch's whose checkpoint a kill prevented, are redone and logged again)."""
        path = run.out / "metrics.jsonl"
        for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
            try:
                rec = json.loads(line)
            except ValueError:  # a line garbled by a crash (MetricsFile drops it first on a resume)
                continue
            if not recorded_before(rec, run.state):
                continue
            if "train/acc" in rec:
                self.epochs.append(rec)
            elif "probe/epochs" in rec:
                self.probe = rec
            elif "train/loss_step" in rec:
                self.steps.append(rec)

    def probe_end(self, run, record: dict) -> None:
        self.probe = record

    def step_end(self, run, record: dict) -> None:
        self.steps.append({"step": run.state.step, "epoch": run.state.epoch, **record})

    def epoch_end(self, run, record: dict) -> None:
        self.epochs.append({"step": run.state.step, **record})  # the record carries its `epoch`
        plot_curves(self.epochs, self.steps, self.probe, run.plan, run.steps_per_epoch,
                    _dir(run) / "curves.png", run.cfg.model.backbone)

    def eval_end(self, run, split: str, result) -> None:
        if split == "test":
            self.test = result

    def fit_end(self, run, result) -> None:
        if result.status != "finished":
            return
        out = _dir(run)
        if self.epochs:
            plot_curves(self.epochs, self.steps, self.probe, run.plan, run.steps_per_epoch, out / "curves.png",
                        run.cfg.model.backbone)
        if self.test is not None:
            write_test_report(self.test, run.classes, run.data.test.source.urls, out, self.top_losses)
        write_markdown(run, result.summary, out)


def _dir(run) -> Path:
    out = run.out / "report"
    out.mkdir(parents=True, exist_ok=True)
    return out


def stage_change_steps(plan, steps_per_epoch: int, last_step: int) -> list[int]:
    """Optimizer steps at which a later stage began, up to `last_step`: a stage planned past the
    run's epochs never ran and gets no line."""
    return [s.epoch * steps_per_epoch for s in plan.stages[1:] if s.epoch * steps_per_epoch < last_step]


def plot_curves(epochs: list[dict], steps: list[dict], probe: Optional[dict], plan, steps_per_epoch: int,
                path: Path, title: str) -> None:
    """Loss, accuracy, macro-F1 per epoch (1-based; the probe at 0) and per-group lrs per step."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=FIG_DPI)
    x = [r["epoch"] for r in epochs]
    for ax, key, name in ((axes[0, 0], "loss", "loss"), (axes[0, 1], "acc", "accuracy"),
                          (axes[1, 0], "macro_f1", "macro-F1")):
        if f"train/{key}" in epochs[0]:
            ax.plot(x, [r[f"train/{key}"] for r in epochs], "o-", label="train")
        for split, style in (("val", "s-"), ("val_ema", "^--")):
            if f"{split}/{key}" in epochs[0]:
                px, py = x, [r[f"{split}/{key}"] for r in epochs]
                if probe is not None and split == "val" and f"val/{key}" in probe:
                    px, py = [0, *px], [probe[f"val/{key}"], *py]
                ax.plot(px, py, style, label=split.replace("_", " "))
        ax.set_title(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (0: the LP-FT probe)" if probe else "epoch")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
        else:  # no validation split and no training macro-F1: say so instead of an empty frame
            ax.text(0.5, 0.5, f"no {name} logged (no validation split)", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    ax = axes[1, 1]
    lr_keys = [k for k in (steps[0] if steps else {}) if k.startswith("lr/")]
    few = len(steps) < 20  # a short run logs a few steps (log_every_steps): markers, or one point is invisible
    for k in lr_keys:
        ax.plot([r["step"] for r in steps], [r[k] for r in steps], label=k[3:], linewidth=1.2,
                marker="o" if few else None, markersize=4)
    if not lr_keys:
        ax.text(0.5, 0.5, "no step logged yet (log_every_steps)", ha="center", va="center", transform=ax.transAxes,
                color="grey")
    for at in stage_change_steps(plan, steps_per_epoch, steps[-1]["step"] if steps else 0):
        ax.axvline(at, color="grey", linestyle=":", linewidth=1)
    ax.set_title("learning rate per layer group (dotted: stage changes)")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    if lr_keys:
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def per_class(cm: torch.Tensor, classes: list[str]) -> list[dict]:
    cm = cm.double()
    rows = []
    for i, name in enumerate(classes):
        tp, pred, true = cm[i, i], cm[:, i].sum(), cm[i].sum()
        p = float(tp / pred) if pred else 0.0
        r = float(tp / true) if true else 0.0
        rows.append({"class": name, "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                     "support": int(true)})
    return rows


def plot_confusion(cm: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    plt = _plt()
    fig = confusion_figure(cm, classes, title)
    fig.savefig(path)
    plt.close(fig)


def confusion_figure(cm: torch.Tensor, classes: list[str], title: str):
    """Counts and row-normalised side by side, class names on the axes (the report's and TensorBoard's)."""
    plt = _plt()
    cm = cm.double()
    norm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    size = max(5.0, 0.6 * n + 3)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), dpi=FIG_DPI)
    for ax, data, name, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], norm, "row-normalised (recall)", "{:.2f}")):
        im = ax.imshow(data.numpy(), cmap="Blues", vmin=0)
        ax.set_xticks(range(n), classes, rotation=35, ha="right", fontsize=9)
        ax.set_yticks(range(n), classes, fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
        top = float(data.max()) if data.numel() else 1.0
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    v = float(data[i, j])
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8,
                            color="white" if v > 0.6 * top else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _images_for(keys: set[str], urls: list[str]) -> dict:
    from dtl.shard_stream import decode_image, iter_tar_samples

    found = {}
    for url in urls:
        for sample in iter_tar_samples(url):
            if sample["__key__"] in keys:
                found[sample["__key__"]] = decode_image(sample)
        if len(found) == len(keys):
            break
    return found


def top_loss_order(result, k: int) -> tuple[list[int], torch.Tensor]:
    """Indices of the `k` samples with the highest loss (most confidently wrong first), and every loss."""
    loss = -result.probs[torch.arange(len(result.labels)), result.labels].clamp_min(1e-12).log()
    return [int(i) for i in loss.argsort(descending=True)[:k]], loss


def plot_top_losses(result, classes: list[str], urls: list[str], path: Path, k: int) -> list[dict]:
    """The `k` test images with the highest loss, title: true / predicted (probability)."""
    plt = _plt()
    probs, labels = result.probs, result.labels
    if probs is None or not len(labels):
        return []
    order, loss = top_loss_order(result, k)
    images = _images_for({result.keys[i] for i in order}, urls)
    cols = min(4, len(order))
    rows_n = max(1, math.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 3.5 * rows_n), dpi=FIG_DPI, squeeze=False)
    rows = []
    for ax, i in zip(axes.flat, order):
        key, true, pred = result.keys[i], int(labels[i]), int(probs[i].argmax())
        rows.append({"key": key, "true": classes[true], "predicted": classes[pred],
                     "p_predicted": float(probs[i, pred]), "loss": float(loss[i])})
        if key in images:
            ax.imshow(images[key])
        ax.set_title(f"{classes[true]}\n→ {classes[pred]} ({float(probs[i, pred]):.2f})", fontsize=9,
                     color="#b22222" if true != pred else "black")
        ax.set_xlabel(key, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(order):]:
        ax.axis("off")
    wrong = sum(r["true"] != r["predicted"] for r in rows)
    fig.suptitle(f"top losses on the test split ({wrong} of {len(rows)} shown are wrong): true → predicted (probability)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path)
    plt.close(fig)
    return rows


def write_test_report(result, classes: list[str], urls: list[str], out: Path, top_k: int = 16) -> None:
    """confusion.png, per_class.csv and top_losses.png (+ .csv) of one evaluation."""
    plot_confusion(result.confusion, classes, out / "confusion.png",
                   f"{result.split}: acc {result.metrics['acc']:.4f}, macro-F1 {result.metrics['macro_f1']:.4f}")
    with open(out / "per_class.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["class", "precision", "recall", "f1", "support"])
        w.writeheader()
        w.writerows(per_class(result.confusion, classes))
    rows = plot_top_losses(result, classes, urls, out / "top_losses.png", top_k)
    if rows:
        with open(out / "top_losses.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def write_markdown(run, summary: dict, out: Path) -> None:
    s = summary
    best = s.get("best_epoch")
    lines = [f"# {run.out.name}: {run.cfg.model.backbone} on {run.cfg.data.root}", "",
             f"{len(run.classes)} classes; {s.get('epochs_trained')} epochs, {s.get('steps')} steps, "
             f"{s.get('wall_time_s', 0) / 60:.1f} min; " + (
                 "no validation split, so no selection: the test is the final weights' (model.safetensors)."
                 if best is None else f"selected weights (best.safetensors): "
                 f"{'the probe' if best == 0 else f'epoch {best}'} by {s.get('monitor')}."), "",
             recipe_line(run.cfg), "",
             "| split | acc | macro-F1 | balanced acc |", "| --- | --- | --- | --- |"]
    for name, prefix in (("test (selected)", "test/"), ("test (final weights)", "test_final/"), ("val (last epoch)", "val/")):
        if f"{prefix}acc" in s:
            lines.append(f"| {name} | {s[prefix + 'acc']:.4f} | {s[prefix + 'macro_f1']:.4f} | "
                         f"{s[prefix + 'balanced_acc']:.4f} |")
    lines += ["", "![curves](curves.png)", ""] + _evaluation_lines(out, "test, selected weights")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def recipe_line(cfg) -> str:
    """One sentence on what shapes the numbers beside it: the training targets, the sampling and the
    test-time rules, so a reader of the report alone knows what the test accuracy was measured under."""
    from dtl.prior_correction import corrects_prior

    aug, opt, data = cfg.data.augment, cfg.optim, cfg.data
    loss = f"ordinal soft labels (SORD, sigma {opt.ordinal_sigma:g} levels)" if opt.ordinal_sigma else "cross-entropy"
    if opt.label_smoothing:
        loss += f", label smoothing {opt.label_smoothing:g}"
    mixes = [f"{name} alpha {alpha:g}" for name, alpha in (("mixup", aug.mixup), ("cutmix", aug.cutmix)) if alpha]
    if mixes:
        loss += " on " + " / ".join(mixes) + " batches" + (f" (a batch mixed with probability {aug.mix_prob:g})"
                                                           if aug.mix_prob < 1 else "")
    if data.balanced_sampling:
        shares = "equal class shares" if data.balanced_sampling == 1 else f"class shares ~ count^{1 - data.balanced_sampling:g}"
        sampling = f"class-balanced sampling {data.balanced_sampling:g} ({shares})"
    elif data.class_weights:
        sampling = (f"class weights ~ count^-{data.class_weight_power:g}" if data.class_weight_power
                    else "equal class weights (data.class_weight_power 0)")
    else:
        sampling = "the data's class frequencies"
    test = (f"test-time augmentation: {cfg.eval.tta}"
            + ("; predictions under the data's class prior (eval.prior_correction)" if corrects_prior(cfg) else ""))
    return f"Trained on {loss}, with {sampling}; {test}."


def _evaluation_lines(out: Path, what: str) -> list[str]:
    """Markdown for write_test_report's files in `out`: confusion, per-class table, top losses."""
    if not (out / "confusion.png").is_file():
        return []
    lines = ["![confusion matrix](confusion.png)", "", f"Per class ({what}):", "",
             "| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
    with open(out / "per_class.csv") as f:
        for r in csv.DictReader(f):
            lines.append(f"| {r['class']} | {float(r['precision']):.3f} | {float(r['recall']):.3f} | "
                         f"{float(r['f1']):.3f} | {r['support']} |")
    if (out / "top_losses.png").is_file():
        lines += ["", "![top losses](top_losses.png)", ""]
    return lines


def write_eval_markdown(record: dict, out: Path) -> None:
    """report.md of `dtl eval`: which weights on which data, the metrics, then the evaluation's files."""
    lines = [f"# {record['weights']} on {record['data']} ({record['split']})", "",
             f"{record['samples']} samples; test-time augmentation: {record['tta']}.", "",
             "| acc | macro-F1 | balanced acc | loss |", "| --- | --- | --- | --- |",
             f"| {record['acc']:.4f} | {record['macro_f1']:.4f} | {record['balanced_acc']:.4f} | {record['loss']:.4f} |",
             ""] + _evaluation_lines(out, record["split"])
    (out / "report.md").write_text("\n".join(lines) + "\n")
