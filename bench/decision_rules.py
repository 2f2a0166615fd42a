"""Can a decision rule chosen on validation buy macro-F1 on test? Per run: the selected weights'
probabilities on validation and test, each class's one-vs-rest AUC, and three rules re-deciding on
those same probabilities.

    python bench/decision_rules.py runs/prior3/your_plan-seed0 runs/prior3/your_plan-seed1 ... --json X.json

Rules: `argmax` (what dtl predicts); `val_tuned_offsets`: per-class logit offsets (a grid, class 0
fixed at 0) picked for the best validation macro-F1, then applied to test; `expected_grade`: for
classes that are ordered levels (ELPV's defect probabilities 0, 1/3, 2/3, 1), the probability-weighted
level rounded to the nearest class. Validation is plain (as the run selected on it), test uses the
config's TTA, both through dtl's own evaluation (`prior_shift.split_probs`). A class whose AUC is
near 0.5 cannot be rescued by any rule on these weights: the model does not see it.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prior_shift import scores, split_probs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dtl.run_config import load_config  # noqa: E402
from result_header import result_header, write_result  # noqa: E402

GRID = [x / 4 for x in range(-4, 9)]  # -1 .. 2 in steps of 0.25


def metrics(pred: torch.Tensor, labels: torch.Tensor, n: int) -> dict:
    m = scores(pred, labels, n)
    return {"acc": m["acc"], "macro_f1": m["macro_f1"], "confusion": m["confusion"]}


def tuned_offsets(probs: torch.Tensor, labels: torch.Tensor) -> list[float]:
    n = probs.shape[1]
    best = None
    for rest in itertools.product(GRID, repeat=n - 1):
        off = torch.tensor([0.0, *rest])
        f1 = metrics((probs.clamp_min(1e-12).log() + off).argmax(1), labels, n)["macro_f1"]
        if best is None or f1 > best[0]:
            best = (f1, off)
    return best[1].tolist()


def one_run(run: Path) -> dict:
    cfg = load_config(str(run / "config.yaml"), [])
    pv, yv = split_probs(run / "best.safetensors", cfg.data.root, "val", cfg.eval.tta if cfg.eval.tta_val else "none")
    pt, yt = split_probs(run / "best.safetensors", cfg.data.root, "test", cfg.eval.tta)
    n = pt.shape[1]
    off = tuned_offsets(pv, yv)
    shifted = lambda p: (p.clamp_min(1e-12).log() + torch.tensor(off)).argmax(1)  # noqa: E731
    levels = torch.linspace(0, 1, n)
    grade = lambda p: ((p * levels).sum(1) * (n - 1)).round().long()  # noqa: E731
    return {"run": str(run),
            "test_auc_one_vs_rest": [round(roc_auc_score(yt == c, pt[:, c]), 4) for c in range(n)],
            "val_auc_one_vs_rest": [round(roc_auc_score(yv == c, pv[:, c]), 4) for c in range(n)],
            "argmax": {"val": metrics(pv.argmax(1), yv, n), "test": metrics(pt.argmax(1), yt, n)},
            "val_tuned_offsets": {"offsets": off, "val": metrics(shifted(pv), yv, n), "test": metrics(shifted(pt), yt, n)},
            "expected_grade": {"val": metrics(grade(pv), yv, n), "test": metrics(grade(pt), yt, n)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--json")
    args = p.parse_args()
    rows = [one_run(Path(r)) for r in args.runs]
    for r in rows:
        print(r["run"], "test AUC", r["test_auc_one_vs_rest"])
        for rule in ("argmax", "val_tuned_offsets", "expected_grade"):
            v, t = r[rule]["val"], r[rule]["test"]
            print(f"  {rule:18s} val acc {v['acc']:.3f} F1 {v['macro_f1']:.3f} | test acc {t['acc']:.3f} F1 {t['macro_f1']:.3f}")
    if args.json:
        write_result(args.json, result_header(runs=rows))


if __name__ == "__main__":
    main()
