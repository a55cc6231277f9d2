"""A value of the wrong kind or a metric name that the run never logs ends in one line naming the option and
an example, before any data is read or any model built."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import pytest
from training_helpers import compose_config


@pytest.mark.parametrize(
    ("script", "override", "message"),
    [
        ("train", "optimizer.lr=abc", "optimizer.lr=abc is not a number: e.g. optimizer.lr=0.001"),
        ("train", "seed=abc", "seed=abc is not a whole number: e.g. seed=42 (or seed=null)"),
        ("train", "dataset.batch_size=1.5", "dataset.batch_size=1.5 is not a whole number"),
        (
            "predict",
            "display_threshold=abc",
            "display_threshold=abc is not a number or best_f1: e.g. display_threshold=0.4 (or best_f1)",
        ),
        ("eval", "analysis_score_threshold=x", "analysis_score_threshold=x is not a number"),
        ("train", "monitor=val/mAP", "monitor=val/mAP is not a metric this run logs; did you mean val/map"),
        (
            "train",
            "optimized_metric=val/map_voc7",
            "optimized_metric=val/map_voc7 is not a metric this run logs",
        ),
    ],
)
def test_a_wrong_value_is_one_line_before_any_work(
    script: str,
    override: str,
    message: str,
    shapes_root: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    entry = importlib.import_module(f"ssd_lightning.cli.{script}")
    data = [f"dataset.root={shapes_root}"] if script == "train" else ["ckpt_path=missing.ckpt"]
    cfg = compose_config(script, [*data, override], tmp_path)
    with pytest.raises(SystemExit) as exited, caplog.at_level(logging.INFO, logger="ssd_lightning"):
        entry.main.__wrapped__(cfg)
    assert exited.value.code == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.startswith(message), error
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained
    assert "global batch" not in caplog.text  # nor was the data module built
