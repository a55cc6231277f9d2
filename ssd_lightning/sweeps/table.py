"""The table of a sweep: every job of a multirun folder with its status, best validation value, overrides,
folder and checkpoint, best first; written as `sweep_report.csv` and `sweep_report.md` in the folder.

Read from what the jobs leave behind (`<job>/.hydra/`, `<job>/metrics.json`, `<job>/checkpoints/`) and the
sweep's `summary.jsonl` (status and error of each finished job), so it works on a sweep still running or
stopped: a job without a line is RUNNING while its process trains (`owner.json`), else STOPPED.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssd_lightning.training import launch

SUMMARY_FILE = "summary.jsonl"  # one JSON line per job, written by sweeps.summary.SweepSummary

CSV_FILE = "sweep_report.csv"
MARKDOWN_FILE = "sweep_report.md"
BEST_PREFIX = "best/"  # metrics.json: the best value of each validation metric (training/module.py)
_TRIAL_OVERRIDE = "++optuna_trial="  # the sweeper's note of the trial: the job's folder says it already


@dataclass(frozen=True)
class JobRow:
    job: str  # the job's folder name: its number in a grid, its trial number in an Optuna study
    status: str  # COMPLETED, FAILED, PRUNED, RUNNING or STOPPED
    value: float | None  # the best validation value of `SweepTable.metric`
    overrides: tuple[str, ...]
    folder: Path
    checkpoint: Path | None  # the best checkpoint by the validation metric, else last.ckpt
    error: str | None = None


@dataclass(frozen=True)
class SweepTable:
    sweep_dir: Path
    metric: str | None
    maximize: bool
    rows: tuple[JobRow, ...]  # best first, then the jobs without a value

    @property
    def best(self) -> JobRow | None:
        return self.rows[0] if self.rows and self.rows[0].value is not None else None


def _job_sort_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _summary(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """The last line of each job folder in summary.jsonl (older lines name the job number only)."""
    path = sweep_dir / SUMMARY_FILE
    entries: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                entries[str(entry.get("folder") or entry["job"])] = entry
    return entries


def _load_yaml(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except (OSError, yaml.YAMLError, OmegaConfBaseException):
        return None


def _metric_and_direction(folders: Sequence[Path]) -> tuple[str | None, bool]:
    """The value the sweep optimises (`optimized_metric` of a job's config) and whether higher is better (the
    Optuna sweeper's direction; maximise otherwise, as the mAPs)."""
    for folder in folders:
        config = _load_yaml(folder / ".hydra" / "config.yaml")
        if config is None:
            continue
        try:
            metric = OmegaConf.select(config, "optimized_metric", throw_on_resolution_failure=True)
        except OmegaConfBaseException:
            metric = None
        hydra_cfg = _load_yaml(folder / ".hydra" / "hydra.yaml")
        direction = OmegaConf.select(hydra_cfg, "hydra.sweeper.direction") if hydra_cfg is not None else None
        return (str(metric) if metric else None), str(direction or "maximize").lower() != "minimize"
    return None, True


def _value(folder: Path, metric: str | None, entry: dict[str, Any] | None) -> float | None:
    value = None
    metrics_file = folder / "metrics.json"
    if metric and metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        value = metrics.get(f"{BEST_PREFIX}{metric}", metrics.get(metric))
    if value is None and entry is not None:
        value = entry.get("value")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _checkpoint(folder: Path) -> Path | None:
    checkpoints = folder / "checkpoints"
    best = sorted(checkpoints.glob("best-*.ckpt"), key=lambda path: path.stat().st_mtime)
    if best:
        return best[-1]
    last = checkpoints / "last.ckpt"
    return last if last.is_file() else None


def _status(folder: Path, entry: dict[str, Any] | None) -> str:
    if entry is not None:
        return str(entry["status"])
    return "RUNNING" if launch.may_be_training(launch.read_owner(folder)) else "STOPPED"


def _overrides(folder: Path, entry: dict[str, Any] | None) -> tuple[str, ...]:
    written = _load_yaml(folder / ".hydra" / "overrides.yaml")
    listed = list(written) if written is not None else list((entry or {}).get("overrides") or [])
    return tuple(str(o) for o in listed if not str(o).startswith(_TRIAL_OVERRIDE))


def read_sweep(sweep_dir: str | Path) -> SweepTable:
    """Every job of the multirun folder `sweep_dir`, sorted by best validation value."""
    sweep_dir = Path(sweep_dir).resolve()
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep folder {sweep_dir}")
    entries = _summary(sweep_dir)
    names = {p.name for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()}
    names |= {name for name in entries if name and (sweep_dir / name).is_dir()}
    folders = [sweep_dir / name for name in sorted(names, key=_job_sort_key)]
    metric, maximize = _metric_and_direction(folders)
    rows = []
    for folder in folders:
        entry = entries.get(folder.name)
        rows.append(
            JobRow(
                job=folder.name,
                status=_status(folder, entry),
                value=_value(folder, metric, entry),
                overrides=_overrides(folder, entry),
                folder=folder,
                checkpoint=_checkpoint(folder),
                error=(entry or {}).get("error"),
            )
        )
    sign = -1.0 if maximize else 1.0
    rows.sort(key=lambda row: (row.value is None, sign * (row.value or 0.0), _job_sort_key(row.job)))
    return SweepTable(sweep_dir, metric, maximize, tuple(rows))


def _value_text(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def to_csv(table: SweepTable) -> str:
    """One line per job, best first: rank (empty without a value), job, status, value, overrides, folder,
    checkpoint, error."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(
        ["rank", "job", "status", table.metric or "value", "overrides", "folder", "checkpoint", "error"]
    )
    for rank, row in enumerate(table.rows, 1):
        writer.writerow(
            [
                rank if row.value is not None else "",
                row.job,
                row.status,
                "" if row.value is None else repr(row.value),
                " ".join(row.overrides),
                str(row.folder),
                str(row.checkpoint or ""),
                row.error or "",
            ]
        )
    return stream.getvalue()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(table: SweepTable) -> str:
    """The best job (folder, checkpoint), the overrides every job shares, and a table of the rest."""
    shared = set.intersection(*(set(row.overrides) for row in table.rows)) if table.rows else set()
    order = "highest" if table.maximize else "lowest"
    lines = [
        f"# Sweep {table.sweep_dir.name}",
        "",
        f"{len(table.rows)} jobs in {table.sweep_dir}, by best {table.metric or 'value'} ({order} first).",
    ]
    best = table.best
    if best is not None:
        lines += [
            "",
            f"Best: job {best.job}, {table.metric} = {_value_text(best.value)}",
            f"- folder: {best.folder}",
        ]
        lines.append(f"- checkpoint: {best.checkpoint or '(none)'}")
    if shared:
        common = " ".join(o for o in table.rows[0].overrides if o in shared)
        lines += ["", f"Every job: `{_cell(common)}`"]
    lines += [
        "",
        f"| rank | job | status | {table.metric or 'value'} | overrides | checkpoint |",
        "|---|---|---|---|---|---|",
    ]
    for rank, row in enumerate(table.rows, 1):
        own = " ".join(o for o in row.overrides if o not in shared)
        checkpoint = str(row.checkpoint.relative_to(table.sweep_dir)) if row.checkpoint else ""
        status = row.status if not row.error or row.status == "COMPLETED" else f"{row.status}: {row.error}"
        cells = [
            str(rank) if row.value is not None else "",
            row.job,
            status,
            _value_text(row.value),
            own,
            checkpoint,
        ]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class WrittenReport:
    table: SweepTable
    csv_path: Path
    markdown_path: Path

    def describe(self) -> str:
        best = self.table.best
        where = f"{self.markdown_path} and {self.csv_path.name}"
        if best is None:
            return f"{where}: no job has a validation value yet"
        return (
            f"{where}: best job {best.job} ({self.table.metric} = {_value_text(best.value)}), "
            f"{best.checkpoint or best.folder}"
        )


def write_report(sweep_dir: str | Path) -> WrittenReport:
    """`sweep_report.csv` and `sweep_report.md` in `sweep_dir`."""
    table = read_sweep(sweep_dir)
    csv_path, markdown_path = table.sweep_dir / CSV_FILE, table.sweep_dir / MARKDOWN_FILE
    csv_path.write_text(to_csv(table))
    markdown_path.write_text(to_markdown(table))
    return WrittenReport(table, csv_path, markdown_path)
