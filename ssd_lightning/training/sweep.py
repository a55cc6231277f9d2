"""A Hydra callback that keeps one line per multirun job (overrides, status, result) in the sweep folder.

Hydra itself only raises the first failure at the end of a batch; this file says which jobs failed and
what every other job returned, while the sweep is still running.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.jsonl"


class SweepSummary(Callback):
    """Appends `{"job", "overrides", "status", "value", "error"}` to `<sweep dir>/summary.jsonl` per job."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        entry: dict[str, Any] = {
            "job": config.hydra.job.num,
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
            log.error(
                "Sweep job %s failed (%s): %s", entry["job"], " ".join(entry["overrides"]), entry["error"]
            )
        summary = Path(config.hydra.sweep.dir) / SUMMARY_FILE
        with summary.open("a") as stream:
            stream.write(json.dumps(entry) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = Path(config.hydra.sweep.dir) / SUMMARY_FILE
        if not summary.is_file():
            return
        lines = [json.loads(line) for line in summary.read_text().splitlines() if line.strip()]
        log.info("Sweep summary (%s):", summary)
        for entry in lines:
            result = entry["value"] if entry["status"] == "COMPLETED" else entry["error"]
            log.info(
                "  job %s %-9s %s -> %s", entry["job"], entry["status"], " ".join(entry["overrides"]), result
            )
