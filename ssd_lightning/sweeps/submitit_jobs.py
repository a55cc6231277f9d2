"""How the submitit launchers (conf/hydra/launcher/submitit_{slurm,local}.yaml) start a batch of sweep jobs.

Compared with hydra-submitit-launcher's own `launch`:
- every job is told the sweep folder as a literal (`hydra.sweep.dir=<folder>`, in its .hydra/hydra.yaml):
  the folder the launcher claimed. A job process finds it also without (OmegaConf's resolver cache, keyed by
  the interpolation's text, travels in the pickled config and Hydra copies it into each job's config), but
  a cache miss would resolve `${ssd.new_folder:...}` again and claim a folder of its own;
- each job's resources come from its own config (`hydra.launcher.nodes`, `tasks_per_node`, `gpus_per_node`
  interpolate the job's `trainer.*`), so a sweep over `trainer.devices` reserves what each job uses: SLURM
  jobs that need the same are submitted as one array;
- local jobs run each on GPUs of its own, waiting for free ones (submitit's local executor would give every
  job the first GPUs);
- a job whose process died without a result (killed, out of memory, cancelled) is recorded as failed in the
  sweep's summary, and the sweep goes on.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

from ssd_lightning.sweeps.resources import JobResources, devices_per_node

log = logging.getLogger(__name__)

# Options that go to submitit's executor constructor, not to its parameters.
_INIT_KEYS = ("max_num_timeout",)


@dataclass(frozen=True)
class SweepJob:
    """One job of a batch: its number in the sweep, its overrides and what it needs."""

    num: int
    overrides: tuple[str, ...]
    resources: JobResources
    strategy: str  # the job's trainer.strategy, resolved (`auto` written out: ddp for several devices)
    devices: int  # processes per node the job's trainer starts

    @property
    def folder(self) -> str:
        """The job folder's name in the sweep folder: the job's number unless its overrides name one."""
        named = [o.split("=", 1)[1] for o in self.overrides if o.startswith("hydra.sweep.subdir=")]
        return named[-1] if named else str(self.num)


def quoted(value: str) -> str:
    """`value` as a quoted Hydra override value (a path may hold characters the grammar reserves)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def plan_jobs(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[SweepJob]:
    """The jobs of a batch, each told the sweep folder and sized from its own config."""
    sweep_dir = str(launcher.config.hydra.sweep.dir)
    jobs = []
    for offset, overrides in enumerate(job_overrides):
        told = (*overrides, f"hydra.sweep.dir={quoted(sweep_dir)}")
        job_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(told))
        trainer = job_config.trainer
        resources = JobResources.of(job_config.hydra.launcher)
        num = initial_job_idx + offset
        jobs.append(SweepJob(num, told, resources, str(trainer.strategy), devices_per_node(trainer.devices)))
    return jobs


def executor_settings(
    params: dict[str, Any], cluster: str, resources: JobResources
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constructor arguments, parameters) of submitit's AutoExecutor for a job of `resources`, from the
    launcher's options (hydra-submitit-launcher's naming: shared names plain, the others prefixed by the
    cluster)."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    options = dict(params)
    init = {"folder": options.pop("submitit_folder")}
    init.update({f"{cluster}_{key}": options.pop(key) for key in _INIT_KEYS if key in options})
    options.update(resources.parameters())
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    return init, {k if k in shared else f"{cluster}_{k}": v for k, v in options.items()}


def with_handler_signal(params: dict[str, Any]) -> dict[str, Any]:
    """`params` whose `setup` makes submitit's own handler (outside the training loop) listen to the signal
    SLURM sends (`additional_parameters.signal`, USR1 for our handler; submitit's default is USR2)."""
    signal = str((params.get("additional_parameters") or {}).get("signal", "")).split("@")[0]
    if not signal:
        return params
    line = f"export SUBMITIT_PREEMPT_SIGNAL={signal}"
    setup = list(params.get("setup") or [])
    return {**params, "setup": setup if line in setup else [line, *setup]}


def slurm_executor(params: dict[str, Any], resources: JobResources) -> Any:
    import submitit

    init, parameters = executor_settings(with_handler_signal(params), "slurm", resources)
    executor = submitit.AutoExecutor(cluster="slurm", **init)
    executor.update_parameters(**parameters)
    return executor


def local_executor(params: dict[str, Any], resources: JobResources, gpus: Sequence[int]) -> Any:
    """submitit's LocalExecutor itself: AutoExecutor does not pass on which GPUs a job may use."""
    import submitit

    executor = submitit.LocalExecutor(folder=params["submitit_folder"])
    executor.update_parameters(
        timeout_min=params.get("timeout_min", 60),
        tasks_per_node=resources.tasks_per_node,
        gpus_per_node=len(gpus),
        visible_gpus=tuple(gpus),
        stderr_to_stdout=bool(params.get("stderr_to_stdout")),
    )
    return executor


def _arguments(job: SweepJob) -> tuple[Any, ...]:
    """What the launcher's `__call__` takes in the job's process."""
    return (list(job.overrides), "hydra.sweep.dir", job.num, f"job_id_for_{job.num}", Singleton.get_state())


def _result(submitted: Any, job: SweepJob, sweep_dir: Path) -> JobReturn:
    """The job's JobReturn; a job that ended without one (killed, cancelled, out of memory) as a failure."""
    try:
        return submitted.results()[0]
    except Exception as error:  # submitit's UncompletedJobError, FailedJobError, ...
        from ssd_lightning.sweeps.summary import record_lost_job

        returned = JobReturn(overrides=list(filter_overrides(job.overrides)), status=JobStatus.FAILED)
        returned.return_value = error
        record_lost_job(sweep_dir, job.num, job.folder, returned.overrides, error)
        log.error("Sweep job %s ended without a result: %s", job.num, error)
        return returned


def _announce(config: Any, cluster: str, jobs: Sequence[SweepJob]) -> Path:
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("Submitit '%s' sweep output dir: %s", cluster, sweep_dir)
    for job in jobs:
        log.info("\t#%d : %s", job.num, " ".join(filter_overrides(job.overrides)))
    return sweep_dir


def launch_on_slurm(
    launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[JobReturn]:
    """Submit the batch (one job array per size of job) and wait for every result."""
    jobs = plan_jobs(launcher, job_overrides, initial_job_idx)
    sweep_dir = _announce(launcher.config, "slurm", jobs)
    groups: dict[JobResources, list[SweepJob]] = {}
    for job in jobs:
        groups.setdefault(job.resources, []).append(job)
    submitted: dict[int, Any] = {}
    for resources, group in groups.items():
        executor = slurm_executor(launcher.params, resources)
        arrays = executor.map_array(launcher, *zip(*(_arguments(job) for job in group), strict=True))
        submitted.update({job.num: array for job, array in zip(group, arrays, strict=True)})
    return [_result(submitted[job.num], job, sweep_dir) for job in jobs]


class GpuPool:
    """GPU indices handed to local jobs, each job its own until it ends."""

    def __init__(self, gpus: Sequence[int]) -> None:
        self.total = len(gpus)
        self._free = list(gpus)
        self._changed = threading.Condition()

    @contextmanager
    def take(self, count: int) -> Iterator[list[int]]:
        with self._changed:
            self._changed.wait_for(lambda: len(self._free) >= count)
            taken, self._free = self._free[:count], self._free[count:]
        try:
            yield taken
        finally:
            with self._changed:
                self._free.extend(taken)
                self._changed.notify_all()


def visible_gpus() -> list[int]:
    """This machine's GPUs as the local jobs may use them (CUDA_VISIBLE_DEVICES when it lists indices)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        parts = [part.strip() for part in listed.split(",") if part.strip()]
        if all(part.isdigit() for part in parts):
            return [int(part) for part in parts]
    import torch

    return list(range(torch.cuda.device_count()))


def launch_locally(
    launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[JobReturn]:
    """Run the batch as local processes at once, each job on GPUs no other running job has (a job waits for
    free ones)."""
    jobs = plan_jobs(launcher, job_overrides, initial_job_idx)
    sweep_dir = _announce(launcher.config, "local", jobs)
    if any(job.resources.nodes > 1 for job in jobs):
        raise ValueError(
            "hydra/launcher=submitit_local runs jobs on this machine: trainer.num_nodes must be 1 "
            "(hydra/launcher=submitit_slurm for several nodes)"
        )
    for job in jobs:  # Lightning's DDP launcher starts the script again: a submitit job has none to start
        if job.devices > 1 and job.strategy not in ("ddp_spawn", "ddp_fork"):
            raise ValueError(
                f"sweep job {job.num} trains on {job.devices} devices with trainer.strategy={job.strategy}, "
                "which hydra/launcher=submitit_local cannot start (Lightning would run the job's script "
                "again): add trainer.strategy=ddp_spawn"
            )
    pool = GpuPool(visible_gpus() if any(job.resources.gpus_per_node for job in jobs) else [])
    for job in jobs:
        wanted = job.resources.gpus_per_node or 0
        if pool.total and wanted > pool.total:
            raise ValueError(f"sweep job {job.num} asks for {wanted} GPUs; this machine has {pool.total}")

    def run(job: SweepJob) -> JobReturn:
        wanted = min(job.resources.gpus_per_node or 0, pool.total)  # none here: the job runs on the CPU
        with pool.take(wanted) as gpus:
            executor = local_executor(launcher.params, job.resources, gpus)
            return _result(executor.submit(launcher, *_arguments(job)), job, sweep_dir)

    with ThreadPoolExecutor(max_workers=len(jobs)) as threads:
        return list(threads.map(run, jobs))
