"""Fine-tune an ImageNet backbone on WebDataset shards.

    accelerate launch dtl/train.py --config configs/quickstart.yaml [key=value ...]
    dtl train --config configs/quickstart.yaml [key=value ...]        (one process)

The story of a run (`train` below): build it from the config (resuming from the latest
checkpoint); train the head on cached features first when LP-FT's probe is on; then for each
epoch enter the plan's stage, train one epoch, average BatchNorm statistics across ranks,
validate (the weights and their moving average, if kept), keep the best model, tell the observers, checkpoint, and stop here if preempted (or
early, when the monitored metric has stopped improving); finally test, export, write the summary. docs/architecture.md has the design.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import closing
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: dtl/ is on sys.path, the repo root is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # the loader's worker server imports torch and dtl while this process does
    from dtl.worker_server import start_for_command_line
    start_for_command_line(sys.argv[1:])

from dtl.linear_probe import run_probe
from dtl.run_config import Config, load_config
from dtl.run_events import Observer
from dtl.run_finish import (RunResult, completed_run, epoch_record, evaluate_ema, evaluate_split, finish,
                            select_best, stop)
from dtl.run_setup import build_run
from dtl.training_epoch import train_one_epoch
from dtl.user_errors import DtlError, print_error


def train(cfg: Config, observers: Sequence[Observer] = ()) -> RunResult:
    """Run the whole job (or its remaining part); `observers` are attached to the run's events."""
    completed_run(cfg)  # a rerun of a finished run is refused, naming what it would change
    run = build_run(cfg, observers)
    with closing(run.data):  # the workers the training and validation loaders keep between epochs
        state, val = run.state, None
        run.events.run_start(run)
        if run.wants_probe():  # LP-FT: a converged head on cached features before any unfreezing
            run_probe(run)
        for epoch in range(state.epoch, cfg.epochs):
            if state.stopped_early:
                break
            state.epoch = epoch
            run.enter_stage(epoch)
            stats = train_one_epoch(run, epoch)
            if stats.stopped:
                return stop(run)
            run.strategy.sync_batchnorm(run.model)
            val, val_ema = evaluate_split(run, "val"), evaluate_ema(run)
            select_best(run, epoch, {"model": val, "ema": val_ema})
            run.events.epoch_end(run, epoch_record(run, stats, val, val_ema))
            state.epoch, state.batch_in_epoch, state.epoch_sums = epoch + 1, 0, {}
            state.stopped_early = run.patience_spent()
            if state.stopped_early or (epoch + 1) % cfg.checkpoint.every_epochs == 0 or epoch + 1 == cfg.epochs:
                run.save_checkpoint()
            if run.preempt.should_stop() and not state.stopped_early:
                return stop(run)
        return finish(run, val)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dtl-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every config key, its default and meaning: dtl config. "
                                       "Exit codes: 0 done (or stopped with a checkpoint to continue from), "
                                       "2 a problem with the input, named in one line; 130 interrupted by Ctrl-C "
                                       "(the same command continues from the latest checkpoint); anything else is "
                                       "a bug.")
    p.add_argument("--config", "-c", help="YAML run config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 data.batch_size=64")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        train(load_config(args.config, args.overrides))
    except DtlError as e:
        wb = sys.modules.get("wandb")
        if wb is not None and wb.run is not None:  # W&B marks it failed, and its footer comes before our line
            wb.finish(exit_code=2)
        return print_error(e)
    except KeyboardInterrupt:  # Ctrl-C: no traceback; what the checkpoints hold is kept
        if os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1":  # Ctrl-C reaches every rank
            print("dtl: interrupted; the latest checkpoint is kept and the same command continues from it",
                  file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
