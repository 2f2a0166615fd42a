"""Run under `torchrun --nproc_per_node 2`: train 3 stages and record, at the end of each stage,
whether every parameter and BatchNorm buffer is bitwise equal across ranks and frozen groups
still equal the pretrained file. Writes RESULT_DIR/rank{r}.json."""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from dtl.backbones import read_state_dict
from dtl.run_config import Config
from dtl.run_events import Observer
from dtl.train import train

report = []
pretrained: dict = {}


def _gather(flat: torch.Tensor) -> list[torch.Tensor]:
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return gathered


def check(accelerator, model, state):
    bare = accelerator.unwrap_model(model)
    params = dict(bare.named_parameters())
    gathered = _gather(torch.cat([p.detach().flatten() for p in params.values()]))
    bn = _gather(torch.cat([b.detach().float().flatten() for n, b in bare.named_buffers()
                            if "running_mean" in n or "running_var" in n]))
    trainable = {n for n, p in params.items() if p.requires_grad}
    frozen_ok = all(torch.equal(params[n], pretrained[n]) for n in params if n not in trainable)
    report.append({"epoch": state.epoch, "stage": state.stage,
                   "equal_across_ranks": all(torch.equal(gathered[0], g) for g in gathered[1:]),
                   "max_abs_diff": max(float((gathered[0] - g).abs().max()) for g in gathered[1:]),
                   "bn_buffers_equal_across_ranks": all(torch.equal(bn[0], b) for b in bn[1:]),
                   "bn_max_abs_diff": max(float((bn[0] - b).abs().max()) for b in bn[1:]),
                   "frozen_equal_pretrained": frozen_ok, "trainable": len(trainable),
                   "ddp_params": sum(1 for p in model.parameters() if p.requires_grad)
                   if model is not bare else None,
                   "wrapped": model is not bare, "models_tracked": len(accelerator._models)})


class Check(Observer):
    every_rank = True  # it all-gathers: every rank must take part

    def epoch_end(self, run, record):
        check(run.accelerator, run.model, run.state)


def main() -> None:
    cfg = Config.model_validate(yaml.safe_load(Path(sys.argv[1]).read_text()))
    result_dir = Path(sys.argv[2])
    pretrained.update(read_state_dict(cfg.model.pretrained))
    summary = train(cfg, observers=[Check()]).summary
    (result_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(
        json.dumps({"report": report, "summary": {k: v for k, v in summary.items() if k != "test/confusion"}}))


if __name__ == "__main__":  # DataLoader workers start from a forkserver and import this file
    main()
