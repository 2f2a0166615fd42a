"""The `dtl` command: write shards, show a model's layer groups, list config keys, predict, train,
launch on Slurm. Exit codes: 0 done, 2 a problem with the input (one line names it), else a bug."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from dtl.user_errors import DtlError, print_error


def _int_at_least(low: int):
    """argparse type: an integer of at least `low` (1: a batch size, k, a step count; 0: workers)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text}: must be at least {low}")
        return value
    parse.__name__ = "int"  # argparse's "invalid int value: 'x'" for a non-number
    return parse


def _positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (a learning rate)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number above 0")
    return value


_positive_float.__name__ = "float"


def _split_spec(text: str) -> tuple[str, str]:
    """argparse type: NAME=PATTERN (a split and its shards)."""
    name, eq, pattern = text.partition("=")
    if not eq or not name or not pattern:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATTERN, e.g. train='train-{{0000..0009}}.tar'")
    return name, pattern


_split_spec.__name__ = "split"

EPILOG = "Exit codes: 0 done; 2 a problem with the input, named in one line; anything else is a bug in dtl."


def _shards(args: argparse.Namespace) -> None:
    from dtl import shard_writer

    if args.source == "index":
        splits = dict(args.split)
        index = shard_writer.index_shards(args.out, splits, args.classes.split(","), args.label_field)
    else:
        common = dict(val_fraction=args.val, test_fraction=args.test, seed=args.seed, maxcount=args.maxcount)
    if args.source == "elpv":
        index = shard_writer.write_elpv(args.out, **common)
    elif args.source == "imagefolder":
        index = shard_writer.write_imagefolder(args.input, args.out, **common)
    for name, split in index["splits"].items():
        print(f"{name}: {split['count']} samples in {len(split['shards'])} shards, per class {split['class_counts']}")
    print(f"classes: {index['classes']}\nwrote {args.out}/dataset.json")


def _groups(args: argparse.Namespace) -> None:
    from dtl.backbones import create_classifier
    from dtl.layer_groups import GroupingError, describe_groups, layer_groups

    model = create_classifier(args.model, args.num_classes, pretrained=False)
    try:
        groups = layer_groups(model, "fine" if args.fine else "coarse", args.regex or None)
    except GroupingError as e:  # the config key's message, about the option given here
        raise GroupingError(str(e).replace("finetune.group_regex", "--regex")) from None
    how = "by your regexes" if args.regex else ("fine" if args.fine else "coarse")
    print(f"{args.model}: {len(groups)} layer groups ({how}), input -> head")
    print(describe_groups(model, groups))


def _config(args: argparse.Namespace) -> None:
    from importlib.resources import files

    from dtl.config_reference import format_reference

    if args.template:  # package data, so an installed wheel has it too (configs/own_data.yaml links to it)
        print(files("dtl").joinpath("config_templates/own_data.yaml").read_text(), end="")
    else:
        print(format_reference())


def _predict(args: argparse.Namespace) -> int:
    import csv

    from pathlib import Path

    from dtl.predict import predict_files

    if args.csv and (Path(args.csv).is_dir() or not Path(args.csv).parent.is_dir()):
        raise DtlError(f"--csv {args.csv}: {'a folder' if Path(args.csv).is_dir() else 'its folder does not exist'}; "
                       f"give a file path in an existing folder")
    results = predict_files(args.weights, args.images, args.top_k, args.batch_size, args.device, args.tta)
    failed = total = 0
    sink = open(args.csv, "w", newline="") if args.csv else None
    writer = csv.writer(sink) if sink else None
    if writer:
        writer.writerow(["image", "class", "prob", "error"])
    try:
        for r in results:
            total += 1
            failed += "error" in r
            if writer:
                best = r.get("predictions", [{}])[0]
                writer.writerow([r["image"], best.get("class", ""), best.get("prob", ""), r.get("error", "")])
            else:
                print(json.dumps(r), flush=True)
    finally:
        if sink:
            sink.close()
    if args.csv:
        print(f"{total - failed} of {total} images classified; wrote {args.csv}")
    if failed:
        print(f"dtl: error: {failed} of {total} images could not be read (see their 'error')", file=sys.stderr)
        return 2
    return 0


def _compare(args: argparse.Namespace) -> None:
    from dtl.recipe_compare import compare, table

    result = compare(args.config, args.seeds, args.out, args.only, args.set, args.full_lr)
    print(f"{args.config}, seeds {args.seeds}: linear probe vs full fine-tuning vs your plan, same split and epochs")
    print(table(result["summary"]))
    print(f"wrote {args.out}/compare.json")


def _lr_find(args: argparse.Namespace) -> None:
    from pathlib import Path

    from dtl.lr_finder import lr_range_test
    from dtl.run_config import ConfigError, load_config

    if args.start_lr >= args.end_lr:
        raise ConfigError(f"--start-lr {args.start_lr:g} must be below --end-lr {args.end_lr:g} (the test raises the rate)")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out}: is a file; give a folder for lr_find.png and lr_find.json")
    cfg = load_config(args.config, args.overrides)
    r = lr_range_test(cfg, args.stage, args.start_lr, args.end_lr, args.steps, args.out)
    out = args.out or cfg.output_dir
    print(f"stage {r['stage']} ({', '.join(r['trainable_groups'])}): {len(r['lrs'])} steps, loss "
          f"{r['losses'][0]:.3f} -> min {min(r['losses']):.3f}")
    print(f"suggested optim.lr={r['suggested_lr']:.2e}   (curve: {out}/lr_find.png)")
    if min(r["losses"]) > 0.95 * r["losses"][0]:  # no descent: the steepest slope is noise
        print(f"dtl: warning: the loss never fell clearly below its start ({r['losses'][0]:.3f}), so this suggestion "
              f"is unreliable; look at the curve, and try more --steps or a lower --start-lr", file=sys.stderr)


def _eval(args: argparse.Namespace) -> None:
    from dtl.classification_metrics import format_confusion
    from dtl.model_eval import evaluate_export

    r = evaluate_export(args.weights, args.data, args.split, args.tta, args.out, args.batch_size, args.num_workers,
                        args.on_error, args.label_field)
    if not r["main"]:  # under a launcher: one rank reports the metrics every rank computed together
        return
    m = r["metrics"]
    print(f"{args.split}: acc {m['acc']:.4f}  macro-F1 {m['macro_f1']:.4f}  balanced acc {m['balanced_acc']:.4f}  "
          f"loss {m['loss']:.4f}  ({m['samples']} samples)")
    print(format_confusion(r["confusion"], r["classes"]))
    print(f"report: {r['out']}/report/report.md")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtl", description="Distributed transfer learning of image classifiers.",
                                epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)
    _add_data_commands(sub)
    _add_model_commands(sub)
    _add_use_commands(sub)
    sub.add_parser("train", help="train in one process (dtl/train.py's arguments; see `dtl train --help`)",
                   add_help=False)
    sub.add_parser("launch", help="accelerate launch for this node of a Slurm job (--dry-run: every node's)",
                   add_help=False)
    return p


FMT = argparse.ArgumentDefaultsHelpFormatter


def _add_data_commands(sub) -> None:
    """dtl shards {elpv, imagefolder, index}."""
    fmt = FMT
    s = sub.add_parser("shards", help="write WebDataset shards + dataset.json",
                       description="Write labelled images as WebDataset shards with a dataset.json index.")
    s_sub = s.add_subparsers(dest="source", required=True)
    for name, help_text in (("elpv", "the ELPV solar cells (pip package elpv-dataset)"),
                            ("imagefolder", "an ImageFolder tree: ROOT/CLASS/*.jpg or ROOT/{train,val,test}/CLASS/*.jpg")):
        q = s_sub.add_parser(name, help=help_text, description=help_text, formatter_class=fmt, epilog=EPILOG)
        if name == "imagefolder":
            q.add_argument("input", help="image folder root")
        q.add_argument("out", help="output folder for shards and dataset.json")
        q.add_argument("--val", type=float, default=0.1,
                       help="validation fraction of a stratified split (ignored when the folder is pre-split)")
        q.add_argument("--test", type=float, default=0.2,
                       help="test fraction of a stratified split (ignored when the folder is pre-split)")
        q.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
        q.add_argument("--maxcount", type=_int_at_least(1), default=128, help="samples per shard")
    q = s_sub.add_parser("index", help="count shards written by another tool and write dataset.json",
                         description="Read shards written by another tool (webdataset, tar) to their end, count "
                                     "their samples per class and write dataset.json; a damaged shard is an error "
                                     "naming it.", formatter_class=fmt, epilog=EPILOG)
    q.add_argument("out", help="folder that will hold dataset.json (shard paths are relative to it)")
    q.add_argument("--split", action="append", required=True, type=_split_spec,
                   help="NAME=PATTERN, e.g. train='train-{0000..0009}.tar'")
    q.add_argument("--classes", required=True, help="comma-separated class names, in label order")
    q.add_argument("--label-field", default="cls", help="cls, txt or json.FIELD")



def _add_model_commands(sub) -> None:
    """dtl groups, config, compare, lr-find."""
    fmt = FMT
    g = sub.add_parser("groups", help="print a model's layer groups with parameter counts", formatter_class=fmt,
                       description="The layer groups the fine-tune plan unfreezes, input to head, with their "
                                   "parameter counts and what each holds.", epilog=EPILOG)
    g.add_argument("model", help="timm name or torchvision/NAME")
    g.add_argument("--fine", action="store_true", help="fine groups (timm group_matcher coarse=False)")
    g.add_argument("--regex", action="append", help="group by these regexes instead (repeatable, input to head)")
    g.add_argument("--num-classes", type=int, default=2, help="classes of the head (changes only the head's size)")

    c = sub.add_parser("config", help="list every config key with its default and description",
                       description="Every key of a run config, its default and what it does (override any "
                                   "with KEY=VALUE); --template prints a commented config for your own data.",
                       epilog=EPILOG)
    c.add_argument("--template", action="store_true", help="print a commented config for your own shards")

    m = sub.add_parser("compare", help="linear probe vs full fine-tuning vs your plan, on your data",
                       formatter_class=fmt, epilog=EPILOG,
                       description="Feature extractor or fine-tuning? Runs a linear probe (cached features), full "
                                   "fine-tuning at one learning rate and the config's plan on the same split and "
                                   "epoch budget, for each seed; prints a table and writes OUT/compare.json.")
    m.add_argument("--config", "-c", required=True, help="the run config (its plan is the third arm)")
    m.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; 3 give a mean and spread")
    m.add_argument("--out", default="runs/compare", help="folder for the arms' runs and compare.json")
    m.add_argument("--only", nargs="*", choices=["linear probe", "full, one lr", "your plan"],
                   help="run only these arms")
    m.add_argument("--set", nargs="*", default=[], help="dotted overrides for every arm, e.g. epochs=5")
    m.add_argument("--full-lr", type=float, default=None, help="learning rate of the full fine-tuning arm "
                                                                "(default: the config's optim.lr)")

    f = sub.add_parser("lr-find", help="learning-rate range test for a stage of the plan; writes lr_find.png",
                       formatter_class=fmt, epilog=EPILOG,
                       description="fastai's range test: the stage's groups train at their plan ratios while the "
                                   "head's rate grows exponentially; prints a suggested optim.lr and writes "
                                   "lr_find.png and lr_find.json.")
    f.add_argument("--config", "-c", required=True, help="the run config")
    f.add_argument("--stage", type=int, default=0, help="which stage of the plan (0: the first)")
    f.add_argument("--start-lr", type=_positive_float, default=1e-7, help="first head learning rate")
    f.add_argument("--end-lr", type=_positive_float, default=10.0, help="last head learning rate")
    f.add_argument("--steps", type=_int_at_least(1), default=100, help="most batches")
    f.add_argument("--out", help="folder for lr_find.png (default: the config's output_dir)")
    f.add_argument("overrides", nargs="*", help="dotted config overrides")



def _add_use_commands(sub) -> None:
    """dtl eval, predict."""
    fmt = FMT
    e = sub.add_parser("eval", help="evaluate an exported model on a shard split; writes a report",
                       formatter_class=fmt, epilog=EPILOG,
                       description="Metrics, confusion matrix and the report (confusion.png, per_class.csv, "
                                   "top_losses.png) of an exported model on any shard split; also under "
                                   "accelerate launch, each process evaluating its share.")
    e.add_argument("weights", help="model.safetensors, best.safetensors or probe.safetensors written by a dtl run")
    e.add_argument("--data", required=True, help="folder or URL prefix holding dataset.json and the shards")
    e.add_argument("--split", default="test", help="split of dataset.json to evaluate")
    e.add_argument("--tta", choices=["none", "hflip", "flips", "dihedral"], default="none", help="test-time augmentation")
    e.add_argument("--out", help="folder for eval.json and report/, one that holds neither yet (default: next to the "
                                        "weights, eval-WEIGHTS-SPLIT[-TTA], e.g. eval-best-test-flips)")
    e.add_argument("--batch-size", type=_int_at_least(1), default=64, help="per process")
    e.add_argument("--num-workers", type=_int_at_least(0), default=2, help="DataLoader workers per process")
    e.add_argument("--on-error", choices=["error", "skip"], default="error",
                   help="a bad sample: stop naming it, or skip it (with a warning; the metrics leave it out)")
    e.add_argument("--label-field", help="cls, txt or json.FIELD (default: the one the model was trained on)")

    r = sub.add_parser("predict", help="classify images with an exported model.safetensors", formatter_class=fmt,
                       description="Classify images with an exported model (no training config needed); one JSON "
                                   "line per image. An unreadable image gets an 'error' line, the rest are still "
                                   "classified, and the exit code is 2.", epilog=EPILOG)
    r.add_argument("weights", help="model.safetensors, best.safetensors or probe.safetensors written by a dtl run")
    r.add_argument("images", nargs="+", help="image files, folders (searched recursively) or globs")
    r.add_argument("--top-k", type=_int_at_least(1), default=1, help="how many classes to list per image, most probable first")
    r.add_argument("--batch-size", type=_int_at_least(1), default=32, help="images per forward pass")
    r.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda when there is one)")
    r.add_argument("--tta", choices=["none", "hflip", "flips", "dihedral"], default="none", help="test-time augmentation")
    r.add_argument("--csv", help="write image, class, prob, error rows here instead of JSON lines")


def train_entry() -> int:
    """The `dtl-train` console script: `dtl train`, so the loader's worker server starts before the
    trainer imports torch (importing dtl.train first would import it before anything could run)."""
    return main(["train", *sys.argv[1:]])


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from dtl.worker_server import start_for_command_line
        start_for_command_line(argv[1:])  # before dtl.train imports torch: the two import side by side
        from dtl.train import main as train_main
        return train_main(argv[1:])
    if argv[:1] == ["launch"]:
        from dtl.cluster_launch import main as launch_main
        return launch_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"shards": _shards, "groups": _groups, "config": _config, "compare": _compare, "lr-find": _lr_find, "eval": _eval,
                "predict": _predict}[args.command](args) or 0
    except DtlError as e:
        return print_error(e)


if __name__ == "__main__":
    sys.exit(main())
