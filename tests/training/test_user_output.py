"""What a user sees: a picture of the final model's detections, predict.py without input=, one line for a
missing option, a console without third-party noise, and the run's log in its folder."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import pytest
from torchvision.io import decode_png, read_file
from training_helpers import FittedRun, check_ok, compose_config, run_script

ENTRY_POINTS = {
    "train.py": ["dataset=voc"],  # dataset.root is mandatory for voc
    "eval.py": [],
    "predict.py": [],
    "export.py": [],
}


def test_a_run_shows_its_detections_and_reads_cleanly(fitted_run: FittedRun) -> None:
    stdout, run = fitted_run.stdout, fitted_run.folder
    picture = run / "test_detections.png"
    assert f"Detections on test images: {picture}" in stdout
    grid = decode_png(read_file(str(picture)))
    # 8 test images of 96 px, enlarged 4x (to at least 320 px), in 4 columns and 2 rows with 6 px gaps.
    assert grid.shape == (3, 2 * 384 + 3 * 6, 4 * 384 + 5 * 6)
    assert grid.float().std() > 20  # the images themselves, not an empty canvas
    # The console: our lines and Lightning's useful ones, not its tips, nor deprecation notices.
    for noise in ("💡 Tip", "LeafSpec", "GPU available", "Traceback"):
        assert noise not in stdout
    # ... and all of it in the run's log file too, with times and sources.
    log = (run / "train.log").read_text()
    assert "Final mAP" in log and "[ssd_lightning]" in log and "`Trainer.fit` stopped" in log


@pytest.mark.timeout(900)
def test_predict_without_input_uses_the_training_datas_test_split(
    fitted_run: FittedRun, tmp_path: Path
) -> None:
    predicted = tmp_path / "predict"
    stdout = check_ok(
        run_script(
            "predict.py",
            [f"ckpt_path={fitted_run.checkpoint}", f"hydra.run.dir={predicted}"],
            cwd=tmp_path,
            env={"HYDRA_FULL_ERROR": "0"},
        )
    )
    assert "the test split of the checkpoint's training data" in stdout
    drawn = sorted(p.name for p in (predicted / "images").glob("*.jpg"))
    assert drawn == [f"test_{i:06d}.jpg" for i in range(8)]
    results = json.loads((predicted / "detections.json").read_text())
    assert results and {r["image_id"] for r in results} <= set(range(8))


def test_a_missing_option_ends_the_command_line_in_one_line(tmp_path: Path) -> None:
    result = run_script("eval.py", [], cwd=tmp_path, env={"HYDRA_FULL_ERROR": "0"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    output = (result.stdout + result.stderr).strip().splitlines()
    assert output == [
        "ERROR: eval.py needs ckpt_path=...: a checkpoint file, or `last` for the newest training run's "
        "last.ckpt: ckpt_path=last"
    ]


@pytest.mark.parametrize("script", list(ENTRY_POINTS))
def test_every_entry_point_names_its_missing_option_with_an_example(
    script: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    entry = importlib.import_module(f"ssd_lightning.cli.{script[:-3]}")
    cfg = compose_config(script[:-3], ENTRY_POINTS[script], tmp_path)
    with pytest.raises(SystemExit) as exited, caplog.at_level(logging.ERROR, logger="ssd_lightning"):
        entry.main.__wrapped__(cfg)  # what @hydra.main calls
    assert exited.value.code == 1
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    option = "dataset.root" if script == "train.py" else "ckpt_path"
    assert message.startswith(f"{script} needs {option}=...: ")
    assert ("dataset.root=/data/" if option == "dataset.root" else "ckpt_path=last") in message  # an example


@pytest.mark.parametrize(
    ("interval_s", "expected"),
    [
        (3600, ["epoch 1/2 step 1/6"]),  # the first step always, then not before an hour
        (3, ["epoch 1/2 step 1/6", "epoch 1/2 step 4/6", "epoch 2/2 step 1/6", "epoch 2/2 step 4/6"]),
    ],
)
def test_progress_in_a_log_file_is_a_line_every_few_seconds(
    interval_s: int, expected: list[str], fast: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ssd_lightning.cli.train import train

    # pytest's stderr is not a terminal: the bar becomes log lines, at most one per interval. The clock is a
    # second later at every reading (one per step and epoch), whatever the machine's speed.
    overrides = [
        o for o in fast if o not in ("trainer.enable_progress_bar=false", "callbacks.progress_bar=null")
    ]
    clock = ["+callbacks.progress_bar.clock._target_=probes.TickingClock"]
    cfg = compose_config(
        "train",
        [*overrides, *clock, f"callbacks.progress_bar.interval_s={interval_s}", "test=false"],
        tmp_path,
    )
    with caplog.at_level(logging.INFO, logger="ssd_lightning.progress"):
        assert train(cfg)["step"] == 12
    steps = [
        r.getMessage()
        for r in caplog.records
        if r.name == "ssd_lightning.progress" and " step " in r.getMessage()
    ]
    assert [line.split(",")[0].split(" |")[0] for line in steps] == expected, steps
