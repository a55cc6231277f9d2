"""`model=ssdlite320` and `model=ssd300_resnet50` as first-class models: the configs build the peers' networks
with their own default boxes, SSDLite's MobileNetV3 tail and the input normalisation follow the initial
weights, the experiments state the peers' recipes, and each model trains, evaluates, predicts and exports
through the entry points, from scratch or fine-tuned from the peer's own weight layout."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_convert_backbones import _NvidiaSSD300
from training_helpers import compose_config

import ssd_lightning as sl
from ssd_lightning.cli.build import build_module, instantiate_datamodule, optimizer_factory
from ssd_lightning.cli.eval import evaluate
from ssd_lightning.cli.export import export
from ssd_lightning.cli.predict import predict
from ssd_lightning.cli.train import initialise_weights, train
from ssd_lightning.export import read_metadata, unpad_detections
from ssd_lightning.models import MobileNetV3Backbone, ResNet50Backbone
from ssd_lightning.optim import resolve_steps

IMAGENET = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
MINUS_ONE_TO_ONE = ([127.5] * 3, [127.5] * 3)  # torchvision's SSDLite input scaling
COCO_TRAIN_IMAGES = 117266  # train2017 images with annotations: what both peers count an epoch in


def net_of(overrides: list[str], tmp_path: Path) -> sl.SSD:
    cfg = compose_config("train", [*overrides, "dataset.root=/data"], tmp_path)
    return sl.build_ssd(num_classes=3, **OmegaConf.to_container(cfg.model.net, resolve=True))


def normalisation(overrides: list[str], tmp_path: Path) -> tuple[list[float], list[float]]:
    cfg = compose_config("train", [*overrides, "dataset=coco", "dataset.root=/data"], tmp_path)
    return [round(v, 3) for v in cfg.model.pixel_mean], [round(v, 3) for v in cfg.model.pixel_std]


# 1. The networks --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "backbone", "size", "preset", "priors"),
    [
        ("ssdlite320", MobileNetV3Backbone, 320, "ssdlite", 3234),  # torchvision's DefaultBoxGenerator
        ("ssd300_resnet50", ResNet50Backbone, 300, "coco", 8732),  # NVIDIA's dboxes300_coco
    ],
)
def test_the_model_configs_build_the_peers_networks_with_their_own_boxes(
    model: str, backbone: type, size: int, preset: str, priors: int, tmp_path: Path
) -> None:
    net = net_of([f"model={model}", "model.backbone_weights=null"], tmp_path)
    assert isinstance(net.backbone, backbone) and net.image_size == size and len(net.priors) == priors
    torch.testing.assert_close(net.priors, sl.generate_priors(sl.prior_preset(size, preset)))
    # The arch's boxes whatever the data: the peers' weights were trained with them (not the VOC sizes).
    for dataset in ("voc", "coco", "shapes"):
        cfg = compose_config("train", [f"model={model}", f"dataset={dataset}", "dataset.root=/x"], tmp_path)
        assert (cfg.model.name, cfg.model.net.prior_preset_name) == (model, preset)


def test_ssdlite_has_torchvisions_detection_settings(tmp_path: Path) -> None:
    cfg = compose_config("train", ["model=ssdlite320"], tmp_path)
    net = cfg.model.net
    thresholds = (net.score_threshold, net.nms_iou_threshold, net.top_k, net.pre_nms_top_k)
    assert thresholds == (0.001, 0.55, 300, 300)
    assert cfg.model.image_size == 320 and cfg.model.backbone_weights == "IMAGENET1K_V1"
    r50 = compose_config("train", ["model=ssd300_resnet50"], tmp_path).model
    assert (r50.image_size, r50.backbone_weights, r50.net.score_threshold, r50.net.top_k) == (
        300,
        "IMAGENET1K_V2",
        0.05,
        200,
    )


@pytest.fixture(scope="module")
def torchvision_ssdlite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision's ssdlite320_mobilenet_v3_large state dict (91 COCO ids, reduced tail: the layout of its
    COCO weights), random weights."""
    torch.manual_seed(0)
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=91
    )
    path = tmp_path_factory.mktemp("peers") / "ssdlite320_mobilenet_v3_large_coco.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def nvidia_checkpoint_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint in NVIDIA's layout (81 classes, the state dict under "model"), random weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("peers") / "nvidia_ssdpyt_epoch_64.pt"
    torch.save({"epoch": 65, "model": _NvidiaSSD300(81).state_dict()}, path)
    return path


def test_the_ssdlite_tail_follows_the_initial_weights(torchvision_ssdlite_file: Path, tmp_path: Path) -> None:
    """torchvision's rule: the full (960-channel) tail for ImageNet backbone weights, which exist for it only;
    the reduced one from scratch; a whole detector's weights bring their own tail."""
    full = net_of(["model=ssdlite320"], tmp_path)  # IMAGENET1K_V1 by default
    assert full.backbone.out_channels == (672, 960) and not full.backbone.reduced_tail
    ours = tmp_path / "full_tail.pth"  # one of our own full-tail detectors
    torch.save(full.state_dict(), ours)
    reduced = {
        "model.backbone_weights=null": True,
        f"model.weights={torchvision_ssdlite_file} model.weights_source=torchvision": True,  # its COCO layout
        f"model.weights={ours}": False,
        f"model.weights={ours} model.backbone_weights=null": False,
    }
    for overrides, expected in reduced.items():
        cfg = compose_config("train", ["model=ssdlite320", *overrides.split()], tmp_path)
        assert cfg.model.net.reduced_tail is expected, overrides


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=ssdlite320"], IMAGENET),  # torchvision's ImageNet MobileNetV3-Large
        (["model=ssdlite320", "model.backbone_weights=null"], IMAGENET),
        (["model=ssd300_resnet50"], IMAGENET),  # torchvision's ImageNet ResNet-50 (IMAGENET1K_V2)
        (["model=ssd300_resnet50", "model.backbone_weights=IMAGENET1K_V1"], IMAGENET),
        (["experiment=ssdlite320_coco"], MINUS_ONE_TO_ONE),  # torchvision's recipe: scratch on [-1, 1]
        (["experiment=ssd300_resnet50_coco"], IMAGENET),
    ],
)
def test_the_normalisation_follows_the_backbone_weights(
    overrides: list[str], expected: tuple, tmp_path: Path
) -> None:
    assert normalisation(overrides, tmp_path) == expected


def test_the_normalisation_follows_the_peers_detector_weights(
    torchvision_ssdlite_file: Path, nvidia_checkpoint_file: Path, tmp_path: Path
) -> None:
    ssdlite = [
        "model=ssdlite320",
        f"model.weights={torchvision_ssdlite_file}",
        "model.weights_source=torchvision",
    ]
    assert normalisation(ssdlite, tmp_path) == MINUS_ONE_TO_ONE  # whatever backbone_weights says
    nvidia = [
        "model=ssd300_resnet50",
        f"model.weights={nvidia_checkpoint_file}",
        "model.weights_source=nvidia",
    ]
    assert normalisation(nvidia, tmp_path) == IMAGENET


# 2. The peers' recipes -------------------------------------------------------------------------------


def lr_at(cfg, global_batch: int, steps: list[int], total_steps: int) -> list[float]:
    """The learning rate of the run's weight group at each of `steps`."""
    optimizer = optimizer_factory(cfg, global_batch)([torch.nn.Parameter(torch.zeros(2))])
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps)
    lrs = []
    for step in range(max(steps) + 1):
        if step in steps:
            lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_ssdlite320_coco_is_torchvisions_recipe(tmp_path: Path) -> None:
    for devices, nodes in (("1", "1"), ("8", "1"), ("8", "2")):
        cfg = compose_config(
            "train",
            ["experiment=ssdlite320_coco", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}"],
            tmp_path,
        )
        assert cfg.run_name == "ssdlite320_coco" and cfg.model.name == "ssdlite320"
        assert cfg.dataset.name == "coco" and cfg.dataset.global_batch_size == 192  # 8 GPUs x 24
        assert cfg.dataset.batch_size is None
        assert (cfg.optimizer.lr, cfg.optimizer.base_batch_size) == (0.15, 192) and not cfg.scale_lr
        assert (cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.9, 4e-5)
        assert cfg.trainer.max_epochs == 660 and cfg.trainer.max_steps == -1
    # From scratch with the reduced tail; torchvision's "ssdlite" augmentation: IoU crop and flip only.
    assert cfg.model.backbone_weights is None and cfg.model.net.reduced_tail is True
    augmentation = cfg.dataset.augmentation
    assert not augmentation.photometric and augmentation.expand_p == 0 and augmentation.hflip_p == 0.5
    assert list(augmentation.crop_min_ious) == [None, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9]
    # Warmup over the first epoch from lr/1000, then cosine to 0 at the end of the run.
    per_epoch = 10  # a short run: the schedule has the same shape
    total = 660 * per_epoch
    middle = per_epoch + (total - per_epoch) // 2
    start, warm, middle, end = lr_at(cfg, 192, [0, per_epoch, middle, total], total)
    assert start == pytest.approx(0.15e-3) and warm == pytest.approx(0.15)
    assert middle == pytest.approx(0.075, rel=1e-3) and end == pytest.approx(0.0, abs=1e-9)


def test_ssd300_resnet50_coco_is_nvidias_recipe(tmp_path: Path) -> None:
    for devices, nodes in (("1", "1"), ("8", "1"), ("8", "2")):
        cfg = compose_config(
            "train",
            ["experiment=ssd300_resnet50_coco", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}"],
            tmp_path,
        )
        assert cfg.run_name == "ssd300_resnet50_coco" and cfg.model.name == "ssd300_resnet50"
        assert cfg.dataset.name == "coco" and cfg.dataset.global_batch_size == 512  # 8 GPUs x 64
        assert (cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.9, 5e-4)
        assert cfg.trainer.max_epochs == 65 and cfg.trainer.max_steps == -1
    assert cfg.model.backbone_weights == "IMAGENET1K_V2" and cfg.model.net.prior_preset_name == "coco"
    assert cfg.dataset.augmentation.expand_p == 0 and cfg.dataset.augmentation.photometric
    # NVIDIA's rule, lr = 2.6e-3 x global batch / 32: 0.0416 at its 512, and scaled if the batch changes.
    assert cfg.scale_lr and (cfg.optimizer.lr, cfg.optimizer.base_batch_size) == (2.6e-3, 32)
    assert optimizer_factory(cfg, 512).keywords["lr"] == pytest.approx(0.0416)
    assert optimizer_factory(cfg, 64).keywords["lr"] == pytest.approx(0.0052)
    # lr x0.1 at epochs 43 and 54 of 65, whatever the number of steps per epoch.
    for batch in (512, 64, 8):
        per_epoch = -(-COCO_TRAIN_IMAGES // batch)
        milestones = [resolve_steps(m, 65 * per_epoch, "m") for m in cfg.scheduler.milestones]
        assert milestones == [43 * per_epoch, 54 * per_epoch], batch
    per_epoch = 10  # a short run: warmup and milestones are as in a real one
    steps = [0, 300, 43 * per_epoch - 1, 43 * per_epoch, 54 * per_epoch, 65 * per_epoch - 1]
    lrs = lr_at(cfg, 512, steps, 65 * per_epoch)
    expected = [0.0416 * 0.0033, 0.0416, 0.0416, 0.00416, 0.000416, 0.000416]  # 300 steps of linear warmup
    assert lrs == pytest.approx(expected)


# 3. Train, evaluate, predict, export ---------------------------------------------------------------


def coco128_overrides(coco128_root: Path) -> list[str]:
    return [
        "dataset=coco",
        f"dataset.root={coco128_root / 'coco'}",
        "dataset.val_split=train2017",
        "dataset.batch_size=2",  # BatchNorm on SSDLite's 1x1 maps needs two images per device
        "dataset.num_workers=0",
    ]


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("model", "size", "top_k", "score_threshold"),
    [
        # 160 px for speed: SSDLite's boxes follow its feature maps (10, 5, 3, 2, 1, 1 cells a side).
        ("ssdlite320", 160, 300, 0.001),
        ("ssd300_resnet50", 300, 200, 0.05),
    ],
)
def test_each_model_trains_evaluates_predicts_and_exports_on_coco128(
    model: str, size: int, top_k: int, score_threshold: float, coco128_root: Path, tmp_path: Path
) -> None:
    data = coco128_overrides(coco128_root)
    overrides = [
        f"model={model}",
        f"model.image_size={size}",
        "model.backbone_weights=null",  # no download in CI
        *data,
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.val_check_interval=2",
        "trainer.check_val_every_n_epoch=null",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "callbacks.progress_bar=null",
        "test=false",  # eval.py below evaluates the same checkpoint
    ]
    metrics = train(compose_config("train", overrides, tmp_path / "train"))
    assert metrics["step"] == 2
    for key in ("train/loss", "val/map", "val/map_voc07"):
        assert key in metrics and metrics[key] == metrics[key], key  # logged and not NaN
    checkpoint = tmp_path / "train" / "checkpoints" / "last.ckpt"
    hparams = torch.load(checkpoint, weights_only=False, map_location="cpu")["hyper_parameters"]
    assert hparams["net"]["size"] == size and hparams["net"]["top_k"] == top_k

    # eval.py: the checkpoint's network on the same two images gives the mAP the run logged for them.
    cpu = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false"]
    eval_cfg = compose_config(
        "eval",
        [*data, f"ckpt_path={checkpoint}", "split=val", "trainer.limit_val_batches=1", *cpu],
        tmp_path / "eval",
    )
    result = evaluate(eval_cfg)
    assert result.map == pytest.approx(metrics["val/map"], abs=1e-6)
    assert result.map_voc07 == pytest.approx(metrics["val/map_voc07"], abs=1e-6)

    # predict.py: the model's own thresholds (torchvision's / NVIDIA's) and COCO category ids.
    images = tmp_path / "images"
    images.mkdir()
    for jpeg in sorted((coco128_root / "coco" / "train2017").glob("*.jpg"))[:2]:
        shutil.copy(jpeg, images / jpeg.name)
    predict_args = [f"ckpt_path={checkpoint}", f"input={images}", "save_images=false", *cpu]
    predict_cfg = compose_config("predict", predict_args, tmp_path / "predict")
    (tmp_path / "predict").mkdir()  # Hydra's run folder
    results = json.loads(predict(predict_cfg).read_text())
    annotations = json.loads((coco128_root / "coco" / "annotations" / "instances_train2017.json").read_text())
    assert {r["category_id"] for r in results} <= {c["id"] for c in annotations["categories"]}
    per_image = [sum(r["image_id"] == i for r in results) for i in {r["image_id"] for r in results}]
    assert all(count <= top_k for count in per_image) and all(r["score"] > score_threshold for r in results)
    if model == "ssdlite320":  # an untrained network leaves every class above 0.001: the 300 cap is reached
        assert per_image == [300, 300]

    # export.py: a file of the checkpoint's network and thresholds that runs on its own. TorchScript here:
    # tests/test_export_backbones.py checks both architectures' ONNX graphs against PyTorch (ONNX export
    # costs ~10 s a network on this CPU).
    export_cfg = compose_config(
        "export",
        [f"ckpt_path={checkpoint}", "format=torchscript", f"output={tmp_path / 'model.pt'}"],
        tmp_path / "export",
    )
    exported = export(export_cfg)
    metadata = read_metadata(exported)
    assert metadata["image_size"] == size and metadata["net"]["arch"] == hparams["net"]["arch"]
    assert metadata["top_k"] == top_k and len(metadata["class_names"]) == 80
    with torch.no_grad():
        detections = unpad_detections(*torch.jit.load(str(exported))(torch.rand(2, 3, size, size)))
    assert len(detections) == 2 and all(len(d["scores"]) <= top_k for d in detections)


# 4. Fine-tuning from the peers' weights ---------------------------------------------------------------


@pytest.mark.parametrize("source", ["torchvision", "nvidia"])
def test_fine_tuning_starts_from_the_peers_weights(
    source: str,
    torchvision_ssdlite_file: Path,
    nvidia_checkpoint_file: Path,
    coco128_root: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, path = {
        "torchvision": ("ssdlite320", torchvision_ssdlite_file),
        "nvidia": ("ssd300_resnet50", nvidia_checkpoint_file),
    }[source]
    # backbone_weights keeps its ImageNet default: model.weights wins, and nothing is downloaded.
    overrides = [f"model={model}", f"model.weights={path}", f"model.weights_source={source}"]
    cfg = compose_config("train", [*overrides, *coco128_overrides(coco128_root)], tmp_path)
    module = build_module(cfg, instantiate_datamodule(cfg))
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        initialise_weights(cfg, module)

    converted = sl.convert_state_dict(torch.load(path, weights_only=True), source=source)
    own = module.net.state_dict()
    assert set(own) == set(converted)
    fresh = {k for k, v in converted.items() if v.shape != own[k].shape}
    if source == "torchvision":
        # torchvision's 91 COCO ids against coco128's 80 classes + background: the class-score convs of the
        # six heads (weight and bias, 6 boxes x classes outputs) stay fresh, nothing else.
        assert len(fresh) == 12
        assert all(converted[k].shape[0] == 6 * 91 and own[k].shape[0] == 6 * 81 for k in fresh)
    else:
        assert not fresh  # NVIDIA's 81 classes are coco128's
    for key, tensor in converted.items():
        if key not in fresh:
            torch.testing.assert_close(own[key], tensor, rtol=0, atol=0, msg=key)
    assert f"from {path}:" in caplog.text
