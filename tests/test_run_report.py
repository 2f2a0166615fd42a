"""The report on disk: pictures that exist, are non-trivial and have the expected size; CSV and markdown."""
import csv

import pytest
from PIL import Image

from conftest import CLASSES, tiny_config
from dtl.run_config import Config
from dtl.run_report import RunReport
from dtl.train import train


@pytest.mark.parametrize("probe", [False, True])
def test_report_pictures_csv_and_markdown(tmp_path, shard_dir, probe):
    extra = {"finetune.probe": {"enabled": True, "lr": 0.05}} if probe else {}
    summary = train(Config.model_validate(tiny_config(tmp_path, shard_dir, **extra)), observers=[RunReport()]).summary
    out = tmp_path / "run" / "report"
    for name, size in (("curves.png", (1200, 800)), ("confusion.png", (1100, 500)), ("top_losses.png", None)):
        path = out / name
        assert path.stat().st_size > 15_000, name
        if size:
            assert Image.open(path).size == size, name
    rows = list(csv.DictReader(open(out / "per_class.csv")))
    assert [r["class"] for r in rows] == CLASSES and sum(int(r["support"]) for r in rows) == 15
    assert len(list(csv.DictReader(open(out / "top_losses.csv")))) == 15  # fewer test images than 16
    md = (out / "report.md").read_text()
    assert f"{summary['test/acc']:.4f}" in md and "![confusion matrix](confusion.png)" in md
