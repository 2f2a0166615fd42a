"""Step time with the top k layer groups trainable against all groups trainable.

    python bench/step_time.py [--model tf_efficientnet_lite0] [--size 160] [--batch 32] [--steps 5]

Autograd stops at the lowest parameter that requires grad, so a head-only step costs little more
than a forward pass; the ratios show what each stage of a plan costs relative to full training.
"""
from __future__ import annotations

import argparse
import time

import torch

from dtl.backbones import create_classifier
from dtl.finetune_plan import FinetunePlan, freeze_batchnorm, set_trainable
from dtl.layer_groups import layer_groups
from dtl.optimization import build_optimizer
from dtl.run_config import FinetuneConfig, OptimConfig, StageConfig


def step_time(model, groups, k: int | str, x, y, steps: int) -> float:
    cfg = FinetuneConfig(stages=[StageConfig(epoch=0, train=k)])
    plan = FinetunePlan(cfg, groups, 1e-3)
    trainable = plan.trainable(plan.stages[0])
    set_trainable(model, groups, trainable)
    opt = build_optimizer(model, plan, OptimConfig())
    model.train()
    freeze_batchnorm(model, groups, trainable)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
        if i:  # first step warms up
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    model = create_classifier(args.model, 4)
    groups = layer_groups(model)
    model.to(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, 4, (args.batch,), device=args.device)
    ks = [1, 2, 3, len(groups) // 2, len(groups) - 2, len(groups) - 1, "all"]
    full = step_time(model, groups, "all", x, y, args.steps)
    print(f"{args.model} @{args.size}px, batch {args.batch}, {len(groups)} groups, on {args.device}"
          f" ({torch.get_num_threads()} threads)")
    print(f"{'trainable':>10} {'ms/step':>9} {'img/s':>7} {'vs all':>7}")
    for k in ks:
        t = full if k == "all" else step_time(model, groups, k, x, y, args.steps)
        print(f"{str(k):>10} {1000 * t:>9.1f} {args.batch / t:>7.1f} {t / full:>7.2f}")


if __name__ == "__main__":
    main()
