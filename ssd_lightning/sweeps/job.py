"""What a sweep job knows of its sweep: the W&B group it shares with the other jobs, and its swept values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

TRIAL_KEY = "optuna_trial"  # a job of an Optuna sweep: its trial's number (set by the sweeper)


def _sweep_job() -> Any:
    """Hydra's config of this process's multirun job, None outside a sweep."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return hydra_cfg if hydra_cfg.mode == RunMode.MULTIRUN else None


def sweep_group() -> str | None:
    """`${ssd.sweep_group:}`: the sweep folder's name (`<time>`, or the name given with hydra.sweep.dir),
    shared by every job of the sweep and by every worker of a study that writes to one folder."""
    hydra_cfg = _sweep_job()
    return Path(str(hydra_cfg.sweep.dir)).name if hydra_cfg is not None else None


def swept_values() -> dict[str, Any]:
    """`{"sweep": {"group", "job", "overrides": {key: value}}}` for a sweep job's logged hyperparameters (the
    W&B config: its overrides side by side over the jobs of a group); empty outside a sweep."""
    hydra_cfg = _sweep_job()
    if hydra_cfg is None:
        return {}
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    overrides = {override.get_key_element().lstrip("+~"): override.value() for override in parsed}
    return {
        "sweep": {
            "group": sweep_group(),
            "job": Path(str(hydra_cfg.runtime.output_dir)).name,
            "overrides": overrides,
        }
    }
