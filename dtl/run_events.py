"""The event seam: what watches a run (metrics file, console, W&B, reports) hangs off these events.

The loop calls `events.<name>(...)`; each observer implements the methods it cares about. An
observer with `every_rank = False` (the default) is called on the main process only; one with
`every_rank = True` is called on every rank, in the same order, and may use collectives (under
FSDP, an observer that gathers weights must be one of these).

| event                      | when                                                     | receives |
| ---                        | ---                                                      | --- |
| run_start(run)             | after the run is built (resumed if asked), before epoch 1 | the `Run` |
| probe_end(run, record)     | after the LP-FT probe (`finetune.probe`), before epoch 1 | its record: val metrics, epochs, timings |
| stage_start(run, stage, n) | when an epoch starts a new fine-tune stage               | the `Stage`, trainable parameter count |
| step_end(run, record)      | every `log_every_steps` optimizer steps                  | loss of the step, per-group lrs used by it |
| eval_end(run, split, res)  | after each evaluation (val per epoch and after the probe; test for the selected weights, test_final for the final ones when they differ) | an `EvalResult`: reduced metrics, confusion matrix, per-sample keys, labels, probabilities (bounded) |
| epoch_end(run, record)     | after an epoch's training, BN sync, validation and best-model update; before its checkpoint | the epoch record (what metrics.jsonl gets) |
| fit_end(run, result)       | once, when the run finishes or stops (preemption, `stop_after_steps`) | the `RunResult` |

Checkpointing and the preemption check are not events: their order in the loop is what makes a
resumed run exact, so they stay explicit there.
"""
from __future__ import annotations

from typing import Any


class Observer:
    """Base class: override the events you need. `every_rank=True` to run on all ranks."""

    every_rank = False

    def run_start(self, run: Any) -> None: ...
    def probe_end(self, run: Any, record: dict) -> None: ...
    def stage_start(self, run: Any, stage: Any, n_trainable: int) -> None: ...
    def step_end(self, run: Any, record: dict) -> None: ...
    def eval_end(self, run: Any, split: str, result: Any) -> None: ...
    def epoch_end(self, run: Any, record: dict) -> None: ...
    def fit_end(self, run: Any, result: Any) -> None: ...


class Events:
    """Dispatches each event to the observers that should see it on this rank, in order."""

    NAMES = ("run_start", "probe_end", "stage_start", "step_end", "eval_end", "epoch_end", "fit_end")

    def __init__(self, observers: list[Observer], is_main_process: bool):
        self.observers = [o for o in observers if o.every_rank or is_main_process]

    def __getattr__(self, name: str):
        if name not in self.NAMES:
            raise AttributeError(name)

        def emit(*args: Any) -> None:
            for o in self.observers:
                getattr(o, name)(*args)
        return emit
