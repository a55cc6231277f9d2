"""Files given as checkpoints or weights: nothing in them runs (a pickled payload is refused unless
trust_checkpoint=true), and an empty, cut-off, exported or bare file ends in one line naming it."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from training_helpers import FittedRun, compose_config, run_script


class Payload:
    """What an attacker pickles into a shared checkpoint: unpickling it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.makedirs, (str(self.marker),))


@pytest.fixture
def malicious(fitted_run: FittedRun, tmp_path: Path) -> tuple[Path, Path]:
    """A real checkpoint of the fitted run with a payload inside, and the marker the payload would create."""
    checkpoint = torch.load(fitted_run.checkpoint, weights_only=True)
    marker = tmp_path / "payload-ran"
    checkpoint["shared_by"] = Payload(marker)
    path = tmp_path / "shared.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def run_entry_point(
    script: str, overrides: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> tuple[int, str]:
    """`python <script> <overrides>` in this process, as @hydra.main calls it: exit status, error lines."""
    entry = importlib.import_module(f"ssd_lightning.cli.{script}")
    cfg = compose_config(script, overrides, tmp_path / script)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        try:
            entry.main.__wrapped__(cfg)
            code = 0
        except SystemExit as exited:
            code = int(exited.code or 0)
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    return code, errors


@pytest.mark.parametrize("script", ["eval", "predict", "export"])
def test_a_checkpoint_with_a_payload_is_refused_by_every_reader(
    script: str,
    malicious: tuple[Path, Path],
    fitted_run: FittedRun,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    path, marker = malicious
    data = (
        [a for a in fitted_run.overrides if a.startswith(("dataset", "dataset."))] if script == "eval" else []
    )
    code, errors = run_entry_point(script, [f"ckpt_path={path}", *data], tmp_path, caplog)
    assert code == 1 and not marker.exists()
    assert (
        f"ckpt_path={path} holds a Python object (os.makedirs), which a weights-only load refuses" in errors
    )
    assert "trust_checkpoint=true" in errors


@pytest.mark.timeout(600)
def test_training_refuses_a_payload_in_ckpt_path_and_model_weights(
    malicious: tuple[Path, Path], fast: list[str], tmp_path: Path
) -> None:
    path, marker = malicious
    for option in (f"ckpt_path={path}", f"model.weights={path}"):
        result = run_script("train.py", [*fast, option], cwd=tmp_path, env={"HYDRA_FULL_ERROR": "0"})
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "which a weights-only load refuses" in output and "Traceback" not in output, output
        assert not marker.exists()


def test_trusting_a_checkpoint_is_an_explicit_choice(
    malicious: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, marker = malicious
    code, _ = run_entry_point("export", [f"ckpt_path={path}", "trust_checkpoint=true"], tmp_path, caplog)
    assert code == 0 and marker.exists()  # the user said so: the file loads (and its payload ran)


def damaged_files(source: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not usable checkpoints, and the words their message must have."""
    data = source.read_bytes()
    files = {
        "empty": (folder / "empty.ckpt", b"", "is empty (0 bytes)"),
        "cut off": (folder / "cut.ckpt", data[: len(data) // 2], "is cut off or damaged"),
        "onnx": (folder / "model.onnx", b"\x08\x07\x12\x07pytorch", "is not a PyTorch checkpoint"),
    }
    result = {}
    for kind, (path, content, words) in files.items():
        path.write_bytes(content)
        result[kind] = (path, words)
    scripted = folder / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(scripted))
    result["torchscript"] = (scripted, "is an exported TorchScript model")
    bare = folder / "bare.pt"
    torch.save(torch.load(source, weights_only=True)["state_dict"], bare)
    result["bare state dict"] = (
        bare,
        "holds tensors only (a bare state dict, with no record of the network",
    )
    return result


@pytest.mark.parametrize("script", ["eval", "predict", "export"])
def test_damaged_or_foreign_files_end_in_one_line_naming_them(
    script: str,
    fitted_run: FittedRun,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for kind, (path, words) in damaged_files(fitted_run.checkpoint, tmp_path).items():
        code, errors = run_entry_point(script, [f"ckpt_path={path}"], tmp_path, caplog)
        assert code == 1, kind
        assert errors.startswith(f"ckpt_path={path} ") and words in errors, (kind, errors)
        assert "\n" not in errors, (kind, errors)


@pytest.mark.timeout(600)
def test_a_cut_off_weights_file_says_so(fitted_run: FittedRun, fast: list[str], tmp_path: Path) -> None:
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(fitted_run.checkpoint.read_bytes()[:4096])
    result = run_script(
        "train.py", [*fast, f"model.weights={cut}"], cwd=tmp_path, env={"HYDRA_FULL_ERROR": "0"}
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1 and f"model.weights={cut} is cut off or damaged" in output, output
    assert "Traceback" not in output


def test_eval_last_falls_back_to_the_newest_intact_checkpoint(
    fitted_run: FittedRun, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    runs = tmp_path / "outputs" / "train" / "runs" / "fitted"  # compose_config's paths.log_dir
    intact, damaged = (
        runs / "older" / "checkpoints" / "last.ckpt",
        runs / "newer" / "checkpoints" / "last.ckpt",
    )
    for path in (intact, damaged):
        path.parent.mkdir(parents=True)
    shutil.copy(fitted_run.checkpoint, intact)
    damaged.write_bytes(fitted_run.checkpoint.read_bytes()[:1000])  # the newest: cut off by a kill
    os.utime(intact, (1, 1))
    data = [a for a in fitted_run.overrides if a.startswith(("dataset", "dataset."))]
    code, _ = run_entry_point("eval", ["ckpt_path=last", *data], tmp_path, caplog)
    assert code == 0
    assert f"ckpt_path=last: skipped ckpt_path={damaged} is cut off or damaged" in caplog.text
    assert f"ckpt_path=last: using {intact}, the newest intact last.ckpt" in caplog.text


def test_weights_shared_as_safetensors_evaluate_as_the_checkpoint(
    fitted_run: FittedRun, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    shared = tmp_path / "shared.safetensors"
    code, _ = run_entry_point(
        "export",
        [f"ckpt_path={fitted_run.checkpoint}", "format=safetensors", f"output={shared}"],
        tmp_path,
        caplog,
    )
    assert code == 0 and shared.is_file()
    data = [a for a in fitted_run.overrides if a.startswith(("dataset", "dataset."))]
    results = []
    for source in (fitted_run.checkpoint, shared):
        entry = importlib.import_module("ssd_lightning.cli.eval")
        results.append(entry.evaluate(compose_config("eval", [f"ckpt_path={source}", *data], tmp_path / "e")))
    assert results[1].map_voc07 == pytest.approx(results[0].map_voc07, rel=1e-6)
    # export.py never writes over what it reads.
    code, errors = run_entry_point(
        "export", [f"ckpt_path={shared}", "format=safetensors", f"output={shared}"], tmp_path, caplog
    )
    assert code == 1 and "is the checkpoint being exported: choose another file" in errors
