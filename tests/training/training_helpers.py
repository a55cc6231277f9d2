"""Functions shared by the training tests: composing the real conf/ tree and running the scripts."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir

CONF_DIR = str(config_dir())

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def compose_config(config_name: str, overrides: Sequence[str], output_dir: Path | None = None) -> DictConfig:
    """`conf/<config_name>.yaml` with `overrides`, as `@hydra.main` would see it, writing to `output_dir`."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=HYDRA_VERSION_BASE):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # `${hydra:...}` interpolations resolve against it
    with open_dict(cfg):
        del cfg.hydra
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir.parent / "outputs")
    return cfg


# The entry points, imported once into a fork server (a process that never ran a tensor operation, so forking
# it is safe): each script run forks from it instead of paying ~6 s of torch/Lightning/torchmetrics imports
# in a new interpreter.
_PRELOADED = [f"ssd_lightning.cli.{name}" for name in ("train", "eval", "predict", "export")] + ["torch.onnx"]
_SERVER = multiprocessing.get_context("forkserver")
_SERVER.set_forkserver_preload(_PRELOADED)


def _script_env(env: dict[str, str] | None) -> dict[str, str]:
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "CUDA_VISIBLE_DEVICES": "",
        "HYDRA_FULL_ERROR": "1",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }


def _run_forked(
    script: str, args: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str
) -> None:
    """In the forked child: the script as `python <script> <args>` would run it, output to the two files."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [script, *args]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as end:
        if isinstance(end.code, int) or end.code is None:
            code = end.code or 0
        else:  # sys.exit("message"), as the interpreter prints it
            print(end.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what the interpreter would run at exit (log handlers flush, W&B closes)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_script(
    script: str,
    args: Sequence[str],
    cwd: Path,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python <script> <args>` from the project root, offline and CPU-only: its exit status and output.

    Forked from a server that has the entry points imported; processes that the script starts (DDP's other
    ranks, ddp_spawn's workers) are new interpreters, as they are for a user. Tests of signals and of the
    installed console scripts start their own interpreters."""
    command = [sys.executable, str(PROJECT_ROOT / script), *args]
    full_env = _script_env(env)
    with tempfile.TemporaryDirectory() as folder:
        stdout, stderr = Path(folder) / "stdout", Path(folder) / "stderr"
        process = _SERVER.Process(
            target=_run_forked, args=(command[1], command[2:], str(cwd), full_env, str(stdout), str(stderr))
        )
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the server, started by the first run, never sees a GPU
        try:
            process.start()
        finally:
            if saved is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout, stdout.read_text(), stderr.read_text())
        return subprocess.CompletedProcess(command, process.exitcode, stdout.read_text(), stderr.read_text())


def check_ok(result: subprocess.CompletedProcess) -> str:
    """stdout of a script run that must have succeeded (its output is shown when it did not)."""
    output = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, f"exit {result.returncode}\n{output}"
    return result.stdout


@dataclass(frozen=True)
class FittedRun:
    """A real `python train.py` run (subprocess, default run folder under `cwd`) that fitted the compact
    model to the tiny shapes training images, validating on those same images: a real mAP to compare."""

    cwd: Path
    folder: Path
    stdout: str
    metrics: dict[str, float]
    overrides: tuple[str, ...]

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoints" / "last.ckpt"


FITTED_EPOCHS = 30


# The built-in dataset at a tiny size (generated once per session, away from the user's cache).
TINY_SHAPES = [
    "dataset.shapes.num_train=24",
    "dataset.shapes.num_val=8",
    "dataset.shapes.num_test=8",
    "dataset.shapes.min_side=96",
    "dataset.shapes.max_side=160",
]


def ensure_tiny_shapes(root: Path) -> None:
    """The tiny shapes data of TINY_SHAPES in `root` (generated once, then found in place)."""
    from ssd_lightning.data.shapes import ensure_shapes_dataset

    settings = {option.split("=")[0].split(".")[-1]: int(option.split("=")[1]) for option in TINY_SHAPES}
    ensure_shapes_dataset(root, **settings)


def shapes_as_voc(root: Path) -> list[str]:
    """The tiny shapes data read through dataset=voc, so that validation can use the training images; a short
    run counted in epochs (schedule=quick), as on any small custom dataset."""
    from ssd_lightning.data.shapes import SHAPE_CLASSES

    return [
        "dataset=voc",
        "schedule=quick",
        f"dataset.root={root}",
        f"dataset.classes=[{','.join(SHAPE_CLASSES)}]",
        "dataset.train_sets=[[shapes,train]]",
        "dataset.val_sets=[[shapes,train]]",
        "dataset.test_sets=[[shapes,test]]",
        "dataset.num_workers=0",
    ]
