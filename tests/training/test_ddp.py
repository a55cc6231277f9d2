"""DDP on two CPU processes (gloo): one output folder, a sharded epoch, metrics over the whole split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from training_helpers import check_ok, run_script


@pytest.mark.timeout(900)
def test_ddp_on_two_cpu_processes(fast: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    single_process = [a for a in fast if not a.startswith(("trainer.devices", "trainer.accelerator"))]
    args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *single_process]
    stdout = check_ok(
        run_script(
            "train.py",
            [*args, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"],
            cwd=tmp_path,
        )  # Lightning starts the second process as `python train.py ...`
    )
    assert stdout.count("Final mAP") == 1  # reports come from rank 0 only
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 24 training images, 4 per process and step, 2 processes: 3 steps per epoch.
    assert metrics["step"] == 6
    # Validation and test metrics are synchronised: each rank saw 4 of the 8 images, the metric all 8.
    assert metrics["val/num_images"] == 8 and metrics["test/num_images"] == 8
    assert not (tmp_path / "outputs").exists()  # the worker processes wrote into the same run folder

    # One process evaluating the final weights finds the mAP the two processes logged together.
    out_json = tmp_path / "eval.json"
    dataset_args = [a for a in fast if a.startswith("dataset.")]
    check_ok(
        run_script(
            "eval.py",
            [
                f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                "split=val",
                f"output_json={out_json}",
                *dataset_args,
                f"hydra.run.dir={tmp_path / 'eval'}",
            ],
            cwd=tmp_path,
        )
    )
    evaluated = json.loads(out_json.read_text())
    assert evaluated["num_images"] == 8
    assert evaluated["map_voc07"] == pytest.approx(metrics["val/map_voc07"], abs=1e-3)
    assert evaluated["map"] == pytest.approx(metrics["val/map"], abs=1e-3)
