"""logger=wandb offline: the run folder holds the resolved config, the metrics and the image panel; a
resumed training continues the same W&B run."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import wandb
from google.protobuf.message import DecodeError
from training_helpers import compose_config
from wandb.proto import wandb_internal_pb2

from ssd_lightning.cli.train import train

FORMAT_CHANGED = (
    f"the offline log format of wandb {wandb.__version__} is not the one this test reads (LevelDB-framed "
    "protobuf records); update read_records to the installed version's format"
)
_BLOCK = 32768  # the transaction log is LevelDB's log format: 32 KiB blocks of framed chunks
_HEADER = 7


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The protobuf records of an offline run's `run-<id>.wandb` file (what `wandb sync` uploads)."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        pytest.fail(f"{path} does not start like a W&B transaction log: {FORMAT_CHANGED}", pytrace=False)
    records, chunks, position = [], [], _HEADER
    while position + _HEADER <= len(data):
        if _BLOCK - position % _BLOCK < _HEADER:  # block trailer too short for a header: padding
            position += _BLOCK - position % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        position += _HEADER
        if kind == 0:  # zero padding to the end of the block
            position += _BLOCK - position % _BLOCK if position % _BLOCK else 0
            continue
        chunks.append(data[position : position + length])
        position += length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(b"".join(chunks))
            except DecodeError as error:
                pytest.fail(f"{path}: a record does not parse ({error}): {FORMAT_CHANGED}", pytrace=False)
            records.append(record)
            chunks = []
    return records


def finished_records(log: Path, timeout_s: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The records once the run's closing `exit` record is on disk: W&B's writer is a separate process that
    may still be flushing when `finish()` returns on a loaded machine."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_records(log)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def run_contents(run_dir: Path) -> tuple[dict, set[str]]:
    """(config, history keys) of an offline run folder."""
    (log,) = run_dir.glob("run-*.wandb")
    config, history = {}, set()
    for record in finished_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.update(item.key or item.nested_key[0] for item in record.history.item)
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    return config, history


@pytest.mark.timeout(900)
def test_wandb_offline_run_folder(fast: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [
        *fast,
        "logger=wandb",
        "logger.wandb.project=ssd-ci",
        "tags=[ci,shapes]",
        "callbacks.wandb_images.num_images=2",
        "callbacks.wandb_images.min_score=0.0",
        "test=false",
    ]
    composed = compose_config("train", [*args, "optimizer.lr=0.0042"], tmp_path / "first")
    train(composed)
    (run_dir,) = (tmp_path / "first" / "wandb").glob("offline-run-*")
    config, history = run_contents(run_dir)
    # The fully resolved Hydra config, logged once, overrides included.
    assert config["model"]["name"] == "compact" and config["optimizer"]["lr"] == 0.0042
    assert config["paths"]["output_dir"] == str(tmp_path / "first")
    assert {"train/loss", "train/loss_loc", "train/lr", "val/map", "val/map_voc07", "val/examples"} <= history
    # The panel: images with two box layers (predictions and ground truth).
    assert list((run_dir / "files" / "media" / "images").rglob("*.png"))
    (boxes,) = list((run_dir / "files" / "media" / "metadata" / "boxes2D").rglob("*.json"))[:1]
    assert "box_data" in json.loads(boxes.read_text())
    run_id = run_dir.name.rsplit("-", 1)[1]

    # Resuming the training continues the same W&B run.
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    train(compose_config("train", [*args, "trainer.max_epochs=3", f"ckpt_path={last}"], tmp_path / "second"))
    (resumed,) = (tmp_path / "second" / "wandb").glob("offline-run-*")
    assert resumed.name.endswith(f"-{run_id}")
