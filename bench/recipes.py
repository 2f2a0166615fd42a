"""Linear probe vs full fine-tuning vs dtl's plan on the quickstart split, several seeds, as JSON.

    python bench/recipes.py --seeds 0 1 2 --json bench/results/recipes_elpv_cpu.json [--set epochs=7]

A thin wrapper over `dtl compare` (dtl/recipe_compare.py): every arm runs the quickstart config's
split, backbone, resolution, augmentation and epoch budget; only the plan differs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dtl.recipe_compare import compare, table  # noqa: E402
from result_header import result_header, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/bench-recipes")
    p.add_argument("--only", nargs="*")
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--full-lr", type=float, default=1e-3)
    p.add_argument("--json", help="copy compare.json here, with the command")
    args = p.parse_args()
    result = compare(args.config, args.seeds, args.out, args.only, args.set, args.full_lr)
    print(table(result["summary"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_result(args.json, result_header(**{k: v for k, v in result.items()
                                                 if k not in ("date", "machine", "versions")}))


if __name__ == "__main__":
    main()
