"""Script runs for the tests: `python <script> <args>` (or `python -m <module>`) forked from a server that has
the entry points imported, instead of a new interpreter that pays seconds of torch/Lightning imports."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# The entry points, imported once into a fork server (a process that never ran a tensor operation, so forking
# it is safe): each script run forks from it instead of paying ~6 s of torch/Lightning/torchmetrics imports
# in a new interpreter.
_PRELOADED = [f"ssd_lightning.cli.{name}" for name in ("train", "eval", "predict", "export", "check")]
_PRELOADED.append("torch.onnx")
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
    script: str, args: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str, module: bool
) -> None:
    """In the forked child: `python <script> <args>` (`python -m <script> <args>` for a module) as the
    interpreter would run it, output to the two files."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # What a new interpreter would put on sys.path from PYTHONPATH (the server started without it).
    sys.path[:0] = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [script, *args]
    code = 0
    try:
        if module:
            runpy.run_module(script, run_name="__main__", alter_sys=True)
        else:
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


class ScriptProcess:
    """A script run forked from the server, running: what the tests use of `subprocess.Popen` (poll, signals,
    wait) and the output so far. Close it (or use `with`) to remove its output files."""

    def __init__(
        self, script: str, args: Sequence[str], cwd: Path, env: dict[str, str] | None, module: bool
    ) -> None:
        target = script if module else str(PROJECT_ROOT / script)  # what runpy runs in the child
        self.command = [sys.executable, *(["-m"] if module else []), target, *args]
        self._folder = Path(tempfile.mkdtemp(prefix="script-run-"))
        self._stdout, self._stderr = self._folder / "stdout", self._folder / "stderr"
        outputs = (str(self._stdout), str(self._stderr))
        self._process = _SERVER.Process(
            target=_run_forked, args=(target, list(args), str(cwd), _script_env(env), *outputs, module)
        )
        # The server, started by the first run, never sees a GPU.
        with mock.patch.dict(os.environ, {"CUDA_VISIBLE_DEVICES": ""}):
            self._process.start()

    def poll(self) -> int | None:
        """The exit status (minus the signal that ended it, as Popen's), None while it runs."""
        return self._process.exitcode

    def send_signal(self, signal_number: int) -> None:
        if self._process.exitcode is None:
            os.kill(self._process.pid, signal_number)

    def kill(self) -> None:
        if self._process.exitcode is None:
            self._process.kill()

    def wait(self, timeout: float) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            self.kill()
            self._process.join()
            raise subprocess.TimeoutExpired(self.command, timeout, self.stdout(), self.stderr())
        return self._process.exitcode

    def stdout(self) -> str:
        return self._stdout.read_text() if self._stdout.exists() else ""

    def stderr(self) -> str:
        return self._stderr.read_text() if self._stderr.exists() else ""

    def close(self) -> None:
        self.kill()
        self._process.join()
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> ScriptProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_script(
    script: str, args: Sequence[str], cwd: Path, env: dict[str, str] | None = None
) -> ScriptProcess:
    """`python <script> <args>` started as `run_script` runs it, left running: for tests that signal it."""
    return ScriptProcess(script, args, cwd, env, module=False)


def run_script(
    script: str,
    args: Sequence[str],
    cwd: Path,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python <script> <args>` from the project root, offline and CPU-only: its exit status and output.

    Forked from a server that has the entry points imported; processes that the script starts (DDP's other
    ranks, ddp_spawn's workers) are new interpreters, as they are for a user. The installed console scripts'
    tests start their own interpreters."""
    return _run(ScriptProcess(script, args, cwd, env, module=False), timeout)


def run_module(
    module: str, args: Sequence[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m <module> <args>`, as `run_script` runs a script."""
    return _run(ScriptProcess(module, args, cwd, env, module=True), timeout)


def _run(process: ScriptProcess, timeout: float) -> subprocess.CompletedProcess:
    with process:
        code = process.wait(timeout)
        return subprocess.CompletedProcess(process.command, code, process.stdout(), process.stderr())
