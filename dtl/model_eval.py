"""`dtl eval WEIGHTS --data ROOT`: an exported model on any shard split, with the run's report.

Single process, or every process of an `accelerate launch` (each evaluates its share, exactly once
across ranks). Writes OUT/report/ (confusion, per-class CSV, top losses, report.md) and
OUT/eval.json.
"""
from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path
from typing import Optional


from dtl.checkpoints import load_exported
from dtl.data_pipeline import Data, build_transform
from dtl.dataset_index import DataError, read_index, resolve_classes, split_source
from dtl.evaluation import evaluate
from dtl.parallel_strategy import ParallelStrategy, eval_accelerator
from dtl.run_config import AugmentConfig
from dtl.run_report import write_eval_markdown, write_test_report
from dtl.shard_stream import ShardStream, StreamOptions


def evaluate_export(weights: str, root: str, split: str = "test", tta: str = "none", out: Optional[str] = None,
                    batch_size: int = 64, num_workers: int = 2, on_error: str = "error",
                    label_field: Optional[str] = None) -> dict:
    """Metrics of `weights` on `root`'s `split`; the classes must be the model's. Labels are read
    from `label_field`, by default the one the model was trained on (its export records it)."""
    tag = "" if tta == "none" else f"-{tta}"
    out_dir = Path(out or Path(weights).parent / f"eval-{Path(weights).stem}-{split}{tag}")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file; eval writes a folder (eval.json and report/)")
    taken = [p.name for p in (out_dir / "eval.json", out_dir / "report") if p.exists()]
    if taken:  # an earlier eval's results, or a training run's own report: never replaced
        raise DataError(f"--out {out_dir} already holds {' and '.join(taken)}: pass another --out (or remove them)")
    model, meta = load_exported(weights)
    index = read_index(root)
    classes = resolve_classes(root, None, index)
    if classes != meta["classes"]:
        raise DataError(f"{root}: classes {classes} differ from the model's {meta['classes']} ({weights})")
    acc = eval_accelerator()
    source = split_source(root, split, index, {}, {})
    stream = ShardStream(source, build_transform(meta["preprocessing"], False, AugmentConfig()),
                         StreamOptions(classes=classes, on_error=on_error,
                                       label_field=label_field or meta.get("label_field", "cls")),
                         acc.process_index, acc.num_processes, num_workers)
    data = Data(classes, stream, None, stream, batch_size, batch_size, num_workers)
    model = acc.prepare_model(model, evaluation_mode=True)
    with closing(data):
        result = evaluate(acc, ParallelStrategy(acc), model, data, stream, len(classes), split,
                          meta["preprocessing"]["input_size"], tta=tta)
    if not result.metrics["samples"]:
        raise DataError(f"{root}: no sample of split {split!r} could be read (--on-error skip left every one out; "
                        f"see the warnings above): no metrics to report, nothing written")
    if acc.is_main_process:
        (out_dir / "report").mkdir(parents=True, exist_ok=True)
        write_test_report(result, classes, source.urls, out_dir / "report")
        record = {"weights": str(weights), "data": root, "split": split, "tta": tta, "on_error": on_error, **result.metrics,
                  "confusion": result.confusion.tolist()}
        (out_dir / "eval.json").write_text(json.dumps(record, indent=1))
        write_eval_markdown(record, out_dir / "report")
    return {"metrics": result.metrics, "confusion": result.confusion, "out": out_dir, "classes": classes,
            "main": acc.is_main_process}
