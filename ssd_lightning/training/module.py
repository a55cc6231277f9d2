"""The LightningModule: SSD network + MultiBoxLoss, evaluation in original pixels, optimiser from config."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ssd_lightning.data.transforms import normalize_images
from ssd_lightning.loss import MultiBoxLoss
from ssd_lightning.metrics.evaluation import (
    DetectionEvaluator,
    EvaluationResult,
    detections_in_pixels,
    to_pixels,
)
from ssd_lightning.models import build_ssd
from ssd_lightning.optim import apply_lr_mults, parameter_groups
from ssd_lightning.training.ema import holds_ema_weights
from ssd_lightning.training.rng import restore_rng_states, rng_states
from ssd_lightning.training.wandb_logging import record_run_id

Batch = tuple[Tensor, list[dict[str, Any]]]
OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[..., LRScheduler]

BEST_PREFIX = "best/"  # logged metrics and metrics.json: the best value of each validation metric so far
BEST_VALIDATION_KEY = "best_validation"
RNG_STATES_KEY = "rng_states"
DATAMODULE_ARGUMENTS_KEY = "datamodule_hyper_parameters"  # Lightning's: the DataModule's save_hyperparameters


class SSDLitModule(pl.LightningModule):
    """Trains and evaluates an SSD detector.

    Args:
        class_names: object classes without the background; the network gets `len(class_names) + 1`
            outputs, so the class count always follows the data.
        net: keyword arguments of `ssd_lightning.build_ssd` except `num_classes` (arch, size, priors...).
        pixel_mean, pixel_std: the input normalisation the data used (0-255 scale, RGB); kept so that a
            checkpoint alone suffices for prediction.
        loss: keyword arguments of `MultiBoxLoss` except `num_classes`.
        optimizer: `params -> Optimizer` (a Hydra `_partial_`); biases and norm scales get no weight decay.
        scheduler: `(optimizer, total_steps) -> LRScheduler`, stepped every optimiser step; None: constant lr.
        channels_last: run the network in channels-last memory format (faster convolutions on recent GPUs).
        category_ids: for COCO data, the original category id of each contiguous label (index = label - 1),
            used by exported detections.
        backbone_lr_mult: the backbone's learning rate relative to the optimiser's (fine-tuning).
        freeze_backbone: keep the backbone's weights and BatchNorm statistics as loaded.
        compile: `torch.compile` the network's forward pass (state dict keys unchanged).

    Plain data only (no callables) goes into the checkpoint's hyper-parameters, so
    `SSDLitModule.load_from_checkpoint(path)` rebuilds the network without any config.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        net: Mapping[str, Any],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        loss: Mapping[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        channels_last: bool = False,
        category_ids: Sequence[int] | None = None,
        backbone_lr_mult: float = 1.0,
        freeze_backbone: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if "num_classes" in net:
            raise ValueError(
                "model.net.num_classes must not be set: the number of classes follows the dataset "
                "(dataset.classes); remove it from the model config"
            )
        if category_ids is not None and len(category_ids) != len(class_names):
            raise ValueError(f"{len(category_ids)} category ids for {len(class_names)} classes")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names) + 1
        self.net = build_ssd(num_classes=self.num_classes, **net)
        self.criterion = MultiBoxLoss(self.num_classes, **(loss or {}))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.net.backbone.requires_grad_(False)
        if compile:
            self.net.compile()  # in place: the module and its state dict keys stay as they are
        self.val_evaluator = DetectionEvaluator(self.class_names)
        self.test_evaluator = DetectionEvaluator(self.class_names)
        self.last_evaluation: EvaluationResult | None = None
        # Best value of each validation scalar so far (what a sweep optimises), kept in checkpoints and logged
        # as best/val/<name> (so that it also reaches the main process of ddp_spawn). train.py turns it off
        # when validation is the test split: a best value there would be selected on the test images.
        self.best_validation: dict[str, float] = {}
        self.track_best_validation = True
        self.loaded_ema_weights = False  # set when a checkpoint's state_dict was an EMA average
        self.datamodule_arguments: dict[str, Any] | None = None  # from_checkpoint: the data it was trained on
        # Set by NonFiniteGuard: keep each step's loss terms and largest predictions (device tensors).
        self.record_step_stats = False
        self.step_stats: dict[str, Tensor] = {}

    @property
    def image_size(self) -> int:
        return self.net.image_size

    def train(self, mode: bool = True) -> SSDLitModule:
        super().train(mode)
        if self.freeze_backbone:
            self.net.backbone.eval()  # frozen BatchNorm statistics too
        return self

    def prepare_images(self, images: Tensor) -> Tensor:
        """uint8 images (what the data module sends: 4x less to copy) normalised where they are, in
        float32, then cast to the network's dtype (Lightning casts a batch before it holds floats);
        float images pass through."""
        if images.dtype != torch.uint8:
            return images
        images = normalize_images(images, self.hparams["pixel_mean"], self.hparams["pixel_std"])
        return images.to(next(self.net.parameters()).dtype)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        # Here rather than in on_after_batch_transfer, which Lightning warns about next to a data module.
        images = self.prepare_images(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def _predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        loc, conf = self(images)
        # Loss and post-processing in float32 whatever the autocast precision (NMS has no bf16 kernels).
        return loc.float(), conf.float()

    def _losses(
        self, loc: Tensor, conf: Tensor, targets: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        loss_loc, loss_conf = self.criterion(loc, conf, self.net.priors, targets)
        return {"loss": loss_loc + loss_conf, "loss_loc": loss_loc, "loss_conf": loss_conf}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        loc, conf = self._predict(images)
        losses = self._losses(loc, conf, targets)
        if self.record_step_stats:
            self.step_stats = {
                "loss_loc": losses["loss_loc"].detach(),
                "loss_conf": losses["loss_conf"].detach(),
                "loc_absmax": loc.detach().abs().amax(),
                "conf_absmax": conf.detach().abs().amax(),
            }
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=len(images))
        self.log_dict(
            {"train/loss_loc": losses["loss_loc"], "train/loss_conf": losses["loss_conf"]},
            batch_size=len(images),
        )
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=len(images))
        return losses["loss"]

    def _evaluation_step(
        self, batch: Batch, evaluator: DetectionEvaluator, stage: str
    ) -> list[dict[str, Tensor]]:
        images, targets = batch
        loc, conf = self._predict(images)
        # The loss sees what training sees: difficult objects are not targets.
        kept = [_without_difficult(t) for t in targets]
        losses = self._losses(loc, conf, kept)
        self.log_dict(
            {f"{stage}/{k}": v for k, v in losses.items()},
            batch_size=len(images),
            sync_dist=True,
            on_epoch=True,
        )
        detections = self.net.detect(loc, conf)
        evaluator.update(*detections_in_pixels(detections, targets))
        return detections

    def _evaluation_epoch_end(self, evaluator: DetectionEvaluator, stage: str) -> None:
        result = evaluator.compute()
        evaluator.reset()
        if not self.trainer.sanity_checking:  # a couple of batches only: not a result to report
            self.last_evaluation = result
            if stage == "val" and self.track_best_validation:
                for key, value in result.scalars().items():
                    name = f"val/{key}"
                    self.best_validation[name] = max(value, self.best_validation.get(name, float("-inf")))
                self.log_dict(
                    {f"{BEST_PREFIX}{k}": v for k, v in self.best_validation.items()}, sync_dist=True
                )
        # Values are already synced across ranks by the metrics; sync_dist only averages equal numbers.
        self.log_dict({f"{stage}/{k}": v for k, v in result.scalars().items()}, sync_dist=True)
        self.log_dict(
            {f"{stage}/ap_voc07/{k}": v for k, v in result.per_class_ap_voc07.items()}, sync_dist=True
        )
        best = result.thresholds.overall.best if result.thresholds is not None else None
        if best is not None:  # when asked for (training/run_plots.py): metrics.json has them
            self.log_dict(
                {f"{stage}/best_f1": best.f1, f"{stage}/best_f1_threshold": best.threshold}, sync_dist=True
            )

    def validation_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Tensor]]:
        return self._evaluation_step(batch, self.val_evaluator, "val")

    def on_validation_epoch_end(self) -> None:
        self._evaluation_epoch_end(self.val_evaluator, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Tensor]]:
        return self._evaluation_step(batch, self.test_evaluator, "test")

    def on_test_epoch_end(self) -> None:
        self._evaluation_epoch_end(self.test_evaluator, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Any]]:
        """Per image: boxes in original pixels (xyxy), scores, labels, class names, and the input metadata."""
        images, metas = batch
        detections = self.net.detect(*self._predict(images))
        results = []
        for det, meta in zip(detections, metas, strict=True):
            labels = det["labels"].cpu()
            results.append(
                {
                    **{k: v for k, v in meta.items() if k not in ("boxes", "labels", "difficult")},
                    "boxes": to_pixels(det["boxes"].float(), meta["orig_size"].to(det["boxes"].device)).cpu(),
                    "scores": det["scores"].float().cpu(),
                    "labels": labels,
                    "names": [self.class_names[label - 1] for label in labels.tolist()],
                }
            )
        return results

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError(
                "SSDLitModule was built without an optimizer factory; it can evaluate but not train"
            )
        groups = parameter_groups(self.net, self.net.backbone, self.backbone_lr_mult)
        optimizer = apply_lr_mults(self.optimizer_factory(groups))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record_run_id(checkpoint, self.loggers)  # `python train.py ckpt_path=...` continues the W&B run
        checkpoint[BEST_VALIDATION_KEY] = dict(self.best_validation)
        checkpoint[RNG_STATES_KEY] = rng_states()

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> SSDLitModule:
        """The module a checkpoint dict describes (its hyper-parameters), with its weights; for inference. The
        DataModule's arguments it was trained with are kept as `datamodule_arguments` (None if absent)."""
        module = cls(**checkpoint["hyper_parameters"])
        module.on_load_checkpoint(dict(checkpoint))
        module.load_state_dict(checkpoint["state_dict"])
        module.datamodule_arguments = checkpoint.get(DATAMODULE_ARGUMENTS_KEY)
        return module

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_ema_weights = holds_ema_weights(checkpoint)
        self.best_validation = dict(checkpoint.get(BEST_VALIDATION_KEY, {}))
        if RNG_STATES_KEY in checkpoint:
            restore_rng_states(checkpoint[RNG_STATES_KEY])


def validation_metric_names(class_names: Sequence[str]) -> list[str]:
    """Every metric a run logs at validation, and the training losses (what `monitor` may name)."""
    losses = [f"{stage}/{name}" for stage in ("val", "train") for name in ("loss", "loss_loc", "loss_conf")]
    return [*(f"val/{k}" for k in EvaluationResult.scalar_names()), *losses] + [
        f"val/ap_voc07/{name}" for name in class_names
    ]


def _without_difficult(target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if "difficult" not in target:
        return dict(target)
    keep = ~target["difficult"]
    return {"boxes": target["boxes"][keep], "labels": target["labels"][keep]}
