"""Any timm backbone (`arch="timm:<name>"`): several families build with SSD heads at 300/512 and SSDLite
heads at 320 (no download), train, take their ImageNet weights from a file, say how to get them offline, and
take their input normalisation from timm's pretrained config. ONNX export: test_export_backbones.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import ssd_lightning as sl
from ssd_lightning.cli.resolvers import pixel_mean
from ssd_lightning.models.timm_backbone import TimmBackbone, load_timm_backbone
from ssd_lightning.priors import prior_preset

FAMILIES = ["resnet18", "convnext_atto", "efficientnet_b0"]


def _batch(size: int, seed: int = 0) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, size, size, generator=generator)
    targets = [
        {"boxes": torch.tensor([[0.1, 0.2, 0.5, 0.7]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[0.4, 0.3, 0.9, 0.8], [0.05, 0.05, 0.3, 0.3]]),
            "labels": torch.tensor([2, 1]),
        },
    ]
    return images, targets


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(("size", "head"), [(300, "ssd"), (320, "ssdlite")])
def test_timm_families_build_with_either_head(name: str, size: int, head: str) -> None:
    model = sl.build_ssd(size, 4, arch=f"timm:{name}", head=head).eval()
    features = timm.create_model(name, features_only=True)
    strides = (8, 16) if head == "ssd" else (16, 32)
    by_stride = dict(zip(features.feature_info.reduction(), features.feature_info.channels(), strict=True))
    assert model.backbone.out_channels == tuple(by_stride[s] for s in strides)  # the maps the heads read
    with torch.no_grad():
        loc, conf = model(torch.zeros(1, 3, size, size))
    assert loc.shape == (1, model.prior_spec.num_priors, 4) and conf.shape[-1] == 4
    maps = model.prior_spec.feature_maps
    if head == "ssdlite":  # torchvision's SSDLite320 maps and boxes
        assert maps == (20, 10, 5, 3, 2, 1) and model.prior_spec.num_priors == 3234
    else:  # stride 8 and 16, then the paper's extras (convnext rounds 300/8 down)
        assert len(maps) == 6 and maps[-1] == 1 and maps[0] in (37, 38)
    assert model.arch == f"timm:{name}"


def test_ssd512_on_a_timm_backbone_has_the_papers_seven_maps() -> None:
    model = sl.build_ssd(512, 4, arch="timm:resnet18", prior_preset_name="voc")
    assert model.prior_spec.feature_maps == prior_preset(512, "voc").feature_maps  # 64, 32, ... 1


def test_a_preset_keeps_its_box_sizes_on_the_networks_own_maps() -> None:
    model = sl.build_ssd(300, 4, arch="timm:convnext_atto", prior_preset_name="voc")
    preset = prior_preset(300, "voc")
    assert model.prior_spec.feature_maps == (37, 18, 9, 5, 3, 1) != preset.feature_maps
    assert model.prior_spec.min_sizes == preset.min_sizes and model.prior_spec.max_sizes == preset.max_sizes
    assert model.prior_spec.steps[0] == pytest.approx(300 / 37)


@pytest.mark.parametrize(
    ("name", "size", "head"),
    [("resnet18", 300, "ssd"), ("convnext_atto", 320, "ssdlite"), ("efficientnet_b0", 192, "ssd")],
)
def test_a_few_training_steps_lower_the_loss(name: str, size: int, head: str) -> None:
    torch.manual_seed(0)
    model = sl.build_ssd(size, 3, arch=f"timm:{name}", head=head).train()
    criterion = sl.MultiBoxLoss(num_classes=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = _batch(size)
    losses = []
    for _ in range(6):
        loss = sum(criterion(*model(images), model.priors, targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    first = next(model.backbone.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0  # the timm backbone trains too


def test_imagenet_weights_from_a_file(tmp_path: Path) -> None:
    classifier = timm.create_model("resnet18")  # a full model's state dict, classifier included
    path = tmp_path / "resnet18.pth"
    torch.save(classifier.state_dict(), path)
    backbone = TimmBackbone("resnet18")
    loaded = load_timm_backbone(backbone, path)
    assert loaded == ["bn1", "conv1", "layer1", "layer2", "layer3"]  # to stride 16; no layer4, no classifier
    torch.testing.assert_close(backbone.body.layer2[0].conv1.weight, classifier.layer2[0].conv1.weight)
    torch.save(sl.build_ssd(300, 4).state_dict(), path)  # some other network's weights
    with pytest.raises(ValueError, match="none of its tensors is a weight of timm's resnet18"):
        load_timm_backbone(backbone, path)


def test_without_a_network_the_message_says_how_to_get_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    original = timm.create_model

    def offline(name: str, *args: object, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        if pretrained:
            raise ConnectionError("no network")
        return original(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"resnet18 \(ConnectionError: no network\)\. Offline\?") as caught:
        load_timm_backbone(TimmBackbone("resnet18"), "timm")
    assert "model.backbone_weights=/path/to/that.pth" in str(caught.value)
    assert "model.backbone_weights=null" in str(caught.value)


@pytest.mark.parametrize("name", ["resnet18", "inception_v3"])
def test_normalisation_follows_timms_pretrained_config(name: str) -> None:
    config = timm.get_pretrained_cfg(name)
    expected = [round(255.0 * v, 4) for v in config.mean]
    assert [round(v, 4) for v in pixel_mean(f"timm:{name}", "timm", None, None)] == expected
    assert pixel_mean(f"timm:{name}", None, None, None) == [123.675, 116.28, 103.53]  # from scratch: ours
    with pytest.raises(ValueError, match="model.backbone_weights=timm"):
        pixel_mean(f"timm:{name}", "IMAGENET1K_V1", None, None)  # torchvision's weight names are not timm's


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"or timm:<model>"):
        sl.build_ssd(300, 4, arch="resnet18")
    with pytest.raises(ValueError, match="has ssd heads, not model.net.head='ssdlite'"):
        sl.build_ssd(300, 4, arch="vgg16", head="ssdlite")
