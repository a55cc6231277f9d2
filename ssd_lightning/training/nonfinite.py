"""Non-finite losses: stop with a report that says what went wrong and where, or skip the step.

The checks stay on the device (flags and counters updated with tensor ops); the host reads them only every
`check_every_n_steps` steps, before a checkpoint is written and before validation, so no training step
waits for the GPU. What the report needs from the host side (image ids, learning rate) is kept for the
steps since the last read.

Under DDP a step is bad on every rank when it is bad on one (a one-number all-reduce on the device each step),
so all ranks undo the same steps and stop at the same check: one rank never stops while the others wait for
it in the next collective.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor

from ssd_lightning.training.distributed import all_ranks_max, all_ranks_values

MODES = ("stop", "skip")
_STATS = ("loss_loc", "loss_conf", "loc_absmax", "conf_absmax")


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient; the message is the report."""


class NonFiniteGuard(pl.Callback):
    """Watches every training step for a non-finite loss term or gradient.

    mode="stop": the run stops (NonFiniteLossError) at the next check after the first bad step, with a
    report: step, the batch's images and boxes, which loss term went bad, the largest predictions, the
    learning rate, the last checkpoint written before it, and the usual causes. No checkpoint is written
    once a bad step happened. mode="skip": a bad step leaves weights and optimiser state as they were (they
    are restored on the device), is counted (`train/nonfinite_steps`), and `skip_limit` bad steps in a row
    stop the run with the report.

    Gradients are checked too, except under a GradScaler (16-mixed), which skips steps with overflowing
    gradients itself.
    """

    def __init__(
        self, mode: str = "stop", skip_limit: int = 10, check_every_n_steps: int | None = None
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"callbacks.nonfinite.mode={mode!r}: choose one of {MODES}")
        if skip_limit < 1:
            raise ValueError(f"callbacks.nonfinite.skip_limit must be >= 1, got {skip_limit}")
        self.mode = mode
        self.skip_limit = skip_limit
        self.check_every_n_steps = check_every_n_steps
        self._state: dict[str, Tensor] = {}
        self._history: deque[dict[str, Any]] = deque()
        self._saved: dict[int, tuple[Tensor, Tensor]] | None = None
        self._finite: Tensor | None = None
        self._checkpoint_step: int | None = None
        self._first_record: dict[str, Any] | None = None

    # --- device-side bookkeeping -------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.record_step_stats = True
        if self.check_every_n_steps is None:
            self.check_every_n_steps = max(1, trainer.log_every_n_steps)

    def _reset_state(self, device: torch.device) -> None:
        self._state = {
            "first_step": torch.full((), -1, dtype=torch.long, device=device),
            "local_first_step": torch.full((), -1, dtype=torch.long, device=device),  # this rank's own
            "first_stats": torch.zeros(len(_STATS), device=device),
            "bad_steps": torch.zeros((), dtype=torch.long, device=device),
            "run": torch.zeros((), dtype=torch.long, device=device),
            "longest_run": torch.zeros((), dtype=torch.long, device=device),
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_state(pl_module.device)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        _, targets = batch
        optimizer = trainer.optimizers[0]
        self._history.append(  # host values only: reading them waits for nothing
            {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "image_ids": [int(t["image_id"]) for t in targets if "image_id" in t],
                "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)},
            }
        )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        stats: Mapping[str, Tensor] = getattr(pl_module, "step_stats", {})
        if not stats:
            return
        values = torch.stack([stats[name].float() for name in _STATS])
        finite = torch.isfinite(values[:2]).all()
        if not _uses_grad_scaler(trainer):
            grads = [
                p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
            ]
            if grads:
                finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(grads))
        local_bad = ~finite
        bad = all_ranks_max(local_bad.long()).bool()  # the same decision on every rank
        finite = ~bad
        state = self._state
        own = local_bad & (state["local_first_step"] < 0)
        state["local_first_step"] = torch.where(own, trainer.global_step, state["local_first_step"])
        take = bad & (state["first_step"] < 0)
        state["first_step"] = torch.where(take, trainer.global_step, state["first_step"])
        state["first_stats"] = torch.where(take, values, state["first_stats"])
        state["bad_steps"] = state["bad_steps"] + bad.long()
        state["run"] = (state["run"] + 1) * bad.long()
        state["longest_run"] = torch.maximum(state["longest_run"], state["run"])
        if self.mode == "skip":
            self._finite = finite
            self._saved = {id(t): (t, t.detach().clone()) for t in _step_tensors(optimizer)}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._saved is not None and self._finite is not None:
            # A bad step is undone where it happened: weights and optimiser state as before it (state the
            # step created, e.g. Adam's moments on the first step, as fresh: zeros).
            with torch.no_grad():
                for tensor in _step_tensors(trainer.optimizers[0]):
                    before = self._saved.get(id(tensor), (tensor, torch.zeros_like(tensor)))[1]
                    tensor.copy_(torch.where(self._finite, tensor, before))
            self._saved = self._finite = None
        step = trainer.global_step
        if step % self.check_every_n_steps == 0 or _checkpoint_due(trainer, step):
            self.check(trainer)
            if self.mode == "skip":
                pl_module.log("train/nonfinite_steps", self._state["bad_steps"].float(), rank_zero_only=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self.check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._checkpoint_step = trainer.global_step

    # --- host-side checks ----------------------------------------------------------------------

    def check(self, trainer: pl.Trainer) -> None:
        """Read the device flags (one synchronisation) and stop the run if they say so."""
        if not self._state:
            return
        first_step = int(self._state["first_step"])
        if self.mode == "skip" and int(self._state["longest_run"]) >= self.skip_limit:
            what = f"{self.skip_limit} non-finite steps in a row (callbacks.nonfinite.skip_limit)"
            raise NonFiniteLossError(self.report(trainer, first_step, what))
        if self.mode == "stop" and first_step >= 0:
            raise NonFiniteLossError(
                self.report(trainer, first_step, "the run stopped (callbacks.nonfinite.mode=stop)")
            )
        if first_step >= 0 and self._first_record is None:  # the first bad step's batch, for a later report
            self._first_record = next((h for h in self._history if h["step"] == first_step), None)
        self._history.clear()

    def report(self, trainer: pl.Trainer, step: int, what: str) -> str:
        stats = dict(zip(_STATS, self._state["first_stats"].tolist(), strict=True))
        record = self._first_record or next((h for h in self._history if h["step"] == step), None)
        bad_terms = [name for name in ("loss_loc", "loss_conf") if not math.isfinite(stats[name])]
        firsts = all_ranks_values(self._state["local_first_step"]).tolist()
        ranks = [rank for rank, first in enumerate(firsts) if first == step]
        where = f" on rank {', '.join(map(str, ranks))} of {len(firsts)}" if len(firsts) > 1 and ranks else ""
        lines = [
            f"Non-finite training loss or gradient at step {step}{where}"
            + (f" (epoch {record['epoch'] + 1})" if record else "")
            + f": {what}.",
            f"  loss_loc={stats['loss_loc']:.4g} loss_conf={stats['loss_conf']:.4g}: "
            + (
                f"{' and '.join(bad_terms)} went bad"
                if bad_terms
                else "the losses were finite, a gradient was not"
                if not where or trainer.global_rank in ranks
                else f"finite on rank {trainer.global_rank}: the log of the rank(s) above shows their batch"
            ),
            f"  largest |loc| prediction {stats['loc_absmax']:.4g}, "
            f"largest |class logit| {stats['conf_absmax']:.4g}",
        ]
        if record:
            lrs = ", ".join(f"{name} {lr:.4g}" for name, lr in record["lr"].items())
            lines.append(f"  learning rate: {lrs}")
            lines += ["  batch:"] + [f"    {line}" for line in _describe_images(trainer, record["image_ids"])]
        else:
            lines.append("  (the batch of that step was not kept: lower check_every_n_steps to see it)")
        written = _last_written_checkpoint(trainer)
        if written and self._checkpoint_step is not None and self._checkpoint_step <= step:
            lines.append(f"  last finite checkpoint: {written} (step {self._checkpoint_step})")
        else:
            lines.append("  no checkpoint was written before it")
        lines.append("  usual causes:")
        lines += [f"    - {cause}" for cause in _usual_causes(trainer, stats, record)]
        if self.mode == "stop":
            lines.append("  to skip such steps instead (counted, undone): callbacks.nonfinite.mode=skip")
        return "\n".join(lines)


def _uses_grad_scaler(trainer: pl.Trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def _step_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """What an optimiser step changes: the parameters and their optimiser state (moments, step counts)."""
    tensors = []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            tensors.append(parameter)  # the Parameter itself: `.data` is a new object on every access
            tensors += [v for v in optimizer.state.get(parameter, {}).values() if isinstance(v, Tensor)]
    return tensors


def _checkpoint_due(trainer: pl.Trainer, step: int) -> bool:
    for callback in trainer.checkpoint_callbacks:
        every = getattr(callback, "_every_n_train_steps", 0)
        if every and step % every == 0:
            return True
    return False


def _last_written_checkpoint(trainer: pl.Trainer) -> str | None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            return callback.last_model_path
    return None


def _train_records(trainer: pl.Trainer) -> dict[int, Any]:
    """The training images' records by image id (none for data made on the fly)."""
    datamodule = trainer.datamodule
    dataset = getattr(datamodule, "datasets", {}).get("train") if datamodule is not None else None
    return {r.image_id: r for r in getattr(dataset, "records", [])}


def _describe_images(trainer: pl.Trainer, image_ids: Sequence[int]) -> list[str]:
    records = _train_records(trainer)
    classes = list(getattr(trainer.datamodule, "classes", []))
    lines = []
    for image_id in image_ids:
        record = records.get(image_id)
        if record is None:
            lines.append(f"image {image_id}")
            continue
        boxes = ", ".join(
            f"{classes[label - 1] if 0 < label <= len(classes) else label} {[round(v, 1) for v in box]}"
            for box, label in zip(record.boxes.tolist(), record.labels.tolist(), strict=True)
        )
        lines.append(f"image {image_id} {record.path}: {boxes or 'no objects'}")
    return lines


def _usual_causes(
    trainer: pl.Trainer, stats: Mapping[str, float], record: Mapping[str, Any] | None
) -> list[str]:
    causes = []
    lr = max(record["lr"].values()) if record else None
    large = not math.isfinite(stats["loc_absmax"]) or stats["loc_absmax"] > 1e4 or stats["conf_absmax"] > 1e4
    causes.append(
        "a learning rate too high: the predictions grew without bound"
        + (f" (try optimizer.lr={lr / 10:.2g}, or a longer warmup)" if lr else "")
        + (" - likely here" if large else "")
    )
    if "16" in str(trainer.precision) and "bf16" not in str(trainer.precision):
        causes.append("fp16 overflow: values above 65504 (trainer.precision=bf16-mixed or 32-true)")
    tiny = [
        image_id
        for image_id, box in _boxes_of(trainer, record["image_ids"] if record else [])
        if min(box[2] - box[0], box[3] - box[1]) < 2
    ]
    if tiny:
        causes.append(f"a degenerate box (under 2 px wide or high) in image(s) {sorted(set(tiny))}")
    return causes


def _boxes_of(trainer: pl.Trainer, image_ids: Sequence[int]) -> list[tuple[int, list[float]]]:
    """(image id, xyxy pixel box) of every training object of the images `image_ids`."""
    records = _train_records(trainer)
    return [(i, box) for i in image_ids if i in records for box in records[i].boxes.tolist()]
