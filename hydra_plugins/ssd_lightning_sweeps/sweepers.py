"""`hydra/sweeper=optuna_study` (conf/hydra/sweeper/optuna_study.yaml, used by conf/hparams_search/): Optuna
on a study that several sweep processes share; see ssd_lightning.sweeps.optuna_sweep."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class SharedStudySweeper(Sweeper):
    def __init__(self, **options: Any) -> None:
        from ssd_lightning.sweeps.optuna_sweep import SharedStudySweep

        self.sweeper = SharedStudySweep(**options)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
