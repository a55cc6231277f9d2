"""What README promises and no other test checks: a deterministic built-in run, fine-tuning from published
detector files, the debug options, export.py from the command line, DDP spawn, several loggers at once, and
README's own Python snippets."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_convert import _FlatSSD300, _randomise
from training_helpers import (
    PROJECT_ROOT,
    FittedRun,
    check_ok,
    compose_config,
    on_two_cpu_processes,
    run_script,
)

import ssd_lightning as sl
from ssd_lightning.cli.build import build_module, instantiate_datamodule, instantiate_loggers
from ssd_lightning.cli.train import initialise_weights, train


def test_the_built_in_run_is_deterministic(fast: list[str], tmp_path: Path) -> None:
    """README: the same command gives the same mAP (same seed, same library versions)."""
    short = [*fast, "trainer.max_epochs=1", "trainer.limit_train_batches=3"]
    runs = [train(compose_config("train", short, tmp_path / name)) for name in ("a", "b")]
    assert runs[0]["test/map_voc07"] == runs[1]["test/map_voc07"]
    assert runs[0]["train/loss"] == runs[1]["train/loss"]
    first, second = (torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=False) for n in "ab")
    for key, value in first["state_dict"].items():
        torch.testing.assert_close(value, second["state_dict"][key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("source", ["ssd.pytorch", "torchvision"])
def test_fine_tuning_starts_from_a_published_detector(source: str, shapes_root: Path, tmp_path: Path) -> None:
    """model.weights=<file> model.weights_source=...: every tensor from the file, the class-score layers of
    another class count fresh (the built-in data has 5 classes, the files 21 or 91)."""
    if source == "ssd.pytorch":
        state = _randomise(_FlatSSD300(21), seed=3).state_dict()
        prior_overrides = []
    else:
        from torchvision.models.detection import ssd300_vgg16

        state = _randomise(
            ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91), seed=3
        ).state_dict()
        prior_overrides = ["model.net.prior_preset_name=torchvision"]
    path = tmp_path / "detector.pth"
    torch.save(state, path)
    cfg = compose_config(
        "train",
        [
            "model=ssd300",
            f"model.weights={path}",
            f"model.weights_source={source}",
            *prior_overrides,
            f"dataset.root={shapes_root}",
        ],
        tmp_path,
    )
    assert list(cfg.model.pixel_mean) == [123.0, 117.0, 104.0]  # the normalisation those weights expect
    module = build_module(cfg, instantiate_datamodule(cfg))
    fresh_conf = module.net.heads[0].conf.weight.detach().clone()
    initialise_weights(cfg, module)
    expected = sl.convert_state_dict(state, source)
    loaded = module.net.state_dict()
    for key, value in expected.items():
        if ".conf." in key:
            assert loaded[key].shape != value.shape  # 6 classes here
        else:
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(module.net.heads[0].conf.weight, fresh_conf)  # left as initialised


@pytest.mark.parametrize(
    ("debug", "overrides", "steps"),
    [
        ("fast_dev_run", [], 1),  # one batch of each loop
        ("limit", ["test=false"], 2 * 5),  # 2 epochs of 5 batches
        ("overfit", ["trainer.max_epochs=3", "trainer.check_val_every_n_epoch=3"], 3 * 2),  # 2 batches
    ],
)
def test_debug_options_run(
    debug: str, overrides: list[str], steps: int, fast: list[str], tmp_path: Path
) -> None:
    base = [o for o in fast if not o.startswith(("trainer.max_epochs", "trainer.check_val"))]
    metrics = train(compose_config("train", [*base, f"debug={debug}", *overrides], tmp_path))
    assert metrics["step"] == steps


@pytest.mark.timeout(900)
def test_export_py_writes_onnx_by_default_or_where_told(fitted_run: FittedRun, tmp_path: Path) -> None:
    import onnxruntime

    check_ok(
        run_script(
            "export.py", [f"ckpt_path={fitted_run.checkpoint}", f"hydra.run.dir={tmp_path / 'a'}"], tmp_path
        )
    )
    default = tmp_path / "a" / "model.onnx"  # ONNX, in the export run's folder
    chosen = tmp_path / "elsewhere" / "ssd.onnx"
    check_ok(
        run_script(
            "export.py",
            [
                f"ckpt_path={fitted_run.checkpoint}",
                f"output={chosen}",
                "input_format=uint8",
                f"hydra.run.dir={tmp_path / 'b'}",
            ],
            tmp_path,
        )
    )
    for path, dtype in ((default, "tensor(float)"), (chosen, "tensor(uint8)")):
        session = onnxruntime.InferenceSession(str(path))
        assert session.get_inputs()[0].type == dtype
        assert [o.name for o in session.get_outputs()][:3] == ["boxes", "scores", "labels"]


@pytest.mark.timeout(900)
def test_ddp_spawn_trains_on_two_cpu_processes(fast: list[str], tmp_path: Path) -> None:
    args = [
        *on_two_cpu_processes(fast),
        "trainer.strategy=ddp_spawn",
        "trainer.max_epochs=1",
        "test=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    stdout = check_ok(run_script("train.py", args, cwd=tmp_path))  # spawns two new interpreters
    assert "Final mAP" in stdout
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3  # 24 images, 4 per process and step, 2 processes


def test_several_loggers_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config("train", ["logger=[csv,wandb]"], tmp_path)
    loggers = instantiate_loggers(cfg.logger)
    assert sorted(type(logger).__name__ for logger in loggers) == sorted(
        [CSVLogger.__name__, WandbLogger.__name__]
    )


def readme_python_blocks() -> list[tuple[int, str]]:
    text = (PROJECT_ROOT / "README.md").read_text()
    return [
        (text[: match.start()].count("\n") + 1, match.group(1))
        for match in re.finditer(r"```python\n(.*?)```", text, flags=re.DOTALL)
    ]


@pytest.fixture(scope="module")
def readme_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files README's snippets name: ssd.pytorch weights, an ONNX file, a photo (made once: the export
    takes seconds)."""
    from ssd_lightning.export import export_onnx

    folder = tmp_path_factory.mktemp("readme_files")
    torch.save(_randomise(_FlatSSD300(21), seed=5).state_dict(), folder / "ssd300_mAP_77.43_v2.pth")
    net = sl.build_ssd(96, 6, arch="compact", width=8).eval()
    export_onnx(net, folder / "ssd.onnx", input_format="uint8", pixel_mean=[123.0] * 3, pixel_std=[58.0] * 3)
    image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / "dog.jpg"), image)
    return folder


@pytest.mark.parametrize(
    ("line", "code"), readme_python_blocks(), ids=lambda v: str(v) if isinstance(v, int) else ""
)
def test_readme_python_snippets_run(
    line: int, code: str, readme_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ```python block of README runs as written, given the files it names (copies: a snippet may
    change them)."""
    shutil.copytree(readme_files, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
