"""Sweeps that outgrow one process: jobs as processes of their own (hydra/launcher=submitit_local), SLURM jobs
sized from their trainer config (hydra/launcher=submitit_slurm), an Optuna study shared by several sweep
processes (claimed trials, a killed worker's trial asked again, pruning), and the sweep's report."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from probes import PROBES_DIR
from script_runs import run_module
from test_wandb import finished_records
from training_helpers import CONF_DIR, check_ok, run_script

from ssd_lightning.conf_dir import HYDRA_VERSION_BASE
from ssd_lightning.sweeps.resources import JobResources
from ssd_lightning.sweeps.submitit_jobs import executor_settings, plan_jobs, slurm_executor

SHORT = ["trainer.max_epochs=1", "test=false"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # processes training side by side on a small machine
STUDY = ["hparams_search=optuna_lr", "hydra.sweeper.sampler.n_startup_trials=10"]
WITH_PROBES = {"PYTHONPATH": os.pathsep.join([str(PROBES_DIR), os.environ.get("PYTHONPATH", "")])}


def summary(sweep: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]


def best_value(job_folder: Path) -> float:
    return json.loads((job_folder / "metrics.json").read_text())["best/val/map_voc07"]


def load_study(storage: str) -> optuna.Study:
    return optuna.load_study(study_name="ssd_optimizer", storage=storage)


def report_rows(sweep: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO((sweep / "sweep_report.csv").read_text())))


def wait_for(condition, what: str, process, deadline_s: float = 300.0) -> None:  # noqa: ANN001
    """Poll `condition` while `process` runs (a generous deadline: the machine may be loaded)."""
    import time

    end = time.monotonic() + deadline_s
    while not condition():
        assert process.poll() is None, f"ended before {what}:\n{process.stdout()}\n{process.stderr()}"
        assert time.monotonic() < end, f"no {what} after {deadline_s} s"
        time.sleep(0.05)


@pytest.mark.timeout(900)
def test_submitit_local_runs_jobs_in_parallel_processes(fast: list[str], tmp_path: Path) -> None:
    meet = tmp_path / "meet"
    args = [
        "-m",
        "optimizer.lr=1e-3,2e-3",
        "hydra/launcher=submitit_local",
        "logger=wandb",
        "logger.wandb.project=ssd-ci",
        # Each job waits at its start of training until both have started: one after another, it would not.
        "+callbacks.meet._target_=probes.MeetPeers",
        f"+callbacks.meet.folder={meet}",
        "+callbacks.meet.count=2",
        *fast,
        *SHORT,
    ]
    env = {**WITH_PROBES, **ONE_THREAD, "WANDB_SILENT": "true"}
    check_ok(run_script("train.py", args, cwd=tmp_path, env=env))
    assert len({p.name for p in meet.iterdir()} - {str(os.getpid())}) == 2  # two processes of their own
    # The jobs, in other processes, wrote into the sweep folder the launcher claimed, and no other folder.
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    assert not (tmp_path / "outputs" / "train" / "runs").exists()
    jobs = sorted(summary(sweep), key=lambda job: job["job"])
    assert [(j["folder"], j["status"]) for j in jobs] == [("0", "COMPLETED"), ("1", "COMPLETED")]
    for job, lr in zip(jobs, (1e-3, 2e-3), strict=True):
        folder = sweep / job["folder"]
        assert job["value"] == pytest.approx(best_value(folder))
        assert yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())["optimizer"]["lr"] == lr
        # W&B: one group per sweep (its folder's name), the swept value in the run's config.
        (log,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
        records = finished_records(log)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert run.run_group == sweep.name
        config = {}
        for record in records:
            if record.WhichOneof("record_type") == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        assert config["sweep"]["overrides"]["optimizer.lr"] == lr and config["sweep"]["job"] == job["folder"]
    # The report the sweep wrote at its end: both jobs, best first, with their best validation values.
    rows = report_rows(sweep)
    assert sorted(rows, key=lambda r: -float(r["val/map_voc07"])) == rows and len(rows) == 2
    for row in rows:
        assert float(row["val/map_voc07"]) == pytest.approx(best_value(sweep / row["job"]))
    assert f"Best: job {rows[0]['job']}" in (sweep / "sweep_report.md").read_text()


def _configs(overrides: list[str]) -> SimpleNamespace:
    """A SLURM sweep's master config and what the launcher works with (as Hydra sets them up)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    with initialize_config_dir(config_dir=CONF_DIR, version_base=HYDRA_VERSION_BASE):
        config = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(config)
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(CONF_DIR))
    return SimpleNamespace(config=config, hydra_context=SimpleNamespace(config_loader=loader))


def test_the_slurm_launcher_sizes_each_job_from_its_trainer_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The config as `--cfg` shows it: resources interpolated from the trainer, resolved for 4 GPUs x 2 nodes.
    shown = check_ok(
        run_script(
            "train.py",
            [
                "hydra/launcher=submitit_slurm",
                "trainer.devices=4",
                "trainer.num_nodes=2",
                "--cfg",
                "all",
                "--resolve",
            ],
            cwd=tmp_path,
        )
    )
    launcher = yaml.safe_load(shown)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.ssd_lightning_sweeps.launchers.SlurmLauncher"
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert launcher["cpus_per_task"] == 3  # the built-in data's 2 loader workers and the training process
    assert launcher["additional_parameters"] == {"signal": "USR1@90", "requeue": True}

    # A sweep over the trainer: each job sized from its own config, told the sweep folder.
    sweep_dir = tmp_path / "sweep"
    master = _configs(["hydra/launcher=submitit_slurm", f"hydra.sweep.dir={sweep_dir}"])
    launcher_options = OmegaConf.to_container(master.config.hydra.launcher, resolve=True)
    master.params = {k: v for k, v in launcher_options.items() if k != "_target_"}  # what Hydra passes
    small, large = plan_jobs(master, [["trainer.devices=1"], ["trainer.devices=4", "trainer.num_nodes=2"]], 0)
    assert small.resources == JobResources(nodes=1, tasks_per_node=1, gpus_per_node=1, cpus_per_task=3)
    assert large.resources == JobResources(nodes=2, tasks_per_node=4, gpus_per_node=4, cpus_per_task=3)
    assert large.overrides[-1] == f"hydra.sweep.dir='{sweep_dir}'"

    # The sbatch script submitit writes for the large job (no cluster here: submitit only looks for srun).
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    init, _ = executor_settings(master.params, "slurm", large.resources)
    assert init["slurm_max_num_timeout"] == 0  # submitit's own requeue after a timeout stays off
    executor = slurm_executor({**master.params, "partition": "gpu"}, large.resources)._executor
    script = executor._make_submission_file_text("python -m submitit.core._submit folder", "uid")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=USR1@90",  # our handler's signal: checkpoint at the next step, requeue, resume
        "#SBATCH --requeue",
        "export SUBMITIT_PREEMPT_SIGNAL=USR1",
    ):
        assert line in script.splitlines(), f"{line!r} not in:\n{script}"
    assert f"{sweep_dir}/.submitit/" in script


def _job(sweep: Path, name: str, best: float | None, last: float, lr: float) -> Path:
    folder = sweep / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("monitor: val/map_voc07\noptimized_metric: ${monitor}\n")
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optimizer.lr={lr}", "model=compact"]))
    if best is not None:
        metrics = {"val/map_voc07": last, "best/val/map_voc07": best, "step": 10}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "best-epoch001-step0000010.ckpt").write_text("")
        (folder / "checkpoints" / "last.ckpt").write_text("")
    return folder


def test_the_sweep_report_lists_every_job_by_its_best_value(tmp_path: Path) -> None:
    sweep = tmp_path / "multiruns" / "2026-12-06_10-00-00"
    _job(sweep, "0", best=0.41, last=0.40, lr=1e-3)
    _job(sweep, "1", best=0.55, last=0.30, lr=2e-3)  # best, though its last validation was the worst
    _job(sweep, "2", best=None, last=0.0, lr=-1.0)  # failed before any validation
    running = _job(sweep, "3", best=None, last=0.0, lr=4e-3)
    (running / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    lines = [
        {"job": 0, "folder": "0", "overrides": [], "status": "COMPLETED", "value": 0.41, "error": None},
        {"job": 1, "folder": "1", "overrides": [], "status": "COMPLETED", "value": 0.55, "error": None},
        {
            "job": 2,
            "folder": "2",
            "overrides": [],
            "status": "FAILED",
            "value": None,
            "error": "ValueError: lr",
        },
    ]
    (sweep / "summary.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    printed = check_ok(run_module("ssd_lightning.cli.sweep_report", [str(sweep)], cwd=tmp_path))
    rows = report_rows(sweep)
    assert [(r["rank"], r["job"], r["status"], r["val/map_voc07"]) for r in rows] == [
        ("1", "1", "COMPLETED", "0.55"),
        ("2", "0", "COMPLETED", "0.41"),
        ("", "2", "FAILED", ""),
        ("", "3", "RUNNING", ""),
    ]
    assert rows[0]["overrides"] == "optimizer.lr=0.002 model=compact"
    assert rows[0]["checkpoint"] == str(sweep / "1" / "checkpoints" / "best-epoch001-step0000010.ckpt")
    assert rows[2]["error"] == "ValueError: lr"
    markdown = (sweep / "sweep_report.md").read_text()
    assert markdown == printed.split("\nWritten: ")[0]
    assert "Best: job 1, val/map_voc07 = 0.5500" in markdown and "Every job: `model=compact`" in markdown
    assert (
        "| 1 | 1 | COMPLETED | 0.5500 | optimizer.lr=0.002 | 1/checkpoints/best-epoch001-step0000010.ckpt |"
        in (markdown)
    )
