"""A Hydra callback that keeps one line per multirun job (overrides, status, result) in the sweep folder, and
writes the sweep's report at the end.

Hydra itself only raises the first failure at the end of a batch; this file says which jobs failed and
what every other job returned, while the sweep is still running.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from ssd_lightning.sweeps.table import SUMMARY_FILE, write_report

log = logging.getLogger(__name__)

PRUNED = "PRUNED"  # an Optuna trial its pruner stopped: not a failure


def _other_rank() -> bool:
    """A process of a multi-task SLURM job other than its first: the first one writes the job's line."""
    return os.environ.get("SLURM_PROCID", "0") != "0" and "SLURM_NTASKS" in os.environ


def _append(sweep_dir: str | os.PathLike, entry: dict[str, Any]) -> None:
    with (Path(sweep_dir) / SUMMARY_FILE).open("a") as stream:  # one short write: workers may share the file
        stream.write(json.dumps(entry) + "\n")


def record_lost_job(
    sweep_dir: str | os.PathLike, job: int, folder: str, overrides: list[str], error: BaseException
) -> None:
    """A job whose process ended without a result (killed, cancelled, out of memory): its line says so."""
    entry = {"job": job, "folder": folder, "overrides": overrides, "status": "FAILED", "value": None}
    _append(sweep_dir, {**entry, "error": f"{type(error).__name__}: {error}"})


class SweepSummary(Callback):
    """Appends `{"job", "folder", "overrides", "status", "value", "error"}` to `<sweep dir>/summary.jsonl` per
    job, and writes `sweep_report.{csv,md}` (ssd_lightning.sweeps.table) when the sweep ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The sweep folder (`${ssd.new_folder:...}` under `${hydra:runtime.cwd}`) is claimed here, before the
        # sweeper and launcher read it: Hydra sets its own config only per job, too late for them.
        HydraConfig.instance().set_config(config)
        log.info("Sweep folder: %s", config.hydra.sweep.dir)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or _other_rank():
            return
        entry: dict[str, Any] = {
            "job": config.hydra.job.num,
            "folder": Path(str(config.hydra.runtime.output_dir)).name,
            "overrides": list(job_return.overrides or []),
            "status": job_return.status.name,
            "value": None,
            "error": None,
        }
        if job_return.status == JobStatus.COMPLETED:
            value = job_return.return_value
            entry["value"] = value if isinstance(value, (int, float)) and math.isfinite(value) else None
        else:
            try:
                _ = job_return.return_value  # re-raises the job's exception
            except Exception as error:
                entry["error"] = f"{type(error).__name__}: {error}"
                if type(error).__name__ == "TrialPruned":
                    entry["status"] = PRUNED
            if entry["status"] != PRUNED:
                log.error(
                    "Sweep job %s failed (%s): %s", entry["job"], " ".join(entry["overrides"]), entry["error"]
                )
        _append(config.hydra.sweep.dir, entry)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = sweep_dir / SUMMARY_FILE
        if not summary.is_file():
            return
        lines = [json.loads(line) for line in summary.read_text().splitlines() if line.strip()]
        log.info("Sweep summary (%s):", summary)
        for entry in lines:
            result = entry["value"] if entry["status"] == "COMPLETED" else entry["error"]
            job = entry.get("folder") or entry["job"]  # an Optuna job's folder is its trial's number
            log.info("  job %s %-9s %s -> %s", job, entry["status"], " ".join(entry["overrides"]), result)

        try:
            written = write_report(sweep_dir)
        except (OSError, ValueError) as error:  # the jobs' results stand without it
            log.warning("No sweep report for %s: %s", sweep_dir, error)
            return
        log.info("Sweep report: %s", written.describe())
