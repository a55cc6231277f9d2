"""Safe resume: a resumed run continues in its own folder (checkpoints, logs, best-k bookkeeping), `last` only
looks at runs of the same name and never at one another job may be training, every process of a SLURM /
torchrun job shares one folder, a SLURM job pre-empted at a step boundary is requeued and resumes its own run
whatever `ckpt_path` says, and the random generators continue where they were."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import signal
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from script_runs import run_script, start_script
from training_helpers import check_ok, compose_config

from ssd_lightning.cli import resolvers
from ssd_lightning.training import launch
from ssd_lightning.training.checkpointing import find_last_checkpoint, requeued_checkpoint
from ssd_lightning.training.rng import restore_rng_states, rng_states

STEPS_PER_EPOCH = 6  # 24 training images, batch 4


def runs_of(cwd: Path, name: str = "compact_shapes") -> list[Path]:
    return sorted((cwd / "outputs" / "train" / "runs" / name).iterdir())


def logged_steps(run: Path, version: int = 0) -> list[int]:
    with open(run / "csv" / f"version_{version}" / "metrics.csv") as stream:
        return [int(row["step"]) for row in csv.DictReader(stream) if row.get("train/loss")]


@pytest.mark.timeout(900)
def test_a_resumed_run_continues_in_its_own_folder(fast: list[str], tmp_path: Path) -> None:
    args = [*fast, "logger=csv", "test=false"]
    check_ok(run_script("train.py", [*args, "trainer.max_epochs=1"], cwd=tmp_path))
    (run,) = runs_of(tmp_path)
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    first_steps = logged_steps(run)

    result = run_script(
        "train.py", [*args, "trainer.max_epochs=2", f"ckpt_path={run}/checkpoints/last.ckpt"], cwd=tmp_path
    )
    check_ok(result)
    assert runs_of(tmp_path) == [run]  # no new folder: the same run went on
    assert (
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
        == 2 * STEPS_PER_EPOCH
    )
    # Its own config stays; the resuming command's is recorded beside it.
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["trainer"]["max_epochs"] == 1
    (resumed_config,) = (run / ".hydra").glob("resume-*/config.yaml")
    assert yaml.safe_load(resumed_config.read_text())["trainer"]["max_epochs"] == 2
    # One log with both parts of the run, and the best-k bookkeeping of the same checkpoint folder.
    assert logged_steps(run) == first_steps and max(first_steps) < STEPS_PER_EPOCH
    assert min(logged_steps(run, version=1)) >= STEPS_PER_EPOCH  # the resumed part, beside the first
    assert "dirpath has changed" not in result.stderr
    assert len(list((run / "checkpoints").glob("best-*.ckpt"))) == 1
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    (best_state,) = [
        v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint{'monitor'")
    ]
    assert Path(best_state["best_model_path"]).parent == best.parent


@pytest.mark.timeout(900)
def test_last_resumes_the_newest_run_of_the_same_name(fast: list[str], tmp_path: Path) -> None:
    args = [*fast, "test=false", "trainer.max_epochs=1"]
    check_ok(run_script("train.py", [*args, "run_name=alpha"], cwd=tmp_path))
    time.sleep(1.1)  # run folders are named by the second
    check_ok(run_script("train.py", [*args, "run_name=beta"], cwd=tmp_path))
    (alpha,) = runs_of(tmp_path, "alpha")
    result = run_script(
        "train.py", [*args, "run_name=alpha", "ckpt_path=last", "trainer.max_epochs=2"], cwd=tmp_path
    )
    stdout = check_ok(result)
    assert runs_of(tmp_path, "alpha") == [alpha]  # alpha went on in place, beta (newer) was not touched
    assert torch.load(alpha / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 12
    (beta,) = runs_of(tmp_path, "beta")
    assert torch.load(beta / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    assert f"the newest run named alpha is {alpha}/checkpoints/last.ckpt" in stdout + result.stderr


SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NAME": "ssd-train",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}


def test_every_process_of_a_job_gets_the_same_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    assert launch.job_stamp() == "slurm-4242-0"  # no clock in it: all ranks, and the requeued job
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "17")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert launch.job_stamp() == "slurm-17_3-0"
    assert resolvers.hydra_subdir(None) == ".hydra"
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert resolvers.hydra_subdir(None) is None  # only rank 0 writes the config
    for name in (*SLURM, "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert launch.job_stamp() == "torchrun-job7"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --rdzv-id: the local agent's id
    assert launch.job_stamp() == f"torchrun-{os.getppid()}"
    monkeypatch.setenv("RANK", "1")
    assert resolvers.hydra_subdir(None) is None


def test_interactive_slurm_shells_get_a_new_folder_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**SLURM, "SLURM_JOB_NAME": "interactive"}.items():
        monkeypatch.setenv(name, value)
    assert launch.job_stamp() is None


@pytest.mark.timeout(900)
def test_slurm_preemption_saves_at_a_step_requeues_and_the_job_resumes_its_own_run(
    fast: list[str], tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    scontrol = bin_dir / "scontrol"  # records what the run asks SLURM to do
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    env = {**SLURM, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    epochs = 10  # 60 steps: the signal lands long before the end, and the requeued part stays short
    args = [
        *fast,
        f"trainer.max_epochs={epochs}",
        f"trainer.check_val_every_n_epoch={epochs}",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "logger=csv",
        "test=false",
    ]
    runs = tmp_path / "outputs" / "train" / "runs" / "compact_shapes"
    # Another run of the same name, outside the job: `ckpt_path=last` below would pick it as the newest.
    check_ok(run_script("train.py", [*args, "trainer.max_epochs=1"], cwd=tmp_path))
    (other,) = runs.iterdir()

    run = runs / "slurm-4242-0"
    with start_script("train.py", args, cwd=tmp_path, env=env) as process:
        deadline = time.time() + 600
        while not (run / "checkpoints" / "last.ckpt").exists():  # training runs: the handler is installed
            assert process.poll() is None and time.time() < deadline, process.stderr()
            time.sleep(0.05)
        process.send_signal(signal.SIGUSR1)  # what SLURM sends before pre-empting (--signal=USR1@90)
        code = process.wait(timeout=120)  # it stops by itself once it has saved
        output = process.stdout() + process.stderr()
    assert code == 128 + signal.SIGUSR1, output
    assert "SIGUSR1: stopped after the step in flight and saved" in output
    assert calls.read_text().split() == ["requeue", "4242"]
    assert not list(run.glob("hpc_ckpt_*.ckpt"))  # Lightning's in-handler save did not run
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert 0 < saved["global_step"] < epochs * STEPS_PER_EPOCH
    optimizer_steps = saved["loops"]["fit_loop"]["epoch_loop.automatic_optimization.optim_progress"]
    assert optimizer_steps["optimizer"]["step"]["total"]["completed"] == saved["global_step"]  # a whole step
    assert launch.read_owner(run).slurm_job == "4242"  # the job keeps its run while it waits in the queue
    os.utime(other / "checkpoints" / "last.ckpt")  # now the newest last.ckpt of this name is not the job's

    # The requeued job: same command plus ckpt_path=last, as job scripts often have it.
    result = run_script(
        "train.py", [*args, "ckpt_path=last"], cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"}
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"Requeued SLURM job 4242: resuming from its own checkpoint {run}/checkpoints/last.ckpt" in output
    assert sorted(p.name for p in runs.iterdir()) == sorted([other.name, run.name])
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == epochs * STEPS_PER_EPOCH
    assert (
        torch.load(other / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS_PER_EPOCH
    )
    assert launch.read_owner(run) is None  # finished: released


def _run_with_checkpoint(runs: Path, name: str, owner: launch.Owner | None) -> Path:
    folder = runs / name
    (folder / "checkpoints").mkdir(parents=True)
    checkpoint = folder / "checkpoints" / "last.ckpt"
    checkpoint.write_bytes(b"")
    if owner is not None:
        (folder / launch.OWNER_FILE).write_text(json.dumps(dataclasses.asdict(owner)))
    return checkpoint


def test_last_never_resumes_a_run_another_job_may_be_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    me = launch.this_process()
    older = _run_with_checkpoint(tmp_path, "older", None)
    time.sleep(0.01)  # distinct modification times (the order is the point, not the clock)
    newest = _run_with_checkpoint(tmp_path, "newest", launch.Owner(me.host, os.getppid()))  # alive here
    os.utime(older, (1, 1))
    with pytest.raises(ValueError, match=r"the newest run, .*newest, may still be training \(process"):
        find_last_checkpoint(tmp_path, for_resume=True)
    assert find_last_checkpoint(tmp_path) == newest  # reading it (eval.py, predict.py) is fine
    # An owner whose process ended without releasing the folder (a crash on this host): resumable.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (newest.parent.parent / launch.OWNER_FILE).write_text(
        json.dumps(dataclasses.asdict(launch.Owner(me.host, dead.pid)))
    )
    assert find_last_checkpoint(tmp_path, for_resume=True) == newest
    # Another SLURM job's run, whether it runs or waits requeued: never.
    (newest.parent.parent / launch.OWNER_FILE).write_text(
        json.dumps(dataclasses.asdict(launch.Owner("node7", 123, "99")))
    )
    with pytest.raises(ValueError, match=r"SLURM job 99"):
        find_last_checkpoint(tmp_path, for_resume=True)
    # The requeued job 99 itself takes its own run, even when another run's last.ckpt is newer.
    for name, value in {**SLURM, "SLURM_JOB_ID": "99", "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(name, value)
    os.utime(older)
    assert find_last_checkpoint(tmp_path, for_resume=True) == newest
    assert requeued_checkpoint(newest.parent.parent) == newest
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same job, not requeued: no own checkpoint to take
    assert requeued_checkpoint(newest.parent.parent) is None


def test_checkpoints_carry_the_random_generators(tmp_path: Path) -> None:
    torch.save(rng_states(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    torch.rand(5), np.random.rand(7), random.random()  # the process moves on
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))  # as checkpoints are read
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == expected[:2]
    torch.testing.assert_close(again[2], expected[2])


def test_the_resumed_module_restores_best_values_and_generators(tmp_path: Path, fast: list[str]) -> None:
    from ssd_lightning.cli.build import build_module, instantiate_datamodule

    cfg = compose_config("train", fast, tmp_path)
    module = build_module(cfg, instantiate_datamodule(cfg))
    module.best_validation = {"val/map_voc07": 0.5}
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path / "state.ckpt"
    torch.save(checkpoint, path)
    expected = torch.rand(4)
    fresh = build_module(cfg, instantiate_datamodule(cfg))
    fresh.on_load_checkpoint(torch.load(path, weights_only=True))  # loadable by the safe unpickler
    assert fresh.best_validation == {"val/map_voc07": 0.5}
    torch.testing.assert_close(torch.rand(4), expected)
