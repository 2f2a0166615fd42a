"""Run under `torchrun --nproc_per_node 2`: stream 2 epochs of a split with 2 workers per rank,
all-reducing after every batch as DDP would; write the ids and step counts per rank."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dtl.shard_stream import ShardStream, StreamOptions, batches_per_epoch, make_loader, read_index, split_source

def _blank(img) -> torch.Tensor:
    return torch.zeros(1)  # the ids are what is checked, not the pixels (top level: workers unpickle it)


def main() -> None:
    root, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    index = read_index(root)
    result = {}
    for split, train in (("train", True), ("test", False)):
        source = split_source(root, split, index, {}, {})
        stream = ShardStream(source, _blank, StreamOptions(classes=index["classes"], train=train, seed=1),
                             rank, world, num_workers=2)
        for epoch in (0, 1):
            stream.set_epoch(epoch)
            ids, steps = [], 0
            for batch in make_loader(stream, 3, 2):
                ids += batch["key"]
                steps += 1
                if train:
                    dist.all_reduce(torch.ones(1))  # a rank with more batches would wait here forever
            result[f"{split}/{epoch}"] = {"ids": ids, "steps": steps,
                                          "expected_steps": batches_per_epoch(stream, 3) if train else None}
    (out / f"stream{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":  # DataLoader workers start from a forkserver and import this file
    main()
