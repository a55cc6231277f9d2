"""Exact distributed evaluation: every image is evaluated once on any number of ranks (Lightning's default
sampler pads the ranks with repeated images), with the same mAP as one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from training_helpers import FittedRun, check_ok, run_script, shapes_as_voc

IMAGES = 7  # does not divide over 3 ranks: the default sampler would evaluate 9


def test_ranks_share_the_images_without_repeats() -> None:
    dataset = list(range(IMAGES))
    shards = [
        list(UnrepeatedDistributedSampler(dataset, num_replicas=3, rank=rank, shuffle=False))
        for rank in range(3)
    ]
    assert sorted(i for shard in shards for i in shard) == dataset


@pytest.mark.timeout(900)
def test_three_processes_report_the_images_and_map_of_one(fitted_run: FittedRun, tmp_path: Path) -> None:
    # A 7-image split of the images the checkpoint was fitted to (a real mAP), read as VOC-layout data.
    root = Path(next(o for o in fitted_run.overrides if o.startswith("dataset.root=")).split("=", 1)[1])
    main = root / "VOCshapes" / "ImageSets" / "Main"
    (main / "seven.txt").write_text("".join(main.joinpath("train.txt").read_text().splitlines(True)[:IMAGES]))
    common = [
        f"ckpt_path={fitted_run.checkpoint}",
        *shapes_as_voc(root),
        *(f"dataset.{split}_sets=[[shapes,seven]]" for split in ("train", "val", "test")),
        "dataset.batch_size=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    ]
    results = {}
    outputs = {}
    for processes in (1, 3):
        strategy = ["trainer=ddp", f"trainer.devices={processes}"] if processes > 1 else ["trainer.devices=1"]
        out = tmp_path / f"eval_{processes}.json"
        outputs[processes] = check_ok(
            run_script(
                "eval.py",
                [*common, *strategy, f"output_json={out}", f"hydra.run.dir={tmp_path / str(processes)}"],
                cwd=tmp_path,
            )
        )
        results[processes] = json.loads(out.read_text())
    one, three = results[1], results[3]
    assert one["num_images"] == three["num_images"] == IMAGES
    assert one["map_voc07"] > 0.2, "the fitted checkpoint should detect the shapes it was fitted to"
    for key in ("map_voc07", "map_voc12", "map", "map_50"):
        assert three[key] == pytest.approx(one[key], abs=1e-6), key
    assert outputs[3].count("mAP VOC07") == 1  # reported by rank 0 only
