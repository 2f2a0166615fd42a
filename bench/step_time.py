"""Step time with the top k layer groups trainable against all groups trainable.

    python bench/step_time.py [--model tf_efficientnet_lite0] [--size 192] [--batch 32] [--steps 5]
        [--rounds 3] [--train all 7 6] [--no-channels-last] [--compile] [--json bench/results/X.json]

Autograd stops at the lowest parameter that requires grad, so a head-only step costs little more
than a forward pass; the ratios show what each stage of a plan costs relative to full training.
`--compile` also times a `torch.compile`d copy of the model (`model.compile`, inductor) with every
group trainable, interleaved with the eager rounds, and reports its first step (the compile).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from dtl.backbones import create_classifier
from dtl.finetune_plan import FinetunePlan, freeze_batchnorm, set_trainable
from dtl.layer_groups import layer_groups
from dtl.optimization import build_optimizer
from dtl.run_config import FinetuneConfig, OptimConfig, StageConfig
from result_header import result_header, write_result


def step_time(model, groups, k: int | str, x, y, steps: int, first: list | None = None) -> float:
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
        elif first is not None:
            first.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def write_json(args, n_groups: int, ms_each_round: dict, med: dict, compile_s: list) -> None:
    """The table with its command, machine and versions (dtl's commit included), as bench/results/ keeps them."""
    full = med["all"]
    rows = [{"trainable_groups": k, "ms_per_step": 1000 * t, "ms_each_round": ms_each_round[k],
             "img_per_s": args.batch / t, "vs_all": t / full} for k, t in med.items()]
    out = result_header(device=args.device, model=args.model, size=args.size, batch=args.batch,
                        channels_last=args.channels_last, groups=n_groups, rows=rows)
    if compile_s:
        out["compiled_first_step_s"] = compile_s  # each round's first step: the compile, then guards
    write_result(args.json, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1, help="measure every k this many times, interleaved; medians")
    p.add_argument("--train", nargs="*", type=lambda v: v if v == "all" else int(v),
                   help="the k's to time, numbers or 'all' (default: a spread); 'all' is always timed")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="dtl's runs use channels_last by default (model.channels_last)")
    p.add_argument("--compile", action="store_true",
                   help="also time a torch.compile'd copy with every group trainable (row 'all, compiled')")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the table here, with the command, machine and versions")
    args = p.parse_args()
    torch.manual_seed(0)
    model = create_classifier(args.model, 4)
    groups = layer_groups(model)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(args.device, memory_format=fmt)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device).contiguous(memory_format=fmt)
    y = torch.randint(0, 4, (args.batch,), device=args.device)
    ks = args.train or \
        [1, 2, 3, len(groups) // 2, len(groups) - 3, len(groups) - 2, len(groups) - 1]
    ks = list(dict.fromkeys(["all"] + [k for k in ks if k != "all" and 0 < k < len(groups)]))  # few groups: no repeats
    times: dict = {k: [] for k in ks}
    compiled, compile_s = None, []
    if args.compile:
        compiled = copy.deepcopy(model)
        compiled.compile()
        times["all, compiled"] = []
    for _ in range(args.rounds):
        for k in ks:
            times[k].append(step_time(model, groups, k, x, y, args.steps))
        if compiled is not None:
            times["all, compiled"].append(step_time(compiled, layer_groups(compiled), "all", x, y, args.steps,
                                                    compile_s))
    ks = list(times)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    full = med["all"]
    print(f"{args.model} @{args.size}px, batch {args.batch}, {len(groups)} groups, on {args.device}"
          f" ({torch.get_num_threads()} threads), channels_last {args.channels_last}, {args.rounds} round(s)")
    print(f"{'trainable':>10} {'ms/step':>9} {'img/s':>7} {'vs all':>7}")
    for k in ks:
        print(f"{str(k):>10} {1000 * med[k]:>9.1f} {args.batch / med[k]:>7.1f} {med[k] / full:>7.2f}")
    if args.json:
        write_json(args, len(groups), {k: [1000 * t for t in v] for k, v in times.items()}, med, compile_s)

if __name__ == "__main__":
    main()
