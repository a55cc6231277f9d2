"""Executes the notebooks in notebooks/ on the CPU, with small settings, and checks what they print and draw.

Each notebook has a cell tagged `parameters` (papermill's convention); the tests add a cell after it that
overrides those settings (smaller data, fewer steps), so the notebooks run as a user runs them, only
faster. The notebooks are committed without outputs; `test_notebooks_are_committed_without_outputs`
keeps it that way.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
import torch
import torchvision
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

import ssd_lightning as sl

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL_NAME = "ssd-lightning-tests"
#: the built-in data at a size that generates in a fraction of a second
SMALL_SHAPES = {"num_train": 24, "num_val": 8, "num_test": 8, "min_side": 120, "max_side": 200}
#: a hang guard per cell, not a timing check
CELL_TIMEOUT_S = 600

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kernelspec that runs this very interpreter, so the notebooks see the environment under test."""
    kernels = tmp_path_factory.mktemp("kernels")
    spec = kernels / KERNEL_NAME
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL_NAME, "language": "python"})
    )
    return kernels


@pytest.fixture(scope="module")
def shapes_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$SSD_DATA_CACHE for the notebooks: away from the user's cache, shared by the tests of this module."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture
def notebook_env(monkeypatch: pytest.MonkeyPatch, shapes_cache: Path) -> None:
    """Environment of the kernel (it inherits ours)."""
    monkeypatch.setenv("SSD_DATA_CACHE", str(shapes_cache))
    # The inline backend renders with Agg into PNG outputs, which the tests count; a GUI backend or plain
    # Agg from the caller's environment would leave no figure in the notebook.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # One thread: on a busy shared CPU, OpenMP threads spinning on each other make the training steps many
    # times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def run_notebook(name: str, kernels: Path, **parameters: Any) -> nbformat.NotebookNode:
    """Execute notebooks/`name` in notebooks/ with `parameters` overriding its settings cell."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters', found {len(tagged)}"
    settings = nbformat.v4.new_code_cell("\n".join(f"{key} = {value!r}" for key, value in parameters.items()))
    notebook.cells.insert(tagged[0] + 1, settings)
    manager = KernelManager(
        kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
    )
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=120,
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # the notebooks' relative paths start there
    )
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
    return notebook


def printed(notebook: nbformat.NotebookNode) -> str:
    """Everything the notebook printed."""
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stdout"
    )


def figures(notebook: nbformat.NotebookNode) -> int:
    """Number of images the notebook displayed."""
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def find(pattern: str, text: str) -> re.Match:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the notebook's output:\n{text}"
    return match


@pytest.fixture
def no_published_weights() -> dict[str, None]:
    """Settings that skip the published-weights section, whatever files this machine has (section 6 then
    converts a random torchvision SSDLite)."""
    return {"SSD_PYTORCH_WEIGHTS": None, "TORCHVISION_WEIGHTS": None, "SSDLITE_WEIGHTS": None}


def test_quickstart_trains_detects_and_draws(
    kernel_dir: Path, notebook_env: None, no_published_weights: dict[str, None]
) -> None:
    steps = 30
    notebook = run_notebook(
        "01_quickstart.ipynb",
        kernel_dir,
        SHAPES_OPTIONS=SMALL_SHAPES,
        IMAGE_SIZE=96,
        WIDTH=16,
        TRAIN_STEPS=steps,
        BATCH_SIZE=8,
        NUM_IMAGES=2,
        MIN_SCORE=0.0,
        **no_published_weights,
    )
    text = printed(notebook)
    expected_priors = len(sl.build_ssd(size=96, num_classes=6, arch="compact", width=16).priors)
    assert find(r"model: 96 px input, (\d+) priors", text).group(1) == str(expected_priors)
    assert find(r"(\d+) training images", text).group(1) == str(SMALL_SHAPES["num_train"])
    assert find(r"trained (\d+) steps", text).group(1) == str(steps)
    losses = find(r"first \d+ steps: ([\d.]+), of the last \d+: ([\d.]+)", text)
    # Without learning the two means differ by about 5% (other batches); 30 steps cut the loss by a third.
    assert float(losses.group(2)) < 0.8 * float(losses.group(1)), "the loss did not go down"
    # with MIN_SCORE 0 every image gets its MAX_BOXES (5) best detections
    assert find(r"drew (\d+) detections on (\d+) images", text).groups() == ("10", "2")
    assert "ssd.pytorch: no weights at None; skipped" in text
    assert figures(notebook) == 2  # loss curve, detections
    # torchvision's SSDLite (random weights, batch statistics) converted: the same outputs, prior for prior
    assert "SSDLite320 from a random torchvision SSDLite (no weights file here): 3234 priors" in text
    pattern = r"class logits up to ([\d.]+); .*: box offsets ([\d.e+-]+), class logits ([\d.e+-]+)"
    ssdlite = find(pattern, text)
    assert float(ssdlite.group(1)) > 0.1  # not vanishing activations
    assert float(ssdlite.group(2)) < 1e-4 and float(ssdlite.group(3)) < 1e-4


def _training_checkpoint(path: Path, image_size: int) -> Path:
    """A checkpoint as `python train.py` writes it: compact model, shapes classes, untrained."""
    import pytorch_lightning as pl

    from ssd_lightning.data import SHAPE_CLASSES
    from ssd_lightning.training import SSDLitModule

    module = SSDLitModule(
        class_names=list(SHAPE_CLASSES),
        net={"arch": "compact", "size": image_size, "width": 8},
        pixel_mean=[120.0, 115.0, 100.0],
        pixel_std=[60.0, 60.0, 60.0],
    )
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def test_quickstart_loads_a_checkpoint_and_converted_torchvision_weights(
    kernel_dir: Path, notebook_env: None, tmp_path: Path
) -> None:
    checkpoint = _training_checkpoint(tmp_path / "last.ckpt", image_size=112)
    # torchvision's SSD300 layout with random weights: what `sl.convert_state_dict` must map, tensor by tensor
    reference = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91)
    torchvision_file = tmp_path / "ssd300_vgg16_coco.pth"
    torch.save(reference.state_dict(), torchvision_file)
    ssdlite = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=91
    )
    ssdlite_file = tmp_path / "ssdlite320_mobilenet_v3_large_coco.pth"
    torch.save(ssdlite.state_dict(), ssdlite_file)

    notebook = run_notebook(
        "01_quickstart.ipynb",
        kernel_dir,
        CHECKPOINT=str(checkpoint),
        SHAPES_OPTIONS=SMALL_SHAPES,
        NUM_IMAGES=1,
        SSD_PYTORCH_WEIGHTS=str(tmp_path / "absent.pth"),
        TORCHVISION_WEIGHTS=str(torchvision_file),
        SSDLITE_WEIGHTS=str(ssdlite_file),
    )
    text = printed(notebook)
    assert f"loaded {checkpoint}" in text
    # the network comes from the checkpoint (112 px, width 8), not from the notebook's settings (160 px)
    expected_priors = len(sl.build_ssd(size=112, num_classes=6, arch="compact", width=8).priors)
    assert find(r"model: (\d+) px input, (\d+) priors", text).groups() == ("112", str(expected_priors))
    assert "no training here" in text and not re.search(r"trained \d+ steps", text)
    assert f"ssd.pytorch: no weights at {tmp_path / 'absent.pth'}; skipped" in text
    assert f"torchvision: loaded {torchvision_file} into SSD300 (8732 priors)" in text
    assert f"SSDLite320 from {ssdlite_file}: 3234 priors" in text  # the file, loaded strictly
    assert figures(notebook) == 2  # the checkpoint's detections, the converted SSD300's


def test_priors_and_matching(kernel_dir: Path, notebook_env: None, coco128_root: Path) -> None:
    notebook = run_notebook(
        "02_priors_and_matching.ipynb",
        kernel_dir,
        SHAPES_OPTIONS=SMALL_SHAPES,
        COCO128_ROOT=str(coco128_root),
    )
    text = printed(notebook)
    assert "SSD300: 300 px input, 8732 priors" in text  # the paper's count
    compact = sl.build_ssd(size=160, num_classes=6, arch="compact")
    assert f"compact: 160 px input, {len(compact.priors)} priors" in text
    totals = re.findall(r"total  (\d+) = ([\d +]+)\n", text)
    assert totals[0] == ("8732", "5776 + 2166 + 600 + 150 + 36 + 4")  # per feature map, 38x38 to 1x1
    assert int(totals[1][0]) == len(compact.priors) == sum(int(n) for n in totals[1][1].split(" + "))

    # every object trains at least one prior (the bipartite match), on both models
    matched = re.findall(r"matched priors per object: \[([\d, ]+)\]", text)
    assert len(matched) == 2
    for counts in matched:
        per_object = [int(n) for n in counts.split(",")]
        assert len(per_object) >= 2 and min(per_object) >= 1
    positives = [int(n) for n in re.findall(r": (\d+) of \d+ priors are positives", text)]
    assert positives == [sum(int(n) for n in counts.split(",")) for counts in matched]
    # prior coverage: the compact model on the built-in training boxes, SSD300 (COCO sizes) on coco128's
    shapes = find(r"prior coverage of shapes train \(compact\): (\d+) boxes at 160x160 input", text)
    reached = find(r"prior coverage of shapes train.*\n  reached by a prior: (\d+) of (\d+)", text)
    assert int(shapes.group(1)) == int(reached.group(2)) > 0 and int(reached.group(1)) > 0
    _, coco_boxes = _coco_box_count(coco128_root / "coco" / "annotations" / "instances_train2017.json")
    crowd = 10  # coco128's README: crowd boxes are not training targets
    coco = r"prior coverage of coco128 \(SSD300, COCO sizes\): (\d+) boxes at 300x300 input, 8732 priors"
    assert int(find(coco, text).group(1)) == coco_boxes - crowd
    assert find(r"(model\.net\.min_sizes=\[.*\] model\.net\.max_sizes=\[.*\])", text)
    # centre cells per model, the sparse sample, matches per model, best IoU by box size
    assert figures(notebook) == 2 + 1 + 2 + 1


def _coco_box_count(annotation_file: Path) -> tuple[int, int]:
    data = json.loads(annotation_file.read_text())
    return len(data["images"]), len(data["annotations"])


def test_data_and_augmentation_on_shapes_and_coco128(
    kernel_dir: Path, notebook_env: None, coco128_root: Path
) -> None:
    notebook = run_notebook(
        "03_data_and_augmentation.ipynb",
        kernel_dir,
        SHAPES_OPTIONS=SMALL_SHAPES,
        COCO128_ROOT=str(coco128_root),
        IMAGE_SIZE=160,
        NUM_IMAGES=2,
        NUM_AUGMENTED=3,
    )
    text = printed(notebook)
    shapes = find(r"shapes train: (\d+) images, (\d+) boxes, (\d+) classes", text)
    assert int(shapes.group(1)) == SMALL_SHAPES["num_train"]
    assert int(shapes.group(3)) <= 5
    images, boxes = _coco_box_count(coco128_root / "coco" / "annotations" / "instances_train2017.json")
    coco = find(r"coco128: (\d+) images, (\d+) boxes, (\d+) classes", text)
    assert (int(coco.group(1)), int(coco.group(2))) == (images, boxes)
    drawn = re.findall(r": 2 images x 3 augmentations, (\d+) boxes drawn", text)
    assert len(drawn) == 2 and all(int(n) > 0 for n in drawn)
    assert figures(notebook) == 2 * 2  # statistics and augmentation grid per dataset


def test_data_and_augmentation_without_coco128(kernel_dir: Path, notebook_env: None, tmp_path: Path) -> None:
    missing = tmp_path / "no_coco128"
    notebook = run_notebook(
        "03_data_and_augmentation.ipynb",
        kernel_dir,
        SHAPES_OPTIONS=SMALL_SHAPES,
        COCO128_ROOT=str(missing),
        IMAGE_SIZE=160,
        NUM_IMAGES=1,
        NUM_AUGMENTED=2,
    )
    text = printed(notebook)
    assert f"coco128 not found at {missing / 'coco'}: showing the built-in data only" in text
    assert "coco128:" not in text
    assert figures(notebook) == 2


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        stripped = "execution" not in cell.metadata  # run timestamps
        if cell.cell_type == "code":
            stripped = stripped and cell.outputs == [] and cell.execution_count is None
        assert stripped, f"{path.name}: strip the outputs (see notebooks/README.md)"


def test_all_notebooks_are_tested() -> None:
    executed = {"01_quickstart.ipynb", "02_priors_and_matching.ipynb", "03_data_and_augmentation.ipynb"}
    assert {path.name for path in NOTEBOOKS.glob("*.ipynb")} == executed
