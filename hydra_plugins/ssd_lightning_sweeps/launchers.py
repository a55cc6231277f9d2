"""`hydra/launcher=submitit_slurm` and `hydra/launcher=submitit_local` (conf/hydra/launcher/): hydra-submitit-
launcher's launchers with each job sized from its own trainer config, told the sweep folder, and (locally) on
GPUs of its own; see ssd_lightning.sweeps.submitit_jobs."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher


class SlurmLauncher(BaseSubmititLauncher):
    _EXECUTOR = "slurm"

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from ssd_lightning.sweeps.submitit_jobs import launch_on_slurm

        return launch_on_slurm(self, job_overrides, initial_job_idx)


class LocalLauncher(BaseSubmititLauncher):
    _EXECUTOR = "local"

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from ssd_lightning.sweeps.submitit_jobs import launch_locally

        return launch_locally(self, job_overrides, initial_job_idx)
