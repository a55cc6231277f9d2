"""What the entry points print and write: result tables, the final line, JSON files (rank 0 only), and a
console that reads cleanly: our lines, Lightning's useful ones and real warnings, all also in the run's log
file (conf/hydra/default.yaml), without third-party tips and deprecation notices that say nothing to the user.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_only


def quiet_other_ranks() -> None:
    """Our log lines and Python warnings from rank 0 only: every process of a DDP job runs the entry point."""
    if rank_zero_only.rank != 0:
        logging.getLogger("ssd_lightning").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")


log = logging.getLogger("ssd_lightning")

# Lightning's INFO lines that say nothing to our users (the hardware is in the run's first log lines).
_NOISE_PREFIXES = (
    "💡 Tip",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "Loading `train_dataloader` to estimate",
)
# Warnings about library internals, or advice our configuration already follows.
_NOISE_WARNINGS = (
    r".*LeafSpec.*is deprecated.*",
    r".*does not have many workers which may be a bottleneck.*",  # workers are capped at the CPU count
    r".*Please use `torch.amp.autocast\(.*",
)
_LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")


class ConsoleFormatter(logging.Formatter):
    """Info lines as they are; warnings and errors with their level in front."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        return message if record.levelno <= logging.INFO else f"{record.levelname}: {message}"


def _not_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOISE_PREFIXES)


def configure_console() -> None:
    """Route Lightning's log lines and Python warnings through the run's handlers (console and log file),
    minus the noise. Idempotent; entry points call it first."""
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()  # Lightning's own stderr handler bypasses the log file
        logger.propagate = True
        if _not_noise not in logger.filters:
            logger.addFilter(_not_noise)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_not_noise)
    for pattern in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.captureWarnings(True)


@rank_zero_only
def report(text: str) -> None:
    """A result for the user, from the main process only (every DDP rank runs the entry point): the
    console and the run's log file."""
    log.info(text)


@rank_zero_only
def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
