"""Crash-safe checkpoint writes, `ckpt_path=last`, and initial weights (ImageNet backbone, whole detector)."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from ssd_lightning.models import build_ssd
from ssd_lightning.models.initial_weights import load_backbone_weights, load_detector_weights
from ssd_lightning.training.checkpointing import (
    AtomicCheckpointIO,
    find_last_checkpoint,
    resolve_checkpoint,
    run_folder_of,
)


def test_a_crash_during_a_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, target)

    def dies_half_way(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # stands for the process being killed mid-write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"global_step": 1}
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_last_is_the_newest_last_ckpt_and_its_run_folder(tmp_path: Path) -> None:
    runs = tmp_path / "train" / "runs" / "compact_shapes"
    older, newer = (runs / name / "checkpoints" / "last.ckpt" for name in ("a", "b"))
    for index, path in enumerate((older, newer)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1000 + index, 1000 + index))
    assert find_last_checkpoint(tmp_path / "train") == newer
    assert resolve_checkpoint("last", runs) == newer
    assert resolve_checkpoint(None, tmp_path) is None
    # A checkpoint in <run>/checkpoints/ belongs to that run (resumed in place); a loose file to none.
    assert run_folder_of(newer) == runs / "b"
    assert run_folder_of(tmp_path / "elsewhere.ckpt") is None
    with pytest.raises(FileNotFoundError, match="no last.ckpt"):
        find_last_checkpoint(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="ckpt_path=missing.ckpt"):
        resolve_checkpoint("missing.ckpt", tmp_path)


def test_backbone_from_a_torchvision_vgg16_file(tmp_path: Path) -> None:
    vgg = torchvision.models.vgg16().features
    state = {f"features.{k}": v for k, v in vgg.state_dict().items()}
    # IMAGENET1K_FEATURES ships NaN classifier tensors: they must be ignored, not subsampled into conv6/7.
    state["classifier.0.weight"] = torch.full((3,), float("nan"))
    torch.save(state, tmp_path / "vgg16.pth")
    net = build_ssd(300, 21)
    loaded = load_backbone_weights(net, tmp_path / "vgg16.pth")
    assert loaded[0] == "conv1_1" and len(loaded) == 13
    torch.testing.assert_close(net.backbone.conv("conv5_3").weight, vgg[28].weight)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_backbone_weights_offline_fail_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(
        RuntimeError, match=r"could not download .*IMAGENET1K_FEATURES.*model.backbone_weights="
    ):
        load_backbone_weights(build_ssd(300, 21), "IMAGENET1K_FEATURES")
    with pytest.raises(ValueError, match="nor a weight name of torchvision's VGG16_Weights"):
        load_backbone_weights(build_ssd(300, 21), "NOT_A_WEIGHT")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_backbone_weights(build_ssd(300, 21), "weights/missing.pth")
    with pytest.raises(ValueError, match="'compact' has no ImageNet backbone; set model.backbone_weights=n"):
        load_backbone_weights(build_ssd(96, 6, arch="compact"), "IMAGENET1K_FEATURES")


def test_detector_weights_fine_tune_onto_other_classes(tmp_path: Path) -> None:
    source = build_ssd(96, 81, arch="compact", width=8)
    checkpoint = {"state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}
    torch.save(checkpoint, tmp_path / "coco.ckpt")
    target = build_ssd(96, 6, arch="compact", width=8)
    skipped = load_detector_weights(target, tmp_path / "coco.ckpt")
    # Only the class-score layers differ in shape; they keep their fresh initialisation.
    assert skipped and all(".conf." in k for k in skipped)
    torch.testing.assert_close(target.backbone.state_dict(), source.backbone.state_dict())
    with pytest.raises(ValueError, match="does not fit this network"):
        load_detector_weights(build_ssd(96, 6, arch="compact", width=16), tmp_path / "coco.ckpt")
    with pytest.raises(ValueError, match="weights_source"):
        load_detector_weights(target, tmp_path / "coco.ckpt", source="caffe")
