"""dtl against timm's train.py, side by side on one machine: wall time, img/s, test accuracy per
epoch and time to reach timm's final test accuracy.

    python bench/vs_timm.py --epochs 10 --repeats 2 --json bench/results/vs_timm_elpv_cpu_10ep.json

Both tools get the quickstart split (dtl's shards; exported once as an ImageFolder tree for timm),
the same backbone and the same offline ImageNet tensors (timm through `--pretrained-path`, its head
reset to the dataset's classes), the same resolution, interpolation and normalisation, batch size,
epoch budget, optimizer (AdamW, cosine, the config's rate, weight decay and label smoothing), flips,
crop scale and ratio, `channels_last` and data workers: timm's arguments are read from dtl's config
(with `--dtl-set` applied) and dtl's preprocessing for the backbone.
dtl runs its quickstart config as a user would (its plan: the probe, then the layers its stages
name); timm runs a plain fine-tune of every layer, its usual recipe (train.py cannot freeze groups).
The img/s goal is about the fully unfrozen step, so `img_per_s_ratio` takes only dtl's epochs that
train every group (None if the plan never does; `plan_img_per_s_ratio` takes them all). The tools
alternate (dtl, timm, dtl, timm, ...) so that a slow spell of the shared machine hits both.

dtl may train on class-balanced epochs (`data.balanced_sampling`, the quickstart's; timm's train.py
has no such sampler, so timm trains on the data as it is, its usual recipe): dtl's per-epoch
checkpoints hold the raw weights, so they are tested with the prior correction dtl's evaluation adds
and its exports fold in (`eval.prior_correction`), i.e. as the model dtl would hand over after that
epoch; the probe (trained unresampled), best and final exports need none. `data.class_weights`
tilts the prior the same way and gets the same correction.

dtl's first point is its probe (`probe.safetensors`, "epoch 0"): a model it hands the user when the
probe ends, so it counts for the time to reach timm's final accuracy as any epoch's weights do.

Test accuracy per epoch: every epoch's weights (dtl keeps every checkpoint, timm every epoch's via
`--checkpoint-hist`) are evaluated afterwards, outside the timed runs, by one function with one eval
transform for both, so the numbers differ only by what the tools trained. The wall clock of each
epoch end comes from dtl's metrics.jsonl and from the time timm's log line of the epoch's
checkpoint arrives.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import torch

from imagefolder_export import export_imagefolder
from process_watch import ProcessWatch
from result_header import result_header, write_result

REPO = Path(__file__).resolve().parent.parent
TIMM_TRAIN = REPO / "bench" / "third_party" / "timm_train.py"
sys.path.insert(0, str(REPO))


def timm_weights(backbone: str, out: Path) -> Path:
    """The offline ImageNet tensors dtl loads, saved under timm's key names (no head)."""
    import timm
    from safetensors.torch import save_file

    from dtl.backbones import offline_state_dict

    model = timm.create_model(backbone, pretrained=False)
    sd = {k: v.contiguous() for k, v in offline_state_dict(backbone, model).items()}
    path = out / f"{backbone}_imagenet.safetensors"
    save_file(sd, str(path))
    return path


def run_dtl(args, out: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "dtl/train.py", "--config", args.config, f"output_dir={out}", f"epochs={args.epochs}",
           f"data.root={args.data}", f"checkpoint.keep={args.epochs + 1}", "wandb.enabled=false", "report=false",
           f"seed={args.seed}", *args.dtl_set]
    w = ProcessWatch(cmd, out.parent / f"{out.name}.log", env, REPO)
    if w.rc:
        raise SystemExit(f"dtl failed ({w.rc}): {out.parent / (out.name + '.log')}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "train/acc" in r]
    t0 = w.start
    ckpts = sorted((out / "checkpoints").glob("ckpt-*"))
    per_epoch = []
    for r, ck in zip(epochs, ckpts[-len(epochs):]):
        per_epoch.append({"epoch": r["epoch"], "t_s": r["time"] - t0, "weights": str(ck / "model.safetensors"),
                          "img_per_s": r.get("train/img_per_s"), "val_acc": r.get("val/acc"),
                          "all_trainable": r.get("trainable_params") == args.params,
                          "logit_offset": args.offset})
    probe = next((r for r in records if "probe/epochs" in r), None)
    if probe is not None and (out / "probe.safetensors").is_file():  # the probe's model is usable when it ends
        per_epoch.insert(0, {"epoch": 0, "t_s": probe["time"] - t0, "weights": str(out / "probe.safetensors"),
                             "img_per_s": None, "val_acc": probe.get("val/acc"), "probe": True})
    summary = json.loads((out / "summary.json").read_text())
    return {"tool": "dtl", "command": shlex.join(cmd), "wall_s": w.wall, "peak_rss_gb": w.peak_rss / 2**30,
            "epochs": per_epoch, "best_weights": str(out / "best.safetensors"),
            "final_weights": str(out / "model.safetensors"), "summary_test_acc": summary.get("test/acc")}


def dtl_config(args):
    """dtl's run config with the bench's overrides: the source of timm's matching arguments. Fills
    `args.img_size` / `args.backbone` from it when not given, and refuses what timm cannot match."""
    from dtl.run_config import load_config

    cfg = load_config(REPO / args.config, [f"data.root={REPO / args.data}", *args.dtl_set])
    args.img_size = args.img_size or cfg.data.img_size
    args.backbone = args.backbone or cfg.model.backbone
    if cfg.data.img_size != args.img_size or cfg.model.backbone != args.backbone:
        raise SystemExit(f"--img-size/--backbone ({args.img_size}, {args.backbone}) differ from {args.config}'s "
                         f"({cfg.data.img_size}, {cfg.model.backbone})")
    if cfg.optim.schedule != "cosine":
        raise SystemExit(f"{args.config}: optim.schedule={cfg.optim.schedule}; this bench maps cosine only")
    if cfg.data.augment.rot90 or cfg.eval.tta == "dihedral":
        raise SystemExit(f"{args.config}: timm's train.py has no quarter turns (augment.rot90, tta dihedral); "
                         f"--dtl-set data.augment.rot90=0 eval.tta=flips compares the rest")
    return cfg


def epoch_offset(cfg) -> list[float] | None:
    """The logit offset dtl's evaluation adds to (and its exports fold into) weights trained on
    balanced epochs or with class weights (dtl/prior_correction.py): the per-epoch checkpoints hold
    the raw weights, so they are tested with it, as the model dtl would hand over after that epoch."""
    from dtl.prior_correction import indexed_offset

    offset = indexed_offset(cfg)
    return None if offset is None else offset.tolist()


def backbone_preprocessing(cfg) -> dict:
    """dtl's preprocessing for the config's backbone (size, interpolation, mean/std, crop): what timm
    is told, and the one eval transform both tools are tested with."""
    import timm

    from dtl.backbones import preprocessing

    return preprocessing(timm.create_model(cfg.model.backbone, pretrained=False), cfg.data.img_size, cfg.data.crop_pct)


def backbone_inputs(cfg) -> tuple[dict, int]:
    """The preprocessing and the dataset's class count."""
    from dtl.data_pipeline import run_classes

    return backbone_preprocessing(cfg), len(run_classes(cfg.data))


def timm_args(cfg, pre: dict) -> list[str]:
    """timm train.py's flags for the settings of dtl's config and its preprocessing `pre`: the same
    recipe in both tools. timm's warmup counts whole epochs (1 here; dtl's config may say 0.5)."""
    d, aug, o = cfg.data, cfg.data.augment, cfg.optim
    flags = ["--batch-size", str(d.batch_size), "--validation-batch-size", str(d.batch_size),
             "--workers", str(d.num_workers), "--train-interpolation", pre["interpolation"],
             "--opt", o.name, "--momentum", str(o.effective_momentum()), "--lr", str(o.lr),
             "--weight-decay", str(o.weight_decay), "--sched", o.schedule,
             "--min-lr", str(o.lr * o.min_lr_ratio), "--smoothing", str(o.label_smoothing),
             "--grad-accum-steps", str(o.grad_accum_steps),
             "--hflip", str(aug.hflip), "--vflip", str(aug.vflip), "--scale", *map(str, aug.crop_scale),
             "--ratio", *map(str, aug.crop_ratio), "--color-jitter", str(aug.color_jitter or 0),
             "--reprob", str(aug.random_erasing), "--mixup", str(aug.mixup), "--cutmix", str(aug.cutmix),
             "--mixup-prob", str(aug.mix_prob)]
    if d.crop_pct is not None:
        flags += ["--crop-pct", str(d.crop_pct)]
    if aug.auto_augment:
        flags += ["--aa", aug.auto_augment]
    if o.clip_grad_norm:
        flags += ["--clip-grad", str(o.clip_grad_norm)]
    return flags


def run_timm(args, out: Path, folder: Path, weights: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, str(TIMM_TRAIN), "--data-dir", str(folder), "--train-split", "train", "--val-split", "val",
           "--model", args.backbone, "--pretrained", "--pretrained-path", str(weights),
           "--num-classes", str(args.num_classes), "--img-size", str(args.img_size),
           "--mean", *map(str, args.pre["mean"]), "--std", *map(str, args.pre["std"]),
           "--interpolation", args.pre["interpolation"], "--epochs", str(args.epochs), "--sched-on-updates", "--warmup-epochs", "1",
           "--warmup-lr", "1e-5", *timm_args(args.cfg, args.pre), "--channels-last",
           "--checkpoint-hist", str(args.epochs + 1), "--log-interval", "10", "--seed", str(args.seed),
           "--output", str(out), "--experiment", "run", "--device", "cuda" if torch.cuda.is_available() else "cpu"]
    w = ProcessWatch(cmd, out.parent / f"{out.name}.log", env, REPO)
    if w.rc:
        raise SystemExit(f"timm train.py failed ({w.rc}): {out.parent / (out.name + '.log')}")
    run = out / "run"
    # the epoch's checkpoint is written right after its validation; its log line times the epoch end
    ends: dict[int, float] = {}
    rates: dict[int, float] = {}
    for t, line in w.lines:
        if m := re.search(r"checkpoint-(\d+)\.pth\.tar", line):
            ends.setdefault(int(m.group(1)), t)
        if m := re.match(r"Train: (\d+) \[.*\(\s*[\d.]+s,\s*([\d.]+)/s\)", line):
            rates[int(m.group(1))] = float(m.group(2))  # the last line of an epoch: its average rate
    per_epoch = [{"epoch": e + 1, "t_s": ends[e], "weights": str(run / f"checkpoint-{e}.pth.tar"),
                  "img_per_s": rates.get(e)} for e in sorted(ends)]
    return {"tool": "timm", "command": shlex.join(cmd), "wall_s": w.wall, "peak_rss_gb": w.peak_rss / 2**30,
            "epochs": per_epoch, "best_weights": str(run / "model_best.pth.tar"),
            "final_weights": str(run / "last.pth.tar")}


def load_weights(backbone: str, path: str, num_classes: int) -> torch.nn.Module:
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(backbone, num_classes=num_classes)
    if path.endswith(".safetensors"):
        sd = {k.removeprefix("module."): v for k, v in load_file(path).items()}
        model.load_state_dict(sd)
    else:
        timm.models.load_checkpoint(model, path)
    return model.eval()


def test_metrics(model: torch.nn.Module, folder: Path, pre: dict, offset: list[float] | None = None) -> dict:
    """Accuracy and macro-F1 on the test split, one eval transform (dtl's for the backbone) for both
    tools; `offset` is added to the logits (a dtl checkpoint trained on a tilted prior)."""
    from torchvision.datasets import ImageFolder

    from dtl.classification_metrics import confusion_update, summarize
    from dtl.data_pipeline import build_transform
    from dtl.evaluation import predict_logits
    from dtl.run_config import AugmentConfig

    ds = ImageFolder(str(folder / "test"), transform=build_transform(pre, False, AugmentConfig()))
    cm = torch.zeros(len(ds.classes), len(ds.classes), dtype=torch.long)
    with torch.inference_mode():
        for x, y in torch.utils.data.DataLoader(ds, batch_size=64, num_workers=2):
            logits = predict_logits(model, x, "none", None if offset is None else torch.tensor(offset))
            confusion_update(cm, logits.argmax(1), y)
    m = summarize(cm)
    return {"acc": m["acc"], "macro_f1": m["macro_f1"]}


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def model_params(cfg, num_classes: int) -> int:
    """The parameter count of the classifier dtl builds from `cfg` (its head options included): an
    epoch that trains this many trains every group."""
    from dtl.backbones import create_classifier
    from dtl.run_finish import model_build

    return sum(p.numel() for p in create_classifier(cfg.model.backbone, num_classes, **model_build(cfg)).parameters())


def time_to(epochs: list[dict], target: float) -> float | None:
    return next((e["t_s"] for e in epochs if e["test_acc"] >= target - 1e-9), None)


def pair_summary(dtl_run: dict, timm_run: dict) -> dict:
    """One dtl/timm pair: time to timm's final test accuracy and the img/s ratios. `img_per_s_ratio`
    is the issue's: dtl's fully unfrozen epochs against timm's (None when dtl's plan keeps groups
    frozen throughout); `plan_img_per_s_ratio` takes dtl's epochs as its plan ran them."""
    target = timm_run["final_test_acc"]
    t_dtl, t_timm = time_to(dtl_run["epochs"], target), time_to(timm_run["epochs"], target)
    t_tuned = time_to([e for e in dtl_run["epochs"] if not e.get("probe")], target)
    full = [e["img_per_s"] for e in dtl_run["epochs"] if e["img_per_s"] and e.get("all_trainable")]
    planned = [e["img_per_s"] for e in dtl_run["epochs"] if e["img_per_s"]]
    rate_timm = [e["img_per_s"] for e in timm_run["epochs"] if e["img_per_s"]]
    return {"timm_final_test_acc": target, "dtl_time_to_timm_final_s": t_dtl,
            "timm_time_to_own_final_s": t_timm, "timm_wall_s": timm_run["wall_s"], "dtl_wall_s": dtl_run["wall_s"],
            "time_to_accuracy_ratio": (t_dtl / timm_run["wall_s"]) if t_dtl is not None else None,
            "dtl_finetuned_time_to_timm_final_s": t_tuned,   # the probe's point left out
            "finetuned_time_to_accuracy_ratio": (t_tuned / timm_run["wall_s"]) if t_tuned is not None else None,
            "wall_ratio": dtl_run["wall_s"] / timm_run["wall_s"],
            "img_per_s_ratio": median(full) / median(rate_timm) if full and rate_timm else None,
            "plan_img_per_s_ratio": median(planned) / median(rate_timm) if planned and rate_timm else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--data", default="data/elpv")
    p.add_argument("--backbone", help="default: the config's (a check: the two must agree)")
    p.add_argument("--img-size", type=int, help="default: the config's data.img_size (a check)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="dtl, timm pairs, alternating")
    p.add_argument("--out", default="runs/bench-vs-timm")
    p.add_argument("--dtl-set", nargs="*", default=[], help="extra dtl overrides")
    p.add_argument("--json")
    args = p.parse_args()
    args.cfg = dtl_config(args)  # checked before any run; timm's flags come from it
    args.pre, args.num_classes = backbone_inputs(args.cfg)
    args.params = model_params(args.cfg, args.num_classes)
    args.offset = epoch_offset(args.cfg)
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "imagefolder"
    counts = export_imagefolder(REPO / args.data, folder)
    weights = timm_weights(args.backbone, out)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}  # lines timed as they arrive
    runs = []
    for r in range(args.repeats):
        runs.append(run_dtl(args, out / f"dtl-{r}", env))
        runs.append(run_timm(args, out / f"timm-{r}", folder, weights, env))
    torch.set_num_threads(os.cpu_count() or 1)
    for run in runs:
        for e in run["epochs"]:
            m = test_metrics(load_weights(args.backbone, e["weights"], args.num_classes), folder, args.pre,
                             e.get("logit_offset"))
            e["test_acc"], e["test_macro_f1"] = m["acc"], m["macro_f1"]
        for which in ("best", "final"):
            m = test_metrics(load_weights(args.backbone, run[f"{which}_weights"], args.num_classes), folder, args.pre)
            run[f"{which}_test_acc"], run[f"{which}_test_macro_f1"] = m["acc"], m["macro_f1"]
        print(f"{run['tool']:5s} wall {run['wall_s']:7.1f} s  final test acc {run['final_test_acc']:.4f} "
              f"f1 {run['final_test_macro_f1']:.4f}  best {run['best_test_acc']:.4f}  "
              f"img/s {[round(e['img_per_s'] or 0, 1) for e in run['epochs']]}")
    pairs = []
    for dtl_run, timm_run in zip(runs[::2], runs[1::2]):
        pairs.append(pair_summary(dtl_run, timm_run))
        print(json.dumps(pairs[-1]))
    result = result_header(samples=counts, runs=runs, pairs=pairs)
    result["versions"]["timm_train"] = "bench/third_party/timm_train.py"
    if args.json:
        write_result(args.json, result)


if __name__ == "__main__":
    main()
