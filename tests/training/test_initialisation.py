"""The paper's initialisation: ImageNet VGG16 with fc6/fc7 subsampled, the input normalisation coupled to the
weights that are loaded (never a silent mismatch), and a log of which layers came from where."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from training_helpers import compose_config

from ssd_lightning.cli.build import build_module, instantiate_datamodule
from ssd_lightning.cli.train import initialise_weights
from ssd_lightning.models import VGG16Backbone
from ssd_lightning.models.vgg import VGG16_CONV_NAMES

CAFFE = ([123.0, 117.0, 104.0], [1.0, 1.0, 1.0])
IMAGENET = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
# Position of each conv in ssd.pytorch's flat `vgg` list (vgg16_reducedfc.pth keys: "<position>.weight").
SSD_PYTORCH_POSITIONS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33)


@pytest.fixture(scope="module")
def reduced_fc_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file laid out as ssd.pytorch's vgg16_reducedfc.pth (deterministic weights, not ImageNet's)."""
    torch.manual_seed(0)
    backbone = VGG16Backbone()
    state = {}
    for name, position in zip(VGG16_CONV_NAMES, SSD_PYTORCH_POSITIONS, strict=True):
        conv = backbone.conv(name)
        state[f"{position}.weight"] = conv.weight.detach().clone()
        state[f"{position}.bias"] = torch.randn_like(conv.bias)
    path = tmp_path_factory.mktemp("weights") / "vgg16_reducedfc.pth"
    torch.save(state, path)
    return path


def normalisation(overrides: list[str], tmp_path: Path) -> tuple[list[float], list[float]]:
    cfg = compose_config("train", ["dataset=voc", "dataset.root=/data", *overrides], tmp_path)
    return [round(v, 3) for v in cfg.model.pixel_mean], [round(v, 3) for v in cfg.model.pixel_std]


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ("IMAGENET1K_FEATURES", CAFFE),  # ssd.pytorch's Caffe VGG16 features (no fc6/fc7)
        ("VGG16_Weights.IMAGENET1K_FEATURES", CAFFE),
        ("IMAGENET1K_V1", IMAGENET),  # torchvision's own ImageNet VGG16 (what the recipes start from)
        ("null", IMAGENET),  # from scratch
    ],
)
def test_the_normalisation_follows_the_named_weights(weights: str, expected: tuple, tmp_path: Path) -> None:
    assert normalisation([f"model.backbone_weights={weights}"], tmp_path) == expected


def test_the_normalisation_follows_the_weight_file(reduced_fc_file: Path, tmp_path: Path) -> None:
    assert normalisation([f"model.backbone_weights={reduced_fc_file}"], tmp_path) == CAFFE
    # torchvision's layout: a real classifier means IMAGENET1K_V1, a NaN one IMAGENET1K_FEATURES.
    for classifier, expected in ((torch.zeros(3, 3), IMAGENET), (torch.full((3, 3), float("nan")), CAFFE)):
        path = tmp_path / "torchvision_vgg16.pth"
        torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "classifier.0.weight": classifier}, path)
        assert normalisation([f"model.backbone_weights={path}"], tmp_path) == expected
    features_only = tmp_path / "features_only.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, features_only)
    with pytest.raises(Exception, match=r"cannot tell which input normalisation .*model.pixel_mean="):
        normalisation([f"model.backbone_weights={features_only}"], tmp_path)
    # ... which the user then states.
    stated = normalisation(
        [f"model.backbone_weights={features_only}", "model.pixel_mean=[1,2,3]", "model.pixel_std=[4,5,6]"],
        tmp_path,
    )
    assert stated == ([1, 2, 3], [4, 5, 6])


@pytest.mark.parametrize(
    ("source", "arch", "expected"),
    [
        ("ssd.pytorch", "vgg16", CAFFE),
        ("torchvision", "vgg16", CAFFE),  # ssd300_vgg16: image_mean 0.48235.., std 1/255
        ("nvidia", "resnet50", IMAGENET),
    ],
)
def test_the_normalisation_follows_detector_weights(
    source: str, arch: str, expected: tuple, reduced_fc_file: Path, tmp_path: Path
) -> None:
    overrides = [
        f"model.weights={reduced_fc_file}",
        f"model.weights_source={source}",
        f"model.net.arch={arch}",
    ]
    assert normalisation(overrides, tmp_path) == expected


def test_a_normalisation_the_weights_were_not_trained_with_is_an_error(
    reduced_fc_file: Path, shapes_root: Path, tmp_path: Path
) -> None:
    cfg = compose_config(
        "train",
        [
            "model=ssd300",
            f"model.backbone_weights={reduced_fc_file}",
            f"model.pixel_mean={IMAGENET[0]}",
            f"model.pixel_std={IMAGENET[1]}",
            f"dataset.root={shapes_root}",
        ],
        tmp_path,
    )
    module = build_module(cfg, instantiate_datamodule(cfg))
    before = module.net.backbone.conv("conv1_1").weight.detach().clone()
    with pytest.raises(ValueError, match=r"was trained with pixel_mean=\[123.0, 117.0, 104.0\].*Drop those"):
        initialise_weights(cfg, module)
    torch.testing.assert_close(module.net.backbone.conv("conv1_1").weight, before)  # nothing was loaded


def test_the_run_logs_which_layers_came_from_the_file(
    reduced_fc_file: Path, shapes_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = compose_config(
        "train",
        ["model=ssd300", f"model.backbone_weights={reduced_fc_file}", f"dataset.root={shapes_root}"],
        tmp_path,
    )
    module = build_module(cfg, instantiate_datamodule(cfg))
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        initialise_weights(cfg, module)
    state = torch.load(reduced_fc_file, weights_only=True)
    # conv6/conv7 are the reduced fc6/fc7 (positions 31 and 33 of ssd.pytorch's list).
    torch.testing.assert_close(module.net.backbone.conv("conv6").bias, state["31.bias"])
    torch.testing.assert_close(module.net.backbone.conv("conv1_1").weight, state["0.weight"])
    loaded, fresh = next(
        r.getMessage() for r in caplog.records if "network parts" in r.getMessage()
    ).splitlines()[1:3]
    assert loaded == f"from {reduced_fc_file}: backbone.to_conv4_3, backbone.to_conv7"
    assert fresh.startswith("random initialisation: neck.l2norm, neck.extras") and "heads.5" in fresh
    assert "pixel_mean=[123.0, 117.0, 104.0] pixel_std=[1.0, 1.0, 1.0]" in caplog.text
