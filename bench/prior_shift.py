"""How a run's test and validation numbers move when its logits are shifted by tau * log(class count).

    python bench/prior_shift.py runs/screen/s0 --json bench/results/X.json

Evaluates the run's best.safetensors once (validation as the run did, test with the config's
TTA), then re-decides on those probabilities for each tau, the same weights every time. On a run
without the correction (`eval.prior_correction=false`, or trained before it existed) tau =
data.balanced_sampling is the Bayes correction dtl now applies (dtl/prior_correction.py) and 0 is
none; on a run with it (its exports hold the offset in the head's bias) 0 is the correction and
tau = -data.balanced_sampling takes it back out.
"""
from __future__ import annotations

import argparse
import math
import sys
from contextlib import closing
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dtl.checkpoints import load_exported  # noqa: E402
from dtl.classification_metrics import confusion_update, summarize  # noqa: E402
from dtl.data_pipeline import Data, build_transform  # noqa: E402
from dtl.dataset_index import read_index, resolve_classes, split_source  # noqa: E402
from dtl.evaluation import evaluate  # noqa: E402
from dtl.parallel_strategy import ParallelStrategy  # noqa: E402
from dtl.run_config import AugmentConfig, load_config  # noqa: E402
from dtl.shard_stream import ShardStream, StreamOptions  # noqa: E402
from result_header import result_header, write_result  # noqa: E402

TAUS = [0.0, 0.25, 0.5, 0.75, 1.0, -0.25, -0.5]


def export_split(meta: dict, root: str, split: str, workers: int = 0) -> tuple[Data, ShardStream]:
    """One split of `root`, exactly once, with an export's own evaluation transform (64 a batch)."""
    index = read_index(root)
    classes = resolve_classes(root, None, index)
    stream = ShardStream(split_source(root, split, index, {}, {}),
                         build_transform(meta["preprocessing"], False, AugmentConfig()),
                         StreamOptions(classes=classes), 0, 1, workers)
    return Data(classes, stream, None, stream, 64, 64, workers), stream


def split_probs(weights: Path, root: str, split: str, tta: str) -> tuple[torch.Tensor, torch.Tensor]:
    model, meta = load_exported(str(weights))
    acc = Accelerator()
    data, stream = export_split(meta, root, split)
    with closing(data):
        r = evaluate(acc, ParallelStrategy(acc), acc.prepare_model(model, evaluation_mode=True), data, stream,
                     len(data.classes), split, meta["preprocessing"]["input_size"], tta=tta)
    return r.probs, r.labels


def scores(pred: torch.Tensor, labels: torch.Tensor, n: int) -> dict:
    """dtl's metrics (accuracy, macro-F1, balanced accuracy) of predictions, rounded, with the confusion."""
    cm = torch.zeros(n, n, dtype=torch.long)
    confusion_update(cm, pred, labels)
    return {**{k: round(float(v), 4) for k, v in summarize(cm).items()}, "confusion": cm.tolist()}


def decide(probs: torch.Tensor, labels: torch.Tensor, shift: torch.Tensor) -> dict:
    logits = probs.clamp_min(1e-12).log() + shift
    loss = round(float(torch.nn.functional.cross_entropy(logits, labels)), 4)
    return {**scores(logits.argmax(1), labels, probs.shape[1]), "loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--json")
    args = p.parse_args()
    run = Path(args.run)
    cfg = load_config(str(run / "config.yaml"), [])
    counts = read_index(cfg.data.root)["splits"][cfg.data.train_split]["class_counts"]
    log_counts = torch.tensor([math.log(max(1, c)) for c in counts])
    rows = {}
    for split, tta in (("val", cfg.eval.tta if cfg.eval.tta_val else "none"), ("test", cfg.eval.tta)):
        probs, labels = split_probs(run / "best.safetensors", cfg.data.root, split, tta)
        rows[split] = {str(tau): decide(probs, labels, tau * log_counts) for tau in TAUS}
    result = result_header(run=str(run), train_class_counts=counts, balanced_sampling=cfg.data.balanced_sampling,
                           by_tau=rows)
    for split, by in rows.items():
        for tau, m in by.items():
            print(f"{split} tau {tau:>5}: acc {m['acc']:.3f} macro-F1 {m['macro_f1']:.3f} loss {m['loss']:.3f}")
    if args.json:
        write_result(args.json, result)


if __name__ == "__main__":
    main()
