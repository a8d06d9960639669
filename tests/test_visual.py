"""Visual extractor registry: patch grid follows the input size, backward works, weights load offline only."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ifnet.errors import IFNetError
from ifnet.models.visual import (
    create_extractor,
    list_extractors,
    load_efficientnet_lite0_weights,
    load_weights_file,
    patch_positions_2d,
    shipped_efficientnet_lite0_path,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


def test_registry_lists_every_backbone_of_the_issue():
    assert set(list_extractors()) >= {"resnet18", "resnet50", "resnet101", "resnet152", "efficientnet_lite0"}


def test_unknown_extractor_is_a_clear_error():
    with pytest.raises(IFNetError, match="unknown extractor 'resnet34'.*resnet101"):
        create_extractor("resnet34")


@pytest.mark.parametrize("name", list_extractors())
def test_patch_grid_follows_input_size_and_backward_runs(name):
    torch.manual_seed(0)
    net = create_extractor(name).eval()
    with torch.no_grad():
        assert net.forward_features(torch.randn(1, 3, 96, 96)).shape == (1, net.out_channels, 3, 3)
    net.train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    feats = net.forward_features(x)
    assert feats.shape == (2, net.out_channels, 2, 2)
    assert torch.isfinite(feats).all()
    feats.mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_seven_by_seven_grid_at_224():
    net = create_extractor("resnet18").eval()
    with torch.no_grad():
        assert net.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 512, 7, 7)
        assert net.forward_features(torch.randn(1, 3, 224, 160)).shape == (1, 512, 7, 5)


@pytest.mark.parametrize("name", ["resnet18", "resnet101"])
def test_pretrained_resnet_without_weights_file_names_the_flag(name):
    with pytest.raises(IFNetError, match=r"pretrained=True needs weights_path \(--set model.weights_path=FILE\).*nothing is downloaded"):
        create_extractor(name, pretrained=True)


def test_weights_path_without_pretrained_is_an_error(tmp_path):
    with pytest.raises(IFNetError, match="pretrained is False"):
        create_extractor("resnet18", weights_path=str(tmp_path / "w.pth"))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(IFNetError, match="weights file not found"):
        create_extractor("resnet18", pretrained=True, weights_path=str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet_loads_a_local_torchvision_state_dict(tmp_path, suffix):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    net = create_extractor("resnet18", pretrained=True, weights_path=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(source.children())[:-2])
        assert torch.equal(net.forward_features(x), trunk(x))


def test_resnet_weights_of_another_depth_are_refused(tmp_path):
    import torchvision

    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(IFNetError, match="do not fit this extractor"):
        create_extractor("resnet50", pretrained=True, weights_path=str(path))


class _Payload:
    """Unpickling this would create a file: the marker proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"conv1.weight": _Payload(marker)}, fh, protocol=2)
    with pytest.raises(IFNetError, match="refused to load"):
        load_weights_file(path)
    with pytest.raises(IFNetError, match="refused to load"):
        create_extractor("resnet18", pretrained=True, weights_path=str(path))
    assert not marker.exists()


def test_freeze_fixes_weights_and_keeps_batchnorm_in_eval_mode():
    net = create_extractor("resnet18", freeze=True)
    net.train()
    assert not any(p.requires_grad for p in net.parameters())
    assert not any(m.training for m in net.modules())
    before = net.stem[1].running_mean.clone()
    net.forward_features(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, net.stem[1].running_mean)


# -- the shipped EfficientNet-Lite0 ImageNet weights ------------------------------------------------

def test_efficientnet_lite0_shipped_weights_load_without_network():
    assert shipped_efficientnet_lite0_path().is_file()
    torch.manual_seed(0)
    random_init = create_extractor("efficientnet_lite0").eval()
    pretrained = create_extractor("efficientnet_lite0", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = random_init.forward_features(x), pretrained.forward_features(x)
    assert torch.isfinite(b).all()
    assert not torch.allclose(a, b)
    shipped = torch.load(shipped_efficientnet_lite0_path(), map_location="cpu", weights_only=True)
    assert torch.equal(pretrained.net.conv_stem.weight, shipped["_conv_stem.weight"])
    assert torch.equal(pretrained.net.conv_head.weight, shipped["_conv_head.weight"])


def _grace_hopper() -> torch.Tensor:
    """matplotlib's sample photo (a dependency already), centre-cropped to 224 px, ImageNet-normalised."""
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).float().permute(2, 0, 1)[None] / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def test_efficientnet_lite0_shipped_weights_recognise_an_imagenet_photo():
    """The position-by-position mapping is right only if the full network still classifies: Grace Hopper's
    portrait is ImageNet class 652 'military uniform' (the extractor is that network minus its classifier)."""
    import timm

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_efficientnet_lite0_weights(full, shipped_efficientnet_lite0_path())
    trunk = create_extractor("efficientnet_lite0", pretrained=True).eval()
    x = _grace_hopper()
    with torch.no_grad():
        probs = full(x).softmax(-1)[0]
        assert torch.equal(trunk.forward_features(x), full.forward_features(x))
    assert int(probs.argmax()) == 652
    assert float(probs[652]) > 0.3


def test_efficientnet_weights_of_the_wrong_shape_are_refused(tmp_path):
    shipped = torch.load(shipped_efficientnet_lite0_path(), map_location="cpu", weights_only=True)
    shipped["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(shipped, path)
    with pytest.raises(IFNetError, match=r"tensor 0 '_conv_stem.weight' has shape \(16, 3, 3, 3\)"):
        create_extractor("efficientnet_lite0", pretrained=True, weights_path=str(path))


def test_patch_positions_are_distinct_and_size_agnostic():
    pos = patch_positions_2d(3, 4, 16)
    assert pos.shape == (12, 16)
    assert len({tuple(r.tolist()) for r in pos}) == 12
    assert torch.equal(patch_positions_2d(7, 7, 16)[:3], patch_positions_2d(7, 3, 16)[:3])
