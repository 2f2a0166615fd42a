import pytest
import yaml

from conftest import tiny_config, write_config
from dtl.run_config import ConfigError, load_config


def test_yaml_and_overrides_merge_with_types(tmp_path, shard_dir):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, shard_dir))
    cfg = load_config(path, ["optim.lr=3e-4", "data.batch_size=4", "finetune.stages=[{epoch: 0, train: all}]"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.batch_size == 4
    assert [s.train for s in cfg.finetune.stages] == ["all"]
    assert cfg.model.backbone == "test_efficientnet"


def test_unknown_key_names_key_and_nearest(tmp_path, shard_dir):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, shard_dir))
    with pytest.raises(ConfigError) as e:
        load_config(path, ["optim.learning_rate=0.1"])
    assert "optim.learning_rate: unknown key" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(path, ["data.batchsize=4"])
    assert "did you mean 'data.batch_size'" in str(e.value)


def test_wrong_type_and_missing_key(tmp_path, shard_dir):
    cfg = tiny_config(tmp_path, shard_dir)
    path = write_config(tmp_path / "c.yaml", cfg)
    with pytest.raises(ConfigError, match=r"data\.batch_size: .*integer"):
        load_config(path, ["data.batch_size=many"])
    del cfg["model"]["backbone"]
    with pytest.raises(ConfigError, match=r"model\.backbone: required key is missing"):
        load_config(write_config(tmp_path / "d.yaml", cfg))


def test_bad_stages_and_files(tmp_path, shard_dir):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, shard_dir))
    with pytest.raises(ConfigError, match="strictly increasing"):
        load_config(path, ["finetune.stages=[{epoch: 0, train: 1}, {epoch: 0, train: 2}]"])
    with pytest.raises(ConfigError, match="must be >= 1"):
        load_config(path, ["finetune.stages=[{epoch: 0, train: 0}]"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["optim.lr"])


@pytest.mark.parametrize("overrides, said", [
    (["finetune.probe.enabled=true", "model.head.hidden=[16]"], "asks for an MLP"),
    (["finetune.probe.enabled=true", "model.head.binary=true"], "asks for one sigmoid logit"),
    (["checkpoint.patience=2", "data.val_split=null"], "data.val_split is null"),
    (["data.class_weights=true", "data.balanced_sampling=0.5"], "choose one"),
    (["data.classes=[cat, dog, cat]"], r"data.classes: .*named more than once: \['cat'\]"),
])
def test_settings_that_cannot_go_together_are_refused_before_any_work(tmp_path, shard_dir, overrides, said):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, shard_dir))
    with pytest.raises(ConfigError, match=said):
        load_config(path, overrides)


def test_a_users_config_inside_output_dir_is_never_overwritten(tmp_path, shard_dir):
    """output_dir/config.yaml is the run's resolved config: a hand-written file there is refused, the
    run's own (written by dtl) is fine to continue from; a folder as --config is named."""
    from dtl.run_config import dump_config

    cfg = tiny_config(tmp_path, shard_dir)
    mine = tmp_path / "run" / "config.yaml"
    mine.parent.mkdir()
    write_config(mine, cfg)
    text = "# my notes\n" + mine.read_text()
    mine.write_text(text)
    with pytest.raises(ConfigError, match=r"is where the run writes its resolved config"):
        load_config(mine)
    assert mine.read_text() == text
    mine.write_text(dump_config(load_config(write_config(tmp_path / "c.yaml", cfg))))
    assert load_config(mine, ["epochs=5"]).epochs == 5
    older = yaml.safe_load(mine.read_text())  # one written by an older dtl: a key fewer, momentum 0.9
    del older["finetune"]["cache_views"]
    older["optim"]["momentum"] = 0.9
    mine.write_text(yaml.safe_dump(older, sort_keys=False))
    assert load_config(mine).finetune.cache_views == 2
    from dtl.run_config import changed_settings
    assert not [c for c in changed_settings(mine.parent, load_config(mine)) if "momentum" in c]  # adamw never read it
    with pytest.raises(ConfigError, match=r"is a folder: pass the YAML file"):
        load_config(tmp_path / "run")


def test_train_cli_exits_nonzero_naming_the_key(tmp_path, shard_dir):
    import subprocess
    import sys

    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, shard_dir))
    r = subprocess.run([sys.executable, "-m", "dtl.train", "--config", str(path), "optim.lrr=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "optim.lrr: unknown key (did you mean 'optim.lr'?)" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_shipped_configs_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        load_config(path)


def test_yaml_no_means_no_mixed_precision_and_unset_follows_the_launcher(tmp_path, shard_dir):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, shard_dir))
    assert load_config(path, ["mixed_precision=no"]).mixed_precision == "no"  # YAML reads `no` as false
    assert load_config(path, []).mixed_precision is None  # accelerate launch's --mixed_precision decides
