"""Which `checkpoint.monitor` picks the best test model? Every epoch's weights of the quickstart,
tested, and each selection rule's pick among them (and the probe), over several seeds.

    python bench/selection_rules.py --seeds 0 1 2 --json bench/results/selection_rules_elpv_cpu.json

Runs the config once per seed keeping every epoch's checkpoint (`checkpoint.keep`), then tests the
probe and every epoch's weights with the config's test-time augmentation, on the same inputs as dtl's
own test (its eval transform and shard stream). A rule picks on validation, as `checkpoint.monitor`
does (the first of equal values, as dtl keeps the earlier best); the test metrics of its pick are
reported. The test split is only read to score the picks, never to make them: a rule chosen from
this table has still been chosen on test, so quote it as such.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from result_header import result_header, write_result

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RULES = {"val/loss": min, "val/acc": max, "val/macro_f1": max, "val/balanced_acc": max}


def train(config: str, seed: int, out: Path, overrides: list[str]) -> float:
    epochs = int(subprocess.run([sys.executable, "-c", f"from dtl.run_config import load_config; "
                                 f"print(load_config({config!r}, {overrides!r}).epochs)"],
                                capture_output=True, text=True, check=True, cwd=REPO).stdout)
    cmd = [sys.executable, "-m", "dtl.train", "--config", config, f"output_dir={out}", f"seed={seed}",
           "wandb.enabled=false", "report=false", "resume=never", f"checkpoint.keep={epochs + 1}", *overrides]
    t = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.time() - t


def test_all(out: Path) -> list[dict]:
    """The probe and each epoch: its validation record and its test metrics (the run's own TTA)."""
    import timm
    from safetensors.torch import load_file

    from dtl.backbones import preprocessing
    from dtl.classification_metrics import confusion_update, summarize
    from dtl.data_pipeline import build_transform
    from dtl.dataset_index import read_index, resolve_classes, split_source
    from dtl.device_batches import as_input
    from dtl.evaluation import predict_logits
    from dtl.prior_correction import indexed_offset
    from dtl.run_config import AugmentConfig, load_config
    from dtl.shard_stream import ShardStream, StreamOptions, make_loader

    cfg = load_config(out / "config.yaml")
    classes = resolve_classes(cfg.data.root, None, read_index(cfg.data.root))
    net = timm.create_model(cfg.model.backbone, num_classes=len(classes)).eval()
    pre = preprocessing(net, cfg.data.img_size, cfg.data.crop_pct)
    stream = ShardStream(split_source(cfg.data.root, "test", read_index(cfg.data.root), {}, {}),
                         build_transform(pre, False, AugmentConfig()), StreamOptions(classes=classes), 0, 1, 2)
    batches = [(as_input(b["image"], torch.device("cpu"), cfg.model.channels_last, None), b["label"])
               for b in make_loader(stream, 64, 2)]
    if cfg.model.channels_last:
        net = net.to(memory_format=torch.channels_last)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    probe = next(r for r in records if "probe/epochs" in r)
    epochs = [r for r in records if "train/acc" in r]
    ckpts = sorted((out / "checkpoints").glob("ckpt-*"))[-len(epochs):]
    rows = []
    # checkpoints hold the raw weights: tested with the prior correction the run's evaluation added
    # (and its exports fold in) when it trained on balanced epochs; the probe trained unresampled
    offset = indexed_offset(cfg)
    for name, rec, weights in [("probe", probe, out / "probe.safetensors"),
                               *[(f"epoch {r['epoch']}", r, c / "model.safetensors") for r, c in zip(epochs, ckpts)]]:
        net.load_state_dict({k.removeprefix("module."): v for k, v in load_file(str(weights)).items()})
        cm = torch.zeros(len(classes), len(classes), dtype=torch.long)
        with torch.inference_mode():
            for x, y in batches:
                logits = predict_logits(net, x, cfg.eval.tta, None if name == "probe" else offset)
                confusion_update(cm, logits.argmax(1), y)
        m = summarize(cm)
        rows.append({"candidate": name, **{k: rec[k] for k in RULES if k in rec},
                     "test/acc": m["acc"], "test/macro_f1": m["macro_f1"], "test/balanced_acc": m["balanced_acc"]})
    return rows


def pick(rows: list[dict], key: str) -> dict:
    best = RULES[key]
    value = best(r[key] for r in rows)
    return next(r for r in rows if r[key] == value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/bench-selection")
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(2)
    result = result_header(config=args.config, overrides=args.set, seeds={})
    for seed in args.seeds:
        out = REPO / args.out / f"seed{seed}"
        wall = train(args.config, seed, out, args.set)
        rows = test_all(out)
        picks = {k: pick(rows, k)["candidate"] for k in RULES}
        result["seeds"][seed] = {"wall_s": round(wall, 1), "candidates": rows, "picks": picks}
        print(f"seed {seed} ({wall:.0f} s): " + "; ".join(
            f"{k} -> {c}" for k, c in picks.items()), flush=True)
    summary = {}
    for k in RULES:
        picked = [next(r for r in s["candidates"] if r["candidate"] == s["picks"][k]) for s in result["seeds"].values()]
        summary[k] = {m: {"mean": statistics.mean(r[m] for r in picked),
                          "sd": statistics.stdev(r[m] for r in picked) if len(picked) > 1 else 0.0,
                          "per_seed": [round(r[m], 4) for r in picked]} for m in ("test/acc", "test/macro_f1")}
        print(f"monitor {k:18s} test acc {summary[k]['test/acc']['mean']:.4f} +- {summary[k]['test/acc']['sd']:.4f} "
              f"{summary[k]['test/acc']['per_seed']}  macro-F1 {summary[k]['test/macro_f1']['mean']:.4f} +- "
              f"{summary[k]['test/macro_f1']['sd']:.4f} {summary[k]['test/macro_f1']['per_seed']}")
    result["summary"] = summary
    if args.json:
        write_result(args.json, result)


if __name__ == "__main__":
    main()
