"""EMA weights (`callbacks=ema`): Lightning's EMAWeightAveraging, with two places where it loses track fixed.

Lightning's callback validates with the average and saves it as the checkpoint's `state_dict` (the raw
weights beside it as `current_model_state`, for resuming). Two gaps, each a wrong number without an error:
- it copies the average into the model when training ends, before `last.ckpt` is written, so that file held
  the average in both slots and a resumed run continued from the average instead of the raw weights;
- loading a checkpoint in any stage while the fit-time average is alive (`trainer.test(ckpt_path=best)` right
  after `fit`) put the raw weights back, so the test scored the raw weights, not the average.
Here the raw weights survive every save, and test, validate and predict keep the checkpoint's `state_dict`:
the EMA weights, which `eval.py`, `predict.py` and `export.py` load too.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.trainer.states import TrainerFn

log = logging.getLogger("ssd_lightning")

#: The checkpoint key of the raw (non-averaged) weights beside the EMA `state_dict` (Lightning's name).
RAW_WEIGHTS_KEY = "current_model_state"


def holds_ema_weights(checkpoint: dict[str, Any]) -> bool:
    """Whether a checkpoint's `state_dict` is an exponential moving average (trained with callbacks=ema)."""
    return RAW_WEIGHTS_KEY in checkpoint


class EMAWeights(EMAWeightAveraging):
    """`EMAWeightAveraging` whose checkpoints always keep the raw weights beside the average, and whose
    evaluation after loading a checkpoint uses the average (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._raw_state: dict[str, Any] | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The raw weights, still needed by the checkpoints written from here on (last.ckpt at the end).
        self._raw_state = copy.deepcopy(pl_module.state_dict())
        super().on_train_end(trainer, pl_module)
        log.info("EMA: the model now holds the averaged weights (test, export and prediction use them)")

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_state is not None and RAW_WEIGHTS_KEY in checkpoint:
            checkpoint[RAW_WEIGHTS_KEY] = self._raw_state

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._raw_state = None
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
        elif holds_ema_weights(checkpoint):
            log.info("EMA: evaluating the checkpoint's averaged weights")
