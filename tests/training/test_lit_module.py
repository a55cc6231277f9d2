"""SSDLitModule: train/val/predict steps, evaluation in original pixels, precision, checkpoints."""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ssd_lightning.data import build_eval_transform, build_train_transform, collate_detection
from ssd_lightning.data.transforms import normalize_images
from ssd_lightning.metrics.evaluation import DetectionEvaluator, detections_in_pixels
from ssd_lightning.optim import warmup_multistep
from ssd_lightning.training.module import SSDLitModule
from ssd_lightning.visualize import denormalize

CLASSES = ["cat", "dog", "bird"]
SIZE = 64


def make_module(**kwargs) -> SSDLitModule:
    options = {
        "class_names": CLASSES,
        "net": {"arch": "compact", "size": SIZE, "width": 8},
        "pixel_mean": [127.0, 127.0, 127.0],
        "pixel_std": [64.0, 64.0, 64.0],
        "optimizer": functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=5e-4),
        "scheduler": functools.partial(warmup_multistep, milestones=[0.5], warmup_steps=1),
        **kwargs,
    }
    return SSDLitModule(**options)


def samples(count: int = 4) -> list[tuple[torch.Tensor, dict]]:
    """Images with one or two boxes; original sizes differ per image, one object is difficult."""
    generator = torch.Generator().manual_seed(0)
    items = []
    for index in range(count):
        boxes = torch.tensor([[0.1, 0.2, 0.5, 0.7], [0.55, 0.1, 0.95, 0.45]])[: 1 + index % 2]
        items.append(
            (
                torch.randn(3, SIZE, SIZE, generator=generator),
                {
                    "boxes": boxes,
                    "labels": torch.tensor([1, 3])[: len(boxes)],
                    "difficult": torch.tensor([False, index == 3])[: len(boxes)],
                    "image_id": index,
                    "orig_size": torch.tensor([200 + 10 * index, 300]),
                },
            )
        )
    return items


def loader(count: int = 4) -> DataLoader:
    return DataLoader(samples(count), batch_size=2, collate_fn=collate_detection)


def trainer(**kwargs) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    return pl.Trainer(**options)


def test_fit_logs_losses_learning_rate_and_metrics() -> None:
    module = make_module()
    fit = trainer(max_steps=4, log_every_n_steps=1)
    fit.fit(module, loader(), loader())
    metrics = fit.callback_metrics
    for key in (
        "train/loss",
        "train/loss_loc",
        "train/loss_conf",
        "val/loss",
        "val/map_voc07",
        "val/map_voc12",
    ):
        assert torch.isfinite(metrics[key]), key
    assert {"val/map", "val/map_50", "val/map_75", "val/ap_voc07/cat", "val/ap_voc07/bird"} <= set(metrics)
    assert metrics["train/loss"] == pytest.approx(
        float(metrics["train/loss_loc"] + metrics["train/loss_conf"])
    )
    # lr after 4 steps: warmup done after 1, halved run (milestone 0.5 of 4 steps) -> 0.01 * 0.1
    assert float(metrics["train/lr"]) == pytest.approx(0.001)
    assert fit.global_step == 4


def _shifted(box: list[float], iou: float) -> list[float]:
    """`box` moved right by the fraction of its width that leaves IoU `iou` with it: (1 - f) / (1 + f)."""
    shift = (1 - iou) / (1 + iou) * (box[2] - box[0])
    return [box[0] + shift, box[1], box[2] + shift, box[3]]


def test_validation_scores_detections_in_original_pixels() -> None:
    # A wide 400x150 image: in its pixels the cat is large (200x120), the dog medium (80x60) and the bird
    # small (20x22.5) in COCO's area ranges; at the 64-pixel network input or in [0, 1] units they are not.
    truth = torch.tensor([[0.1, 0.1, 0.6, 0.9], [0.65, 0.2, 0.85, 0.6], [0.9, 0.7, 0.95, 0.85]])
    target = {
        "boxes": truth,
        "labels": torch.tensor([1, 2, 3]),
        "difficult": torch.zeros(3, dtype=torch.bool),
        "image_id": 0,
        "orig_size": torch.tensor([150, 400]),
    }
    # Detections off by a known IoU: cat 0.72 (COCO AP 0.5: thresholds 0.5..0.7 of 0.5..0.95), dog exact
    # (1.0), bird 0.92 (0.9). Scaled to pixels on one side only, or with the wrong size, they miss.
    found = torch.tensor(
        [_shifted(truth[0].tolist(), 0.72), truth[1].tolist(), _shifted(truth[2].tolist(), 0.92)]
    )
    module = make_module()
    module.net.detect = lambda loc, conf: [
        {"boxes": found, "scores": torch.ones(3), "labels": target["labels"]}
    ]
    batches = DataLoader([(torch.randn(3, SIZE, SIZE), target)], batch_size=1, collate_fn=collate_detection)
    (result,) = trainer().validate(module, batches, verbose=False)
    expected = {
        "map_voc07": 1.0,
        "map_50": 1.0,
        "map_75": 2 / 3,
        "map": (0.5 + 1.0 + 0.9) / 3,
        "map_large": 0.5,
        "map_medium": 1.0,
        "map_small": 0.9,
    }
    assert {k: result[f"val/{k}"] for k in expected} == pytest.approx(expected, abs=1e-4)
    assert module.last_evaluation.per_class_ap_voc07 == pytest.approx({"cat": 1.0, "dog": 1.0, "bird": 1.0})


def test_missing_a_difficult_object_costs_nothing() -> None:
    evaluator = DetectionEvaluator(CLASSES)
    targets = [t for _, t in samples()]
    # Detect everything but the difficult object of image 3.
    detections = [
        {
            "boxes": t["boxes"][~t["difficult"]],
            "scores": torch.ones(int((~t["difficult"]).sum())),
            "labels": t["labels"][~t["difficult"]],
        }
        for t in targets
    ]
    evaluator.update(*detections_in_pixels(detections, targets))
    result = evaluator.compute()
    assert (result.map_voc07, result.map_voc12) == (pytest.approx(1.0), pytest.approx(1.0))
    assert result.map == pytest.approx(1.0)  # difficult objects are COCO "crowd" (ignored) regions


def test_pixel_scaling_uses_height_then_width() -> None:
    detections = [
        {"boxes": torch.tensor([[0.1, 0.2, 0.5, 0.6]]), "scores": torch.ones(1), "labels": torch.ones(1)}
    ]
    target = {
        "boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
        "labels": torch.ones(1, dtype=torch.long),
        "orig_size": torch.tensor([200, 100]),
    }
    (pred,), (truth,) = detections_in_pixels(detections, [target])
    assert pred["boxes"].tolist() == [pytest.approx([10.0, 40.0, 50.0, 120.0])]
    assert truth["boxes"].tolist() == [[0.0, 0.0, 100.0, 200.0]] and truth["difficult"].tolist() == [False]


def test_predict_step_gives_pixels_and_class_names() -> None:
    module = make_module().eval()
    images, targets = next(iter(loader()))
    module.net.detect = lambda loc, conf: [
        {
            "boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]]),
            "scores": torch.tensor([0.9]),
            "labels": torch.tensor([2]),
        }
        for _ in range(loc.shape[0])
    ]
    first = module.predict_step((images, targets), 0)[0]
    assert first["names"] == ["dog"] and first["image_id"] == 0
    assert first["boxes"].tolist() == [[150.0, 100.0, 300.0, 200.0]]  # orig_size (200, 300)


class StepLosses(pl.Callback):
    """The training loss of every step."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def test_bf16_mixed_precision_trains_on_cpu() -> None:
    # oneDNN's bf16 convolution backward (torch 2.14 on CPU) leaves garbage, up to 1e32 or NaN, in the
    # weight gradient of kernel taps that only see padding (3x3 convs on the 1x1 maps of every SSD
    # here); PyTorch's own kernels are right. This test is about our bf16 path, so it runs on those.
    runs = {}
    with torch.backends.mkldnn.flags(enabled=False):
        for precision in ("32-true", "bf16-mixed"):
            torch.manual_seed(0)
            module, losses = make_module(), StepLosses()
            batch = loader(2)  # the same two images every step (one step per epoch), validated after 4
            fit = trainer(max_steps=4, precision=precision, check_val_every_n_epoch=4, callbacks=[losses])
            fit.fit(module, batch, batch)
            runs[precision] = losses.values, float(fit.callback_metrics["val/loss"])
    (bf16, bf16_val), (fp32, fp32_val) = runs["bf16-mixed"], runs["32-true"]
    assert len(bf16) == 4 and np.isfinite(bf16).all() and np.isfinite(bf16_val)
    assert bf16[-1] < 0.8 * bf16[0]  # it learns: 14.8 -> 10.5 in 3 updates here
    # ... as fp32 does, within bf16's rounding: 3% apart here, 6% allowed
    assert bf16[-1] == pytest.approx(fp32[-1], rel=0.06) and bf16_val == pytest.approx(fp32_val, rel=0.06)


def test_channels_last_gives_the_same_outputs() -> None:
    torch.manual_seed(0)
    plain = make_module().eval()
    fast = make_module(channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, SIZE, SIZE)
    for a, b in zip(plain(images), fast(images), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_checkpoint_alone_rebuilds_the_module(tmp_path: Path) -> None:
    module = make_module()
    fit = trainer(max_steps=1, limit_val_batches=0)
    fit.fit(module, loader())
    fit.save_checkpoint(tmp_path / "model.ckpt")
    # Only plain data in the hyper-parameters: loads even with torch's safe (weights-only) unpickler.
    loaded = SSDLitModule.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    assert loaded.class_names == CLASSES and loaded.hparams.pixel_std == [64.0] * 3
    images = torch.randn(2, 3, SIZE, SIZE)
    for a, b in zip(module.eval()(images), loaded.eval()(images), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="without an optimizer"):
        loaded.configure_optimizers()


def test_num_classes_is_not_a_model_setting() -> None:
    with pytest.raises(ValueError, match="follows the dataset"):
        make_module(net={"arch": "compact", "size": SIZE, "num_classes": 5})


MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


def _transformed(normalize: bool, train: bool) -> list[tuple[torch.Tensor, dict]]:
    """Four photos-like uint8 images through the data module's transforms, float or uint8 out."""
    rng = np.random.default_rng(1)
    build = build_train_transform if train else build_eval_transform
    transform = build(SIZE, MEAN, STD, normalize=normalize)
    transform.reseed(7)  # the same augmentation draws both ways
    items = []
    for index in range(4):
        height, width = 70 + 10 * index, 90
        image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (5, 5), 2)
        target = {
            "boxes": np.array([[10, 10, 60, 50], [40, 20, 85, 65]], np.float32),
            "labels": np.array([1, 3]),
            "difficult": np.array([False, False]),
            "image_id": index,
            "orig_size": np.array([height, width]),
        }
        items.append(transform(image, target))
    return items


@pytest.mark.parametrize("train", [False, True])
def test_uint8_batches_normalised_on_the_device_give_the_float_path_numbers(train: bool) -> None:
    floats, pixels = _transformed(normalize=True, train=train), _transformed(normalize=False, train=train)
    assert pixels[0][0].dtype == torch.uint8 and floats[0][0].dtype == torch.float32
    module = make_module(pixel_mean=MEAN, pixel_std=STD)
    float_batch = collate_detection(floats)
    images, targets = collate_detection(pixels)
    images = module.prepare_images(images)
    assert images.dtype == torch.float32 and torch.equal(images, float_batch[0])  # bit for bit
    for a, b in zip(targets, float_batch[1], strict=True):
        assert a["boxes"].equal(b["boxes"]) and a["labels"].equal(b["labels"])
    # Through Lightning's loops (normalised in the step, on the device): the same numbers.
    results = []
    for items in (floats, pixels):
        torch.manual_seed(0)
        module = make_module(pixel_mean=MEAN, pixel_std=STD)
        batches = DataLoader(items, batch_size=2, collate_fn=collate_detection)
        trainer(max_steps=2).fit(module, batches)
        predictions = trainer().predict(module, batches)
        results.append((torch.cat([p.flatten() for p in module.parameters()]), predictions))
    (float_weights, float_predictions), (uint8_weights, uint8_predictions) = results
    assert torch.equal(float_weights, uint8_weights)
    for a, b in zip(sum(float_predictions, []), sum(uint8_predictions, []), strict=True):
        assert a["boxes"].equal(b["boxes"]) and a["scores"].equal(b["scores"])


def test_device_normalisation_follows_the_network_dtype() -> None:
    module = make_module(pixel_mean=MEAN, pixel_std=STD).to(torch.bfloat16)
    images = module.prepare_images(collate_detection(_transformed(False, False))[0])
    assert images.dtype == torch.bfloat16
    floats = collate_detection(_transformed(True, False))[0]
    assert torch.equal(images, floats.to(torch.bfloat16))  # normalised in float32, then cast


def test_wandb_image_panel_shows_the_same_pixels_for_uint8_and_normalised_images() -> None:
    pixels = collate_detection(_transformed(False, True))[0][0]
    shown = denormalize(pixels, MEAN, STD)
    assert shown.dtype == np.uint8 and shown.shape == (SIZE, SIZE, 3)
    assert np.array_equal(shown, pixels.permute(1, 2, 0).numpy())
    assert np.array_equal(denormalize(normalize_images(pixels, MEAN, STD), MEAN, STD), shown)
