"""The sweep loop of `hydra/sweeper=optuna_study` (conf/hydra/sweeper/optuna_study.yaml): hydra-optuna-
sweeper's search space and trial configuration, on a study that several sweep processes share
(ssd_lightning.sweeps.study).

Differences from the plugin's loop: `n_trials` is the study's total whichever process runs the trials, so
starting the same command again adds a worker, or resumes a stopped sweep; each job's folder is its trial's
number (workers writing to one sweep folder never collide) and the job knows its trial (`optuna_trial=N`,
for the pruner); a pruned job is recorded as PRUNED and a failed one as FAIL, neither ends the sweep unless
`max_failure_rate` says so; each worker seeds the sampler with the base seed plus its number.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig, OmegaConf
from optuna.trial import Trial, TrialState

from ssd_lightning.sweeps.job import TRIAL_KEY
from ssd_lightning.sweeps.study import claim_trials, open_study, trials_left
from ssd_lightning.training import launch

log = logging.getLogger(__name__)


class SharedStudySweep(OptunaSweeperImpl):
    """`OptunaSweeperImpl` with the loop above; `sampler` and `pruner` arrive as configs (built here: the
    sampler's seed depends on the worker)."""

    def __init__(
        self,
        sampler: DictConfig,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        search_space: DictConfig | None = None,
        custom_search_space: str | None = None,
        params: DictConfig | None = None,
        pruner: DictConfig | None = None,
    ) -> None:
        super().__init__(
            sampler,
            direction,
            storage,
            study_name,
            n_trials,
            n_jobs,
            max_failure_rate,
            search_space,
            custom_search_space,
            params,
        )
        self.pruner = pruner

    def _build_sampler(self, worker: int, distributions: dict[str, Any]) -> optuna.samplers.BaseSampler:
        config = (
            OmegaConf.to_container(self.sampler, resolve=True) if OmegaConf.is_config(self.sampler) else {}
        )
        seed = config.get("seed") if isinstance(config, dict) else None
        sampler = instantiate(config, **({"seed": int(seed) + worker} if seed is not None else {}))
        if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in distributions.items()}
            sampler = sampler(grid)
        return sampler

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        self._process_searchspace_config()
        params_conf = [*self._parse_sweeper_params_config(), *arguments]
        from_overrides, fixed_params = create_params_from_overrides(params_conf)
        distributions = {**(self.search_space_distributions or {}), **from_overrides}
        for name in fixed_params:
            distributions.pop(name, None)
        directions = self._get_directions()
        pruner = instantiate(self.pruner) if self.pruner else None
        study, worker = open_study(self.storage, self.study_name, directions, pruner)
        study.sampler = self._build_sampler(worker, distributions)
        log.info(
            "Study %s in %s: worker %d, sampler %s, %s; %d of %d trials taken",
            study.study_name,
            self.storage or "memory",
            worker,
            type(study.sampler).__name__,
            "pruner " + type(pruner).__name__ if pruner else "no pruner",
            self.n_trials - trials_left(study, self.n_trials),
            self.n_trials,
        )
        me = launch.this_process()
        while True:
            trials = claim_trials(study, self.storage, self.n_trials, self.n_jobs, me)
            if not trials:
                break
            configured = self._configure_trials(trials, distributions, fixed_params)
            overrides = [
                (*trial_overrides, f"++{TRIAL_KEY}={trial.number}", f"hydra.sweep.subdir={trial.number}")
                for trial_overrides, trial in zip(configured, trials, strict=True)
            ]
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            ended = [record(study, t, r, directions) for t, r in zip(trials, returns, strict=True)]
            failures = [error for error in ended if error is not None]
            if len(failures) / len(returns) > self.max_failure_rate:
                log.error(
                    "%d of %d trials failed, more than max_failure_rate=%s",
                    len(failures),
                    len(returns),
                    self.max_failure_rate,
                )
                raise failures[0]
        write_results(study, Path(str(self.config.hydra.sweep.dir)))


def record(
    study: optuna.Study, trial: Trial, returned: JobReturn, directions: Sequence[str]
) -> Exception | None:
    """Tell the study how the trial's job ended: its value, PRUNED (the job raised optuna.TrialPruned), or
    FAIL (an error, or no finite value); the job's error when it failed."""
    try:
        value = returned.return_value  # raises the job's exception
        values = [float(v) for v in (value if len(directions) > 1 else [value])]
        if len(values) != len(directions):
            raise ValueError(f"the job returned {len(values)} values for {len(directions)} objectives")
        study.tell(trial, values)  # a NaN raises: the trial failed
        return None
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        log.info("Trial %d pruned", trial.number)
        return None
    except Exception as error:
        if study.get_trials(deepcopy=False)[trial.number].state == TrialState.RUNNING:
            study.tell(trial, state=TrialState.FAIL)
        log.warning("Trial %d failed: %s", trial.number, error)
        return error


def write_results(study: optuna.Study, sweep_dir: Path) -> None:
    """`optimization_results.yaml` in the sweep folder: the study's best so far (every worker's trials)."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        log.warning("Study %s has no completed trial: no optimization_results.yaml", study.study_name)
        return
    if len(study.directions) > 1:
        results: dict[str, Any] = {
            "name": "optuna",
            "solutions": [{"params": t.params, "values": t.values} for t in study.best_trials],
        }
    else:
        best = study.best_trial
        results = {
            "name": "optuna",
            "best_params": best.params,
            "best_value": best.value,
            "trial": best.number,
        }
        log.info("Best trial %d: %s = %s", best.number, best.params, best.value)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
