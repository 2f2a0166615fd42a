"""When ranks compare their stop flags: after every step on CPUs, every GPU_CHECK_EVERY steps on GPUs."""
import signal

import torch

from dtl.preemption import GPU_CHECK_EVERY, PreemptionHandler


class _Ranks:
    """An accelerator's face as the handler sees it; `reduce` counts the collectives it would run
    (each one, on a GPU, a host-device synchronisation)."""

    def __init__(self, device: str, processes: int = 2):
        self.device, self.num_processes, self.reductions = torch.device(device), processes, 0

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        self.reductions += 1
        return t


def _handler(acc: _Ranks) -> PreemptionHandler:
    return PreemptionHandler(acc, signals=())


def test_gpu_ranks_compare_flags_every_few_steps_and_at_every_epoch_end(monkeypatch):
    acc = _Ranks("cuda")
    as_cpu = torch.as_tensor
    monkeypatch.setattr(torch, "tensor", lambda v, device=None: as_cpu(v))  # no CUDA here: the flag stays put
    h = _handler(acc)
    h._handle(signal.SIGTERM, None)
    stops = [step for step in range(1, 3 * GPU_CHECK_EVERY + 1) if h.should_stop(step)]
    assert stops == [GPU_CHECK_EVERY, 2 * GPU_CHECK_EVERY, 3 * GPU_CHECK_EVERY]   # every rank at the same steps
    assert acc.reductions == 3
    assert h.should_stop() and acc.reductions == 4                               # an epoch's end: always


def test_cpu_ranks_compare_after_every_step_and_one_process_never_communicates():
    acc = _Ranks("cpu")
    h = _handler(acc)
    assert [h.should_stop(step) for step in range(1, 4)] == [False] * 3 and acc.reductions == 3
    one = _Ranks("cuda", processes=1)
    h1 = _handler(one)
    h1._handle(signal.SIGUSR1, None)
    assert h1.should_stop(3) and one.reductions == 0
