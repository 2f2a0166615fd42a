"""Layer groups, the fine-tune plan, freezing and the per-group schedule."""
import subprocess
import sys

import pytest
import torch

from dtl.backbones import create_classifier
from dtl.finetune_plan import FinetunePlan, freeze_batchnorm, set_trainable
from dtl.layer_groups import GroupingError, layer_groups, torchvision_family
from dtl.optimization import build_optimizer, build_scheduler
from dtl.run_config import ConfigError, FinetuneConfig, OptimConfig, StageConfig


def _plan(model, **kw):
    cfg = FinetuneConfig(**kw)
    return FinetunePlan(cfg, layer_groups(model, cfg.groups, cfg.group_regex), 1e-3)


def test_timm_groups_follow_group_matcher_and_end_with_the_head():
    model = create_classifier("test_efficientnet", 3)
    coarse, fine = layer_groups(model, "coarse"), layer_groups(model, "fine")
    assert coarse[0].name.startswith("conv_stem") and coarse[-1].name == "head"
    assert coarse[-1].params == ["classifier.weight", "classifier.bias"]
    assert len(fine) >= len(coarse)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(n for g in coarse for n in g.params) == sorted(names)   # a partition
    order = [names.index(g.params[0]) for g in coarse]
    assert order == sorted(order)                                         # input to head


@pytest.mark.parametrize("arch,n_groups", [("resnet18", 6), ("vgg11", None), ("alexnet", None),
                                           ("mobilenet_v2", None), ("mobilenet_v3_small", None),
                                           ("efficientnet_b0", None), ("convnext_tiny", None),
                                           ("vit_b_16", 15), ("inception_v3", 8), ("densenet121", None)])
def test_torchvision_families_have_documented_groups(arch, n_groups):
    assert torchvision_family(f"torchvision/{arch}") is not None
    model = create_classifier(f"torchvision/{arch}", 3)
    groups = layer_groups(model)
    if n_groups:
        assert len(groups) == n_groups
    assert len(groups) >= 4 and groups[-1].name == "head"
    assert sorted(n for g in groups for n in g.params) == sorted(n for n, _ in model.named_parameters())


def test_regex_groups_and_their_errors():
    model = create_classifier("torchvision/resnet18", 3)
    groups = layer_groups(model, regexes=[r"^(conv1|bn1|layer1|layer2)\.", r"^layer3\.", r"^layer4\."])
    assert [g.name for g in groups] == ["conv1+bn1+layer1+layer2", "layer3", "layer4", "head"]  # what it holds
    with pytest.raises(GroupingError, match="matches no group for .* parameters"):
        layer_groups(model, regexes=[r"^layer4\."])
    with pytest.raises(GroupingError, match="not a valid regex"):
        layer_groups(model, regexes=["(("])


def test_group_lrs_decay_explicit_and_range():
    model = create_classifier("test_efficientnet", 3)
    n = len(layer_groups(model))
    decay = _plan(model, decay=0.5).group_lrs
    assert decay[-1] == 1e-3 and decay[-2] == pytest.approx(5e-4) and decay[0] == pytest.approx(1e-3 * 0.5 ** (n - 1))
    explicit = [float(i) for i in range(1, n + 1)]
    assert _plan(model, group_lrs=explicit).group_lrs == explicit
    with pytest.raises(ValueError, match=f"the model has {n} layer groups"):
        _plan(model, group_lrs=[1.0])
    spread = _plan(model, lr_range=(1e-5, 1e-3)).group_lrs
    assert spread[0] == pytest.approx(1e-5) and spread[-1] == pytest.approx(1e-3)
    assert spread[1] / spread[0] == pytest.approx(spread[-1] / spread[-2])   # geometric


def test_frozen_groups_have_no_grad_no_optimizer_state_and_eval_batchnorm():
    torch.manual_seed(0)
    model = create_classifier("test_efficientnet", 3)
    plan = _plan(model)
    stage = plan.stage_at(0)
    trainable = plan.trainable(stage)
    set_trainable(model, plan.groups, trainable)
    opt = build_optimizer(model, plan, OptimConfig())
    # every layer group has its param groups from the start
    assert {pg["layer_group"] for pg in opt.param_groups} == set(range(len(plan.groups)))
    model.train()
    freeze_batchnorm(model, plan.groups, trainable)
    frozen_bn = [m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert frozen_bn and all(not m.training for m in frozen_bn)
    stats = [m.running_mean.clone() for m in frozen_bn]
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, frozen_bn))
    params = dict(model.named_parameters())
    head = set(plan.groups[-1].params)
    assert all(params[n].grad is None and params[n] not in opt.state for n in params if n not in head)
    assert all(params[n] in opt.state for n in head)
    model.train()  # undoes eval mode: the loop re-applies it each epoch
    assert all(m.training for m in frozen_bn)


def test_stage_change_keeps_the_heads_adam_moments():
    torch.manual_seed(0)
    model = create_classifier("test_efficientnet", 3)
    plan = _plan(model)
    set_trainable(model, plan.groups, plan.trainable(plan.stage_at(0)))
    opt = build_optimizer(model, plan, OptimConfig())
    for _ in range(3):
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    head = [p for n, p in model.named_parameters() if n in plan.groups[-1].params]
    before = [{k: v.clone() for k, v in opt.state[p].items()} for p in head]
    set_trainable(model, plan.groups, plan.trainable(plan.stage_at(1)))   # unfreeze more groups
    after = [opt.state[p] for p in head]
    for b, a in zip(before, after):
        assert all(torch.equal(b[k], a[k]) for k in b)


def test_schedule_per_group_join_warmup_and_stage_multiplier():
    model = create_classifier("test_efficientnet", 3)
    cfg = FinetuneConfig(stages=[StageConfig(epoch=0, train=1), StageConfig(epoch=2, train="all", lr_mult=0.5)],
                         join_warmup_epochs=1.0)
    plan = FinetunePlan(cfg, layer_groups(model), 1e-3)
    opt = build_optimizer(model, plan, OptimConfig(min_lr_ratio=1.0))   # flat base schedule
    sched = build_scheduler(opt, plan, OptimConfig(min_lr_ratio=1.0), 1.0, steps_per_epoch=10, epochs=4)
    lrs = []
    for _ in range(40):
        lrs.append({pg["layer_group"]: pg["lr"] for pg in opt.param_groups})
        opt.step()
        sched.step()
    head, stem = len(plan.groups) - 1, 0
    assert lrs[0][head] == pytest.approx(1e-3) and lrs[0][stem] == 0.0
    assert lrs[19][stem] == 0.0                                         # frozen before epoch 2
    assert lrs[20][stem] == pytest.approx(plan.group_lrs[stem] * 0.5 / 10)   # joins, warming up
    assert lrs[29][stem] == pytest.approx(plan.group_lrs[stem] * 0.5)
    assert lrs[25][head] == pytest.approx(0.5e-3)                       # stage multiplier


def test_frozen_groups_have_lr_zero_so_fsdp_can_keep_them_bitwise_unchanged():
    # Under FSDP every parameter requires grad; a group is frozen by its lr alone.
    torch.manual_seed(0)
    model = create_classifier("test_efficientnet", 3)
    cfg = FinetuneConfig(stages=[StageConfig(epoch=0, train=1), StageConfig(epoch=1, train="all")],
                         join_warmup_epochs=0.0)
    plan = FinetunePlan(cfg, layer_groups(model), 1e-2)
    opt = build_optimizer(model, plan, OptimConfig(weight_decay=0.05))
    sched = build_scheduler(opt, plan, OptimConfig(), 0.0, steps_per_epoch=3, epochs=2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):  # stage 0: all parameters get gradients, only the head may move
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    head = set(plan.groups[-1].params)
    for n, p in model.named_parameters():
        assert torch.equal(p, start[n]) == (n not in head), n  # frozen: bitwise as loaded; head: trained
    assert all(pg["lr"] > 0 for pg in opt.param_groups)  # step 3 is in stage 1: everything trains


def test_groups_command_prints_groups_with_parameter_counts():
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "groups", "torchvision/resnet18"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "6 layer groups" in r.stdout and "layer4" in r.stdout and "8,393,728" in r.stdout


def test_the_plan_printout_marks_groups_no_stage_trains_as_frozen():
    """The quickstart never trains its stem: the console must not show a rate for it."""
    model = create_classifier("tf_efficientnet_lite0", 4)
    cfg = FinetuneConfig(stages=[StageConfig(epoch=0, train=6)], decay=1.0)
    text = FinetunePlan(cfg, layer_groups(model), 1e-3).describe()
    rates = text.splitlines()[-1].removeprefix("  group lr: ").split(", ")
    assert rates[:3] == ["conv_stem+bn1=frozen", "blocks.0.0=frozen", "blocks.1=frozen"]
    assert all(r.endswith("=1.00e-03") for r in rates[3:]) and len(rates) == 9
    staged = FinetunePlan(FinetuneConfig(stages=[StageConfig(epoch=0, train=1), StageConfig(epoch=1, train="all")]),
                          layer_groups(model), 1e-3).describe()
    assert "frozen" not in staged
    # with epochs=1 the second stage never starts: said on its line, and the groups only it trains are frozen
    short = FinetunePlan(FinetuneConfig(stages=[StageConfig(epoch=0, train=1), StageConfig(epoch=1, train="all")]),
                         layer_groups(model), 1e-3).describe(epochs=1).splitlines()
    assert short[2].endswith("- never runs: epochs=1") and not short[1].endswith("epochs=1")
    assert short[2].startswith("  stage 1: from epoch 2 (finetune.stages epoch 1), train 9/9")  # as the console counts
    assert short[-1].count("=frozen") == 8


def test_a_stage_asking_for_more_groups_than_the_model_has_is_refused_by_name():
    """`train: 9` on a 6-group resnet18 once meant 'all' silently: a plan written for another backbone."""
    groups = layer_groups(create_classifier("resnet18", 3))
    cfg = FinetuneConfig(stages=[StageConfig(epoch=0, train=1), StageConfig(epoch=2, train=9)])
    with pytest.raises(ConfigError, match=r"finetune.stages\[1\].train=9: the model has only 6 layer groups"):
        FinetunePlan(cfg, groups, 1e-3)
    assert FinetunePlan(FinetuneConfig(stages=[StageConfig(epoch=0, train=6)]), groups, 1e-3).stages[0].first_group == 0
    assert FinetunePlan(FinetuneConfig(), groups[:2], 1e-3).stages[1].first_group == 0  # the default plan adapts


def test_group_names_are_distinct():
    """torchvision's DenseNet once printed four groups named `features`: a plan's printout and its
    lr/ charts could not tell them apart."""
    names = [g.name for g in layer_groups(create_classifier("torchvision/densenet121", 3, pretrained=False))]
    assert len(set(names)) == len(names)
    assert names[:2] == ["features.conv0+norm0", "features.denseblock1+transition1"]
