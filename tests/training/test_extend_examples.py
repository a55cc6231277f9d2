"""README's "Extend it" examples, as a user runs them: its files written into a project folder outside the
repository, its commands run there against the package installed from its wheel (not editable), with the
user's configs given by --config-dir. Short-run overrides are appended; /data/my_boxes is a CSV copy of
coco128."""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from training_helpers import PROJECT_ROOT, TINY_SHAPES
from wheel_install import install_wheel, outside_env

SHORT_TRAINING = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
]
ON_THIS_CPU = ["dataset.batch_size=4", "dataset.num_workers=0", "trainer.accelerator=cpu"]


def readme_section(title: str) -> str:
    text = (PROJECT_ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def example_files(section: str) -> dict[str, str]:
    """The section's code blocks whose first line names a file: `# my_ssd/backbone.py`."""
    blocks = re.findall(r"```(?:python|yaml)\n# ([\w/.]+)\n(.*?)```", section, re.DOTALL)
    return {path: body for path, body in blocks}


def example_commands(section: str) -> list[str]:
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def csv_copy_of_coco128(coco: Path, root: Path) -> None:
    """coco128's first 40 images as CSVBoxes data: 24 train, 8 val, 8 test."""
    data = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    images = sorted(data["images"], key=lambda image: image["file_name"])[:40]
    boxes: dict[int, list] = {image["id"]: [] for image in images}
    for annotation in data["annotations"]:
        if annotation["image_id"] in boxes and not annotation.get("iscrowd"):
            boxes[annotation["image_id"]].append(annotation)
    (root / "images").mkdir(parents=True)
    for split, chosen in (("train", images[:24]), ("val", images[24:32]), ("test", images[32:])):
        with open(root / f"{split}.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["image", "xmin", "ymin", "xmax", "ymax", "class"])
            for image in chosen:
                (root / "images" / image["file_name"]).symlink_to(coco / "train2017" / image["file_name"])
                for a in boxes[image["id"]]:
                    x, y, w, h = a["bbox"]
                    writer.writerow([image["file_name"], x, y, x + w, y + h, names[a["category_id"]]])


@pytest.mark.timeout(900)
def test_the_extend_it_examples_run_outside_the_repository_on_the_installed_wheel(
    tmp_path: Path, shapes_root: Path, coco128_root: Path
) -> None:
    section = readme_section("Extend it")
    files, commands = example_files(section), example_commands(section)
    assert len(files) == 6 and len(commands) == 5  # three plug-ins and their configs; train, eval, export
    venv = install_wheel(tmp_path)
    project = tmp_path / "my_project"
    for path, body in {**files, "my_ssd/__init__.py": ""}.items():
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text(body)
    boxes = tmp_path / "my_boxes"
    csv_copy_of_coco128(coco128_root / "coco", boxes)
    env = {**outside_env(), "PATH": f"{venv / 'bin'}:{outside_env()['PATH']}", "WANDB_MODE": "disabled"}

    for command in commands:
        words = shlex.split(command.replace("/data/my_boxes", str(boxes)))
        assignments, program, arguments = words[0], words[1], words[2:]
        if program == "ssd-train":
            arguments += [*SHORT_TRAINING, *ON_THIS_CPU]
            if "dataset=csv_boxes" not in arguments:  # the built-in data, at its tiny test size
                arguments += [f"dataset.root={shapes_root}", *TINY_SHAPES]
        elif program == "ssd-eval":
            arguments += ["trainer.limit_test_batches=1", *ON_THIS_CPU]
        key, _, value = assignments.partition("=")
        result = subprocess.run(
            [str(venv / "bin" / program), *arguments],
            cwd=project,
            env={**env, key: value},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        if program == "ssd-eval":
            assert re.search(r"mAP VOC07 \(11-point, IoU 0\.5\): \d\.\d{4}", result.stdout + result.stderr)

    runs = sorted((project / "outputs" / "train").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert len(runs) == 3
    backbone_run, augmentation_run, all_three = (torch.load(p, weights_only=True) for p in runs)
    assert backbone_run["hyper_parameters"]["net"]["backbone"]["_target_"] == "my_ssd.backbone.TinyBackbone"
    assert (
        "backbone" not in augmentation_run["hyper_parameters"]["net"]
        or not augmentation_run["hyper_parameters"]["net"]["backbone"]
    )
    data = all_three["datamodule_hyper_parameters"]
    assert data["source"]["_target_"] == "my_ssd.csv_boxes.CSVBoxes"
    assert data["augmentation"]["_target_"] == "my_ssd.augmentation.BlurFlipResize"
    assert all_three["hyper_parameters"]["net"]["backbone"]["width"] == 16
    assert "person" in all_three["hyper_parameters"]["class_names"]  # coco128's classes, from the CSV rows
    assert (project / "model.onnx").stat().st_size > 100_000
