"""Sweeps that outgrow one process: jobs as processes of their own (hydra/launcher=submitit_local), SLURM jobs
sized from their trainer config (hydra/launcher=submitit_slurm), an Optuna study shared by several sweep
processes (claimed trials, a killed worker's trial asked again, pruning), and the sweep's report."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
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
from optuna.trial import TrialState
from script_runs import run_module, start_script
from test_wandb import finished_records
from training_helpers import CONF_DIR, check_ok, probes_env, run_script

from ssd_lightning.conf_dir import HYDRA_VERSION_BASE
from ssd_lightning.sweeps.resources import AUTO_CPUS_PER_TASK, JobResources
from ssd_lightning.sweeps.study import INTERRUPTED_ATTR, WORKER_ATTR, open_study
from ssd_lightning.sweeps.submitit_jobs import executor_settings, plan_jobs, slurm_executor

SHORT = ["trainer.max_epochs=1", "test=false"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # processes training side by side on a small machine
STUDY = ["hparams_search=optuna_lr", "hydra.sweeper.sampler.n_startup_trials=10"]
WITH_PROBES = probes_env()


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
    # num_workers=auto: a GPU job's loader takes the CPUs it is given (less one), so it asks for enough.
    assert launcher["cpus_per_task"] == AUTO_CPUS_PER_TASK
    assert launcher["additional_parameters"] == {"signal": "USR1@90", "requeue": True}

    # A sweep over the trainer: each job sized from its own config, told the sweep folder.
    sweep_dir = tmp_path / "sweep"
    master = _configs(["hydra/launcher=submitit_slurm", f"hydra.sweep.dir={sweep_dir}"])
    launcher_options = OmegaConf.to_container(master.config.hydra.launcher, resolve=True)
    master.params = {k: v for k, v in launcher_options.items() if k != "_target_"}  # what Hydra passes
    jobs = [["trainer.devices=1", "dataset.num_workers=2"], ["trainer.devices=4", "trainer.num_nodes=2"]]
    small, large = plan_jobs(master, jobs, 0)
    # 2 loader workers and the training process; auto: AUTO_CPUS_PER_TASK
    assert small.resources == JobResources(nodes=1, tasks_per_node=1, gpus_per_node=1, cpus_per_task=3)
    assert large.resources == JobResources(
        nodes=2, tasks_per_node=4, gpus_per_node=4, cpus_per_task=AUTO_CPUS_PER_TASK
    )
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


def _open(storage: str, barrier: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue) -> None:
    barrier.wait()
    try:
        results.put(open_study(storage, "race", ["maximize"])[1])
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


def test_workers_opening_a_new_sqlite_study_at_once_all_join_it(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'new.db'}"
    context = multiprocessing.get_context("fork")  # the children only open the study
    barrier, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_open, args=(storage, barrier, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
    # Without the lock, Optuna's schema creation fails in all but one ("table ... already exists").
    assert sorted(results.get(timeout=10) for _ in workers) == [0, 1, 2, 3]  # each its own number (seed)


@pytest.mark.timeout(900)
def test_two_optuna_workers_finish_one_study_together(fast: list[str], tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"  # new: both workers create it at once
    args = [*STUDY, "hydra.sweeper.n_trials=4", f"hydra.sweeper.storage={storage}", *fast, *SHORT]
    start = [("train.py", args, tmp_path, ONE_THREAD)] * 2
    with start_script(*start[0]) as first, start_script(*start[1]) as second:
        codes = (first.wait(600), second.wait(600))
        outputs = [p.stdout() + p.stderr() for p in (first, second)]
    assert codes == (0, 0), "\n".join(outputs)
    assert not [o for o in outputs if "alembic" in o.lower() or "already exists" in o]
    trials = load_study(storage).trials
    assert [(t.number, t.state) for t in trials] == [(n, TrialState.COMPLETE) for n in range(4)]
    assert len({t.params["optimizer.lr"] for t in trials}) == 4  # workers draw different trials
    assert len({t.system_attrs[WORKER_ATTR]["pid"] for t in trials}) == 2  # both worked on it
    # Every trial ran once, in one of the two sweep folders (a folder per trial number), with its value.
    folders = [f for s in (tmp_path / "outputs" / "train" / "multiruns").iterdir() for f in s.iterdir()]
    ran = sorted(int(f.name) for f in folders if f.name.isdigit())
    assert ran == [0, 1, 2, 3]
    for folder in (f for f in folders if f.name.isdigit()):
        assert trials[int(folder.name)].value == pytest.approx(best_value(folder))


@pytest.mark.timeout(900)
def test_a_killed_optuna_sweep_resumed_completes_its_study(fast: list[str], tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = [*STUDY, "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage={storage}", *fast, *SHORT]
    held = tmp_path / "held"
    hold = ["+callbacks.hold._target_=probes.HoldTraining", f"+callbacks.hold.folder={held}"]
    with start_script("train.py", [*args, *hold], tmp_path, env=WITH_PROBES) as killed:
        wait_for(lambda: held.is_dir() and any(held.iterdir()), "training in trial 0", killed)
        killed.kill()  # SIGKILL: no handler runs, trial 0 stays RUNNING in the study
        killed.wait(60)
    assert [t.state for t in load_study(storage).trials] == [TrialState.RUNNING]

    check_ok(run_script("train.py", args, cwd=tmp_path))  # the same command again
    interrupted, *others = load_study(storage).trials
    assert interrupted.state == TrialState.FAIL and interrupted.system_attrs[INTERRUPTED_ATTR]
    assert [t.state for t in others] == [TrialState.COMPLETE] * 3  # n_trials, the retry included
    (retry,) = [t for t in others if t.system_attrs.get("failed_trial") == interrupted.number]
    assert retry.params == interrupted.params


@pytest.mark.timeout(900)
def test_a_pruner_stops_poor_trials_at_a_validation(fast: list[str], tmp_path: Path) -> None:
    # Every value is below the threshold: each trial stops at its first validation, after epoch 1 of 2
    # (`fast`: 2 epochs of 6 steps, a validation after each).
    pruner = "hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:2.0}"
    sweep = tmp_path / "sweep"
    args = [*STUDY, "hydra.sweeper.n_trials=2", pruner, *fast, "test=false", f"hydra.sweep.dir={sweep}"]
    check_ok(run_script("train.py", args, cwd=tmp_path))  # pruned trials do not fail the sweep
    trials = load_study(f"sqlite:///{sweep / 'optuna.db'}").trials
    steps_per_epoch = 24 // 4
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    for trial in trials:
        assert list(trial.intermediate_values) == [steps_per_epoch]
        metrics = json.loads((sweep / str(trial.number) / "metrics.json").read_text())
        assert metrics["step"] == steps_per_epoch  # the training stopped there
        assert trial.intermediate_values[steps_per_epoch] == pytest.approx(metrics["val/map_voc07"])
    assert [j["status"] for j in summary(sweep)] == ["PRUNED", "PRUNED"]
    assert [r["status"] for r in report_rows(sweep)] == ["PRUNED", "PRUNED"]


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
