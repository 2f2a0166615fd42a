"""A second domain for the quality claims: scikit-learn's bundled 8x8 digits, upsampled, as shards.

    pip install -e ".[bench]"
    python bench/digits.py --seeds 0 1 2 --json bench/results/recipes_digits_cpu.json

Writes the 1,797 digits as 64x64 PNGs (nearest-neighbour upsampling of the 8x8 originals, grey
levels 0..16 scaled to 0..255) into an ImageFolder tree, converts it with `dtl shards
imagefolder` (stratified 70/10/20 split, seed 0), and runs `dtl compare` with configs/digits.yaml.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dtl.recipe_compare import compare, table  # noqa: E402
from result_header import result_header, write_result


def write_digits(folder: Path) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        out = folder / str(label)
        out.mkdir(parents=True, exist_ok=True)
        arr = (img * (255 / 16)).astype(np.uint8)
        Image.fromarray(arr).resize((64, 64), Image.NEAREST).convert("RGB").save(out / f"digit_{i:04d}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/bench-digits")
    p.add_argument("--only", nargs="*")
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--full-lr", type=float, default=1e-3)
    p.add_argument("--json")
    args = p.parse_args()
    data = Path(args.data)
    if not (data / "shards" / "dataset.json").is_file():
        write_digits(data / "images")
        subprocess.run([sys.executable, "-m", "dtl.cli", "shards", "imagefolder", str(data / "images"),
                        str(data / "shards"), "--val", "0.1", "--test", "0.2", "--maxcount", "128"], check=True)
    result = compare(str(REPO / "configs" / "digits.yaml"), args.seeds, args.out, args.only,
                     [f"data.root={data / 'shards'}", *args.set], args.full_lr)
    print(table(result["summary"]))
    if args.json:
        write_result(args.json, result_header(**{k: v for k, v in result.items()
                                                 if k not in ("date", "machine", "versions")}))


if __name__ == "__main__":
    main()
