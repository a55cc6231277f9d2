"""Hydra multirun and the Optuna search: one folder per job, failures reported without hiding results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from training_helpers import check_ok, run_script

SHORT = ["trainer.max_epochs=1", "test=false"]


def summary(sweep: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)
def test_multirun_runs_each_job_in_its_own_folder_and_reports_failures(
    fast: list[str], tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    result = run_script(
        "train.py",
        ["-m", "optimizer.lr=-1.0,1e-3,2e-3", *fast, *SHORT, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert result.returncode != 0  # the sweep as a whole failed...
    failed, *completed = summary(sweep)
    assert failed["status"] == "FAILED" and "Invalid learning rate" in failed["error"]
    assert "optimizer.lr=-1.0" in failed["overrides"]
    # ...but the jobs after the failure ran, each in its own folder, and kept their results.
    assert [(j["job"], j["status"]) for j in completed] == [(1, "COMPLETED"), (2, "COMPLETED")]
    for job in completed:
        folder = sweep / str(job["job"])
        metrics = json.loads((folder / "metrics.json").read_text())
        # What the job returned to the sweeper: the best validation value of the run, not the last.
        assert job["value"] == pytest.approx(metrics["best/val/map_voc07"])
        assert (folder / "checkpoints" / "last.ckpt").is_file()
    lrs = [
        yaml.safe_load((sweep / str(j) / ".hydra" / "config.yaml").read_text())["optimizer"]["lr"]
        for j in (1, 2)
    ]
    assert lrs == [1e-3, 2e-3]


@pytest.mark.timeout(900)
def test_optuna_search_with_two_trials(fast: list[str], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    check_ok(
        run_script(
            "train.py",
            [
                "hparams_search=optuna_lr",
                "hydra.sweeper.n_trials=2",
                "hydra.sweeper.sampler.n_startup_trials=2",
                *fast,
                *SHORT,
                f"hydra.sweep.dir={sweep}",
            ],
            cwd=tmp_path,
        )
    )
    jobs = summary(sweep)
    assert [j["status"] for j in jobs] == ["COMPLETED", "COMPLETED"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "scheduler.warmup_steps"}
    values = [j["value"] for j in jobs]
    assert all(math.isfinite(v) for v in values) and best["best_value"] == pytest.approx(max(values))
    for job in jobs:
        config = yaml.safe_load((sweep / str(job["job"]) / ".hydra" / "config.yaml").read_text())
        assert 1e-4 <= config["optimizer"]["lr"] <= 1e-1
