"""Can a new head on a finished run's features buy macro-F1? Classifier re-training (cRT) and tau-norm
(Kang et al., ICLR 2020, "Decoupling Representation and Classifier for Long-Tailed Recognition"),
applied after the fact to the selected weights of runs that already exist.

    python bench/head_retrain.py runs/s_base/your_plan-seed0 runs/s_base/your_plan-seed1 ... --json X.json

Per run: the pooled pre-logit features of best.safetensors on the training split (the clean view),
validation (plain, as the run selected on it) and test (the flips TTA, as the run tested: the
softmax averaged over the views). Then, on the same features:
- `selected head`: the run's own head (reproduces the run's test metrics);
- `tau-norm t`: the head's class weight vectors divided by their norm ** t, bias dropped;
- `cRT p wd`: a new linear head fitted to convergence (L-BFGS) on the training features with each
  sample weighted by count(class) ** -p, L2 `wd`; `+corr` adds p * log(count) back (dtl's prior
  correction).
A head fitted on features the backbone was trained on cannot repair classes the features do not
separate (the likely_defective AUC of about 0.66: bench/results/decision_rules_quickstart_cpu.json).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from contextlib import closing
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prior_shift import decide, export_split  # noqa: E402
from result_header import result_header, write_result  # noqa: E402

from dtl.checkpoints import load_exported  # noqa: E402
from dtl.evaluation import tta_views  # noqa: E402
from dtl.run_config import load_config  # noqa: E402

WORKERS = 2


def features(run: Path) -> dict:
    """Head weights and (features [N, views, D], labels) per split; cached beside the run."""
    path = run / "posthoc_feats.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    cfg = load_config(str(run / "config.yaml"), [])
    model, meta = load_exported(str(run / "best.safetensors"))
    head, grab = model.get_classifier(), {}
    head.register_forward_pre_hook(lambda m, a: grab.__setitem__("x", a[0].detach()))
    out = {"W": head.weight.detach().clone(), "b": head.bias.detach().clone()}
    for split, tta in (("train", "none"), ("val", "flips"), ("test", cfg.eval.tta)):
        data, stream = export_split(meta, cfg.data.root, split, WORKERS)
        xs, ys = [], []
        with closing(data), torch.no_grad():
            for batch in data.loader(stream):
                views = []
                for v in tta_views(batch["image"].float(), tta):
                    model(v)
                    views.append(grab["x"])
                xs.append(torch.stack(views, 1))
                ys.append(batch["label"])
        out[split] = (torch.cat(xs), torch.cat(ys))
    torch.save(out, path)
    return out


def head_metrics(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict:
    """dtl's metrics of the head (W, b) on features x [N, views, D]: softmax averaged over the views."""
    return decide((x @ W.T + b).softmax(-1).mean(1), y, torch.zeros(W.shape[0]))


def refit(x: torch.Tensor, y: torch.Tensor, power: float, wd: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    counts = torch.bincount(y, minlength=n).float()
    w = counts[y] ** -power
    w = w / w.mean()
    lin = torch.nn.Linear(x.shape[1], n)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (F.cross_entropy(lin(x), y, reduction="none") * w).mean() + wd * lin.weight.pow(2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return lin.weight.detach(), lin.bias.detach()


def one_run(run: Path) -> dict:
    d = features(run)
    (xtr, ytr), (xv, yv), (xt, yt) = d["train"], d["val"], d["test"]
    W, b = d["W"], d["b"]
    n = W.shape[0]
    xv = xv[:, :1]  # validation as the run selected on it: plain
    heads = {"selected head": (W, b)}
    for t in (0.5, 1.0):
        heads[f"tau-norm {t}"] = (W / W.norm(dim=1, keepdim=True) ** t, torch.zeros_like(b))
    counts = torch.bincount(ytr, minlength=n).float()
    for p, wd in itertools.product((0.0, 0.5, 1.0), (1e-4, 1e-3, 1e-2)):
        Wn, bn = refit(xtr[:, 0], ytr, p, wd, n)
        heads[f"cRT p{p} wd{wd}"] = (Wn, bn)
        if p:
            off = p * counts.log()
            heads[f"cRT p{p} wd{wd} +corr"] = (Wn, bn + off - off.mean())
    return {"run": str(run), "heads": {k: {"val": head_metrics(*h, xv, yv), "test": head_metrics(*h, xt, yt)}
                                       for k, h in heads.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--json")
    args = p.parse_args()
    rows = [one_run(Path(r)) for r in args.runs]
    summary = {}
    for k in rows[0]["heads"]:
        summary[k] = {f"{split}/{m}": round(sum(r["heads"][k][split][m] for r in rows) / len(rows), 4)
                      for split in ("val", "test") for m in ("acc", "macro_f1", "loss")}
        summary[k]["test/macro_f1 per run"] = [r["heads"][k]["test"]["macro_f1"] for r in rows]
        s = summary[k]
        print(f"{k:24s} val acc {s['val/acc']:.3f} F1 {s['val/macro_f1']:.3f} | test acc {s['test/acc']:.3f} "
              f"F1 {s['test/macro_f1']:.3f} {s['test/macro_f1 per run']}")
    if args.json:
        write_result(args.json, result_header(runs=rows, summary=summary))


if __name__ == "__main__":
    main()
