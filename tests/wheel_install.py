"""The package as a user installs it: a wheel built from a copy of the sources, installed into a fresh venv
whose dependencies come from this environment (offline)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns("__pycache__", "*.egg-info")


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def install_wheel(tmp_path: Path) -> Path:
    """A venv under `tmp_path` with the package installed from its wheel only (not editable); returns it."""
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    for folder in ("conf", "ssd_lightning", "hydra_plugins"):
        shutil.copytree(PROJECT_ROOT / folder, source / folder, ignore=IGNORED)
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / file, source / file)
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)]
    run([*build, "."], source)
    (wheel,) = dist.glob("ssd_lightning-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    # A path line in a .pth file does not run the editable install's own .pth hook: the package itself
    # comes from the wheel only.
    (site_packages(venv) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path)
    return venv


def site_packages(venv: Path) -> Path:
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    site.mkdir(parents=True, exist_ok=True)
    return site


def outside_env() -> dict[str, str]:
    """This process's environment without its PYTHONPATH (which points into the sources)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
