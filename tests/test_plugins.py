"""Classes of the user's own named in a config (`_target_`): a backbone, a data source, a train transform.
Only a subclass of the kind expected is built, and a plug-in that breaks its contract is named."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pytest
import torch
from torch import Tensor, nn

import ssd_lightning as sl
from ssd_lightning.data import (
    DataSource,
    DetectionDataModule,
    DetectionDataset,
    DetectionTransform,
    ImageRecord,
    to_tensor_steps,
)
from ssd_lightning.training.module import SSDLitModule

HERE = __name__  # this module, as a config names it


class TwoMaps(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.to_stride8 = nn.Sequential(nn.Conv2d(3, width, 3, 8, 1), nn.ReLU())
        self.to_stride16 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU())
        self.out_channels = (width, 2 * width)

    def forward(self, images: Tensor) -> list[Tensor]:
        stride8 = self.to_stride8(images)
        return [stride8, self.to_stride16(stride8)]


class NoChannels(nn.Module):
    def forward(self, images: Tensor) -> list[Tensor]:
        return [images]


class OneImage(DataSource):
    """The same picture with one box in every split."""

    def class_names(self, requested: Sequence[str] | None) -> list[str]:
        return list(requested or ["thing"])

    def load(self, split: str, classes: Sequence[str], **options: Any) -> DetectionDataset:
        path = self.root / "image.png"
        box = np.array([[4, 4, 40, 30]], np.float32)
        record = ImageRecord(path, path, "image", 0, 0, 0, box, np.array([1]), np.array([False]))
        return DetectionDataset([record], classes, name=f"{self.name} {split}", **options)


class Flip(DetectionTransform):
    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], p: float = 1.0) -> None:
        steps = [A.HorizontalFlip(p=p), A.Resize(image_size, image_size)]
        super().__init__([*steps, *to_tensor_steps(mean, std)])


class Normalising(DetectionTransform):  # float images: not what the batches hold
    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__([A.Resize(image_size, image_size), *to_tensor_steps(mean, std, normalize=True)])


def test_a_backbone_of_ones_own_from_its_spec_with_either_head() -> None:
    spec = {"_target_": f"{HERE}.TwoMaps", "width": 8}
    model = sl.build_ssd(128, 3, backbone=spec).eval()
    assert isinstance(model.backbone, TwoMaps) and model.backbone.out_channels == (8, 16)
    assert model.prior_spec.feature_maps == (16, 8, 4, 2, 1)  # 2 maps, then extras halving to 1x1
    assert model.arch == "custom"
    loc, _ = model(torch.zeros(1, 3, 128, 128))
    assert loc.shape[1] == model.priors.shape[0]
    lite = sl.build_ssd(320, 3, backbone={"_target_": f"{HERE}.TwoMaps"}, head="ssdlite")
    assert lite.prior_spec.feature_maps == (40, 20, 10, 5, 3, 2)  # SSDLite's four extras after 2 maps
    assert type(lite.heads[0]).__name__ == "SSDLiteHead"


def test_a_checkpoint_of_a_plugin_network_loads_without_pickled_code(tmp_path: Path) -> None:
    net = {"size": 96, "backbone": {"_target_": f"{HERE}.TwoMaps", "width": 8}}
    module = SSDLitModule(class_names=["a", "b"], net=net, pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3)
    path = tmp_path / "plugin.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    checkpoint = torch.load(path, weights_only=True)  # plain data: the spec, not the class
    rebuilt = SSDLitModule.from_checkpoint(checkpoint)
    assert isinstance(rebuilt.net.backbone, TwoMaps)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("os.system", "is not a subclass of torch.nn.modules.module.Module"),
        ("builtins.eval", "is not a subclass"),
        ("no_such_package.Backbone", "cannot import it"),
        (f"{HERE}.NoChannels", "needs `out_channels`"),
    ],
)
def test_a_spec_builds_only_what_it_should(target: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sl.build_ssd(128, 3, backbone={"_target_": target})


@pytest.fixture
def one_image(tmp_path: Path) -> Path:
    import cv2

    cv2.imwrite(str(tmp_path / "image.png"), np.full((48, 64, 3), 90, np.uint8))
    return tmp_path


def test_a_data_source_and_a_transform_of_ones_own(one_image: Path) -> None:
    datamodule = DetectionDataModule(
        root=str(one_image),
        source={"_target_": f"{HERE}.OneImage"},
        augmentation={"_target_": f"{HERE}.Flip", "p": 1.0},
        image_size=32,
        batch_size=1,
        num_workers=0,
    )
    assert datamodule.classes == ["thing"] and datamodule.name == "oneimage"
    datamodule.setup("fit")
    image, target = datamodule.datasets["train"][0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    mirrored = torch.tensor([(64 - 40) / 64, 4 / 48, (64 - 4) / 64, 30 / 48])  # (4, 4, 40, 30) flipped
    torch.testing.assert_close(target["boxes"][0], mirrored, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="is not a subclass of ssd_lightning.data.sources.DataSource"):
        DetectionDataModule(root=str(one_image), source={"_target_": f"{HERE}.Flip"}, batch_size=1)


def test_a_transform_that_gives_other_images_is_named(one_image: Path) -> None:
    with pytest.raises(ValueError, match=rf"dataset.augmentation \({HERE}.Normalising\) gives torch.float32"):
        DetectionDataModule(
            root=str(one_image),
            source={"_target_": f"{HERE}.OneImage"},
            augmentation={"_target_": f"{HERE}.Normalising"},
            image_size=32,
            batch_size=1,
        )
