"""Pruning inside a sweep job: after each validation the job reports its `optimized_metric` to its Optuna
trial (the study in the sweep's storage), and when the study's pruner says so the training stops after that
validation on every rank; train.py then saves metrics.json and raises `optuna.TrialPruned`, which the
sweeper records as PRUNED.

Active in a job of `hydra/sweeper=optuna_study` with a pruner (`hydra/sweeper/pruner=median`): the sweeper
tells each job its trial (`optuna_trial=N`), the job reads the storage, study and pruner from the sweeper's
config.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from ssd_lightning.sweeps.job import TRIAL_KEY

if TYPE_CHECKING:  # optuna takes a second to import: only the jobs of a pruned sweep need it
    import optuna

log = logging.getLogger("ssd_lightning")


class OptunaPruning(pl.Callback):
    """Reports `metric` at the optimiser step of every validation to trial `trial_number` of study
    `study_name` in `storage` (global rank 0 only) and stops the training when the trial should be pruned."""

    def __init__(self, storage: str, study_name: str, trial_number: int, pruner: Any, metric: str) -> None:
        self.storage, self.study_name, self.trial_number = storage, study_name, trial_number
        self.pruner, self.metric = pruner, metric
        self.pruned_at: int | None = None  # the optimiser step it stopped at
        self._trial: optuna.trial.Trial | None = None

    def _open_trial(self) -> optuna.trial.Trial:
        if self._trial is None:
            import optuna

            from ssd_lightning.sweeps.study import quiet_storage

            with quiet_storage():
                study = optuna.load_study(
                    study_name=self.study_name, storage=self.storage, pruner=self.pruner
                )
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(
                study._study_id, self.trial_number
            )
            self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.metric)
            if value is not None and math.isfinite(float(value)):
                trial = self._open_trial()
                trial.report(float(value), trainer.global_step)
                prune = trial.should_prune()
        if trainer.world_size > 1:  # every rank stops at the same validation
            prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            self.pruned_at = trainer.global_step
            trainer.should_stop = True
            log.info(
                "Optuna trial %d pruned at step %d (%s = %s): training stops here",
                self.trial_number,
                trainer.global_step,
                self.metric,
                trainer.callback_metrics.get(self.metric),
            )

    def pruned(self) -> optuna.TrialPruned:
        """The exception the job ends with, so that the sweeper records the trial as PRUNED."""
        import optuna

        return optuna.TrialPruned(f"trial {self.trial_number} pruned at step {self.pruned_at}")


def trial_pruning(cfg: DictConfig) -> OptunaPruning | None:
    """The pruning callback of a sweep job whose sweeper has a pruner; None otherwise."""
    number = cfg.get(TRIAL_KEY)
    if number is None or not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().sweeper
    if not sweeper.get("pruner"):
        return None
    if not sweeper.get("storage"):
        log.warning(
            "No pruning: hydra.sweeper.pruner needs a storage the jobs can reach (hydra.sweeper.storage)"
        )
        return None
    return OptunaPruning(
        storage=str(sweeper.storage),
        study_name=str(sweeper.study_name),
        trial_number=int(number),
        pruner=instantiate(sweeper.pruner),
        metric=str(cfg.optimized_metric),
    )
