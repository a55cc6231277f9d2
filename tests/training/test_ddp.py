"""DDP on two CPU processes (gloo): one output folder, a sharded epoch, metrics over the whole split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from training_helpers import FittedRun, check_ok, run_script


@pytest.mark.timeout(900)
def test_ddp_on_two_cpu_processes(fitted_run: FittedRun, tmp_path: Path) -> None:
    # Fine-tuning of the fitted weights (model.weights=): validation scores a real mAP, so the comparison
    # with one process below can fail.
    run_dir = tmp_path / "run"
    replaced = ("trainer.devices=", "trainer.max_epochs=", "trainer.check_val_every_n_epoch=", "run_name=")
    args = [
        *(option for option in fitted_run.overrides if not option.startswith(replaced)),
        f"model.weights={fitted_run.checkpoint}",
        "optimizer.lr=1e-4",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "trainer.check_val_every_n_epoch=1",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    # Lightning starts the second process as `python train.py ...`
    stdout = check_ok(run_script("train.py", args, cwd=tmp_path))
    assert stdout.count("Final mAP") == 1  # reports come from rank 0 only
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 24 training images, 4 per process and step, 2 processes: 3 steps per epoch.
    assert metrics["step"] == 6
    # Validation and test metrics are synchronised: each rank saw half of the images, the metric all of them.
    assert metrics["val/num_images"] == 32 and metrics["test/num_images"] == 8
    assert metrics["val/map_voc07"] > 0.2
    assert not (tmp_path / "outputs").exists()  # the worker processes wrote into the same run folder

    # One process evaluating the final weights finds the mAP the two processes logged together.
    out_json = tmp_path / "eval.json"
    dataset_args = [a for a in fitted_run.overrides if a.startswith(("dataset.", "dataset="))]
    eval_args = [
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        "split=val",
        f"output_json={out_json}",
        *dataset_args,
        f"hydra.run.dir={tmp_path / 'eval'}",
    ]
    check_ok(run_script("eval.py", eval_args, cwd=tmp_path))
    evaluated = json.loads(out_json.read_text())
    assert evaluated["num_images"] == 32
    for key in ("map_voc07", "map", "map_75"):
        assert evaluated[key] == pytest.approx(metrics[f"val/{key}"], rel=1e-4), key
