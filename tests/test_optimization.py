"""Optimizers and lr schedules: each schedule against torch's own scheduler, each optimizer trains."""
import pytest
import torch

from conftest import tiny_config
from dtl.optimization import schedule_factor
from dtl.run_config import Config, OptimConfig
from dtl.train import train

SPE, EPOCHS = 10, 6
TOTAL = SPE * EPOCHS


def _torch_rates(make) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(TOTAL):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name,cfg,make", [
    ("step", dict(schedule="step", step_epochs=2, gamma=0.5),
     lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2 * SPE, gamma=0.5)),
    ("multistep", dict(schedule="multistep", milestones=[1, 4], gamma=0.1),
     lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[SPE, 4 * SPE], gamma=0.1)),
    ("constant", dict(schedule="constant"), lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0)),
    ("onecycle", dict(schedule="onecycle", onecycle_pct=0.3, onecycle_div=25),
     lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=TOTAL, pct_start=0.3,
                                                   div_factor=25, final_div_factor=1e4, cycle_momentum=False)),
])
def test_schedules_follow_torch(name, cfg, make):
    ours = [schedule_factor(OptimConfig(**cfg), SPE, TOTAL)(s) for s in range(TOTAL)]
    theirs = _torch_rates(make)
    tol = 1e-9
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= tol, name


def test_warmup_ramps_any_schedule():
    f = schedule_factor(OptimConfig(schedule="step", step_epochs=2, warmup_epochs=1), SPE, TOTAL)
    assert [round(f(s), 3) for s in (0, 4, 9, 10, 25)] == [0.1, 0.5, 1.0, 1.0, 0.1]


@pytest.mark.parametrize("name", ["adam", "sgd", "adagrad", "rmsprop"])
def test_every_optimizer_trains_with_group_rates_and_stages(tmp_path, shard_dir, name):
    cfg = tiny_config(tmp_path, shard_dir, epochs=2, report=False, max_steps_per_epoch=2,
                      **{"optim.name": name, "optim.schedule": "step", "optim.step_epochs": 1,
                         "finetune.stages": [{"epoch": 0, "train": 1}, {"epoch": 1, "train": "all"}]})
    result = train(Config.model_validate(cfg))
    loss = result.summary["test/loss"]
    assert result.summary["steps"] == 4 and loss == loss and loss < 1e3  # trained, not NaN


@pytest.mark.parametrize("name, unset, given", [("sgd", 0.9, 0.5), ("rmsprop", 0.0, 0.5)])
def test_momentum_survives_the_runs_own_config_yaml(tmp_path, name, unset, given):
    """Retraining from a run's config.yaml (every key written out) builds the same optimizer: RMSprop's
    momentum once depended on whether the key had been written, and config.yaml always wrote 0.9."""
    import yaml
    from torch import nn

    from dtl.finetune_plan import FinetunePlan
    from dtl.layer_groups import layer_groups
    from dtl.optimization import build_optimizer

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model.dtl_head = "1"  # the head, as create_classifier marks its own models
    for momentum, expected in ((None, unset), (given, given)):
        cfg = Config.model_validate({"model": {"backbone": "x"}, "data": {"root": str(tmp_path)},
                                     "optim": {"name": name, "momentum": momentum}})
        again = Config.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
        for c in (cfg, again):
            plan = FinetunePlan(c.finetune, layer_groups(model, "coarse", [r"^0\."]), c.optim.lr)
            assert build_optimizer(model, plan, c.optim).param_groups[0]["momentum"] == expected


def test_ordinal_soft_labels_spread_over_the_neighbouring_levels():
    """SORD targets: peaked at the true level, symmetric neighbours, farther levels less; label
    smoothing on top; a narrow Gaussian is plain (smoothed) cross-entropy; class weights weigh each
    sample by its class, as torch's."""
    from dtl.ordinal_labels import OrdinalSoftLabelLoss, ordinal_targets

    q = ordinal_targets(4, 0.5)
    assert torch.allclose(q.sum(1), torch.ones(4)) and (q.argmax(1) == torch.arange(4)).all()
    assert q[1, 0] == pytest.approx(q[1, 2]) and q[1, 2] > q[1, 3] > 0
    assert q[0, 1] / q[0, 0] == pytest.approx(float(torch.exp(torch.tensor(-2.0))))  # exp(-1 / (2 * 0.5^2))
    assert torch.allclose(ordinal_targets(4, 0.5, 0.1), 0.9 * q + 0.025)
    logits, labels = torch.randn(16, 4), torch.randint(0, 4, (16,))
    w = torch.tensor([1.0, 2.0, 3.0, 0.5])
    ce = torch.nn.functional.cross_entropy
    assert OrdinalSoftLabelLoss(4, 0.05, 0.1)(logits, labels).item() == pytest.approx(
        ce(logits, labels, label_smoothing=0.1).item(), rel=1e-5)
    assert OrdinalSoftLabelLoss(4, 0.05, 0.0, w)(logits, labels).item() == pytest.approx(
        ce(logits, labels, weight=w).item(), rel=1e-5)
    per_sample = -(ordinal_targets(4, 0.7, 0.1)[labels] * logits.log_softmax(-1)).sum(-1)  # both: by the true class
    assert OrdinalSoftLabelLoss(4, 0.7, 0.1, w)(logits, labels).item() == pytest.approx(
        float((per_sample * w[labels]).sum() / w[labels].sum()), rel=1e-6)
    assert torch.equal(ordinal_targets(4, 1e-30), torch.eye(4))  # one-hot, not 0/0 (NaN)


def test_ordinal_labels_train_and_refuse_mixup(tmp_path, shard_dir):
    from dtl.run_config import ConfigError, load_config

    cfg = tiny_config(tmp_path, shard_dir, epochs=1, report=False, max_steps_per_epoch=2,
                      **{"optim.ordinal_sigma": 0.7, "finetune.probe.enabled": True})
    result = train(Config.model_validate(cfg))
    assert result.summary["steps"] == 2 and result.summary["test/loss"] < 1e3
    from types import SimpleNamespace

    from dtl.ordinal_labels import OrdinalSoftLabelLoss
    from dtl.run_setup import _loss
    meta = torch.device("meta")  # stands in for a GPU: the loss's buffers follow the accelerator's device
    loss, mixup = _loss(Config.model_validate(cfg), None, ["a", "b", "c"], SimpleNamespace(device=meta))
    assert isinstance(loss, OrdinalSoftLabelLoss) and mixup is None
    assert {b.device for b in loss.buffers()} == {meta}
    path = tmp_path / "c.yaml"
    path.write_text("data: {root: x}\nmodel: {backbone: test_efficientnet}\n")
    with pytest.raises(ConfigError, match="optim.ordinal_sigma and data.augment.mixup/cutmix both make soft targets"):
        load_config(path, ["optim.ordinal_sigma=0.5", "data.augment.mixup=0.2"])
