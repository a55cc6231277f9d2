"""Hydra multirun and the Optuna search: one folder per job, failures reported without hiding results, no
selection on the test images, the best validation value returned whatever the strategy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from training_helpers import check_ok, on_two_cpu_processes, run_script, shapes_as_voc

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


@pytest.mark.timeout(900)
def test_a_sweep_never_selects_on_the_test_images(shapes_root: Path, fast: list[str], tmp_path: Path) -> None:
    same_images = shapes_as_voc(shapes_root, val_sets="[[shapes,test]]")  # validation is the test split
    keep = [a for a in fast if not a.startswith("dataset.")]
    args = [
        "-m",
        "optimizer.lr=1e-3,2e-3",
        *same_images,
        "model=compact",
        *keep,
        *SHORT,
        "dataset.batch_size=4",
    ]
    sweep = tmp_path / "sweep"
    refused = run_script(
        "train.py", [*args, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env={"HYDRA_FULL_ERROR": "0"}
    )
    assert refused.returncode == 1
    output = refused.stdout + refused.stderr
    assert "this sweep would choose hyperparameters on the test images" in output
    assert "dataset.val_holdout=0.05" in output and "select_on_test=true" in output
    assert not (sweep / "1").exists()  # stopped at its first job, before any training
    # Knowingly: it runs, and the jobs still report no "best" value picked on the test images.
    accepted = tmp_path / "accepted"
    check_ok(
        run_script("train.py", [*args, "select_on_test=true", f"hydra.sweep.dir={accepted}"], cwd=tmp_path)
    )
    assert [j["status"] for j in summary(accepted)] == ["COMPLETED", "COMPLETED"]
    # A single run on such data records no best/ values either (nothing may be selected on test images).
    single = tmp_path / "single"
    check_ok(run_script("train.py", [*args[2:], f"hydra.run.dir={single}"], cwd=tmp_path))
    metrics = json.loads((single / "metrics.json").read_text())
    assert "val/map_voc07" in metrics and not [k for k in metrics if k.startswith("best/")]


@pytest.mark.timeout(900)
def test_a_ddp_spawn_job_returns_its_best_validation_value(fast: list[str], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "optimizer.lr=1e-3", *on_two_cpu_processes(fast), "trainer.strategy=ddp_spawn", *SHORT]
    args += [f"hydra.sweep.dir={sweep}"]
    check_ok(run_script("train.py", args, cwd=tmp_path))  # the job's training runs in two spawned processes
    (job,) = summary(sweep)
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert job["status"] == "COMPLETED" and job["value"] == pytest.approx(metrics["best/val/map_voc07"])
