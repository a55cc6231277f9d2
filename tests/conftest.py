"""Shared fixtures: the real coco128 data that lives beside the project (never inside it), and the rule for
missing test inputs: a failure in CI (`CI` set, as .ci/run does), a skip elsewhere that says what to do. Also
how the suite shares the machine: pytest-xdist's worker count, torch threads per worker, and a folder that
the workers share for fixtures built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings
from inputs import IN_CI, require

_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

# Under pytest-xdist each worker gets an equal share of the cores for torch's threads (also in the scripts it
# forks): OpenMP threads of two workers spinning on the same cores make both many times slower. Set before any
# test module imports torch (nothing imported above does).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, _CPUS // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Property tests draw the same examples on every CI run, so a CI failure reproduces and a green run stays
# green; elsewhere they explore new examples each run.
settings.register_profile("ci", derandomize=True)
if IN_CI:
    settings.load_profile("ci")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` (pyproject's addopts): half as many workers again as cores, because many tests wait (for a
    new interpreter's imports, a DDP rank, a notebook kernel) while holding no core.
    PYTEST_XDIST_AUTO_NUM_WORKERS still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return _CPUS + (_CPUS + 1) // 2


@pytest.fixture(scope="session")
def shared_tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this test run shared by all its pytest-xdist workers (the run's own folder without xdist):
    session fixtures that cost seconds are built there once, under a file lock (`filelock`)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _coco128_path() -> Path:
    env = os.environ.get("SSD_COCO128")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data" / "coco128"


@pytest.fixture(scope="session")
def coco128_root() -> Path:
    """Path of the coco128 folder (holding `coco/` and `voc/`)."""
    path = _coco128_path()
    require(
        (path / "coco").is_dir(),
        f"coco128 at {path}",
        "put the coco128 folder (COCO train2017's first 128 images, coco/ and voc/ layouts) there, "
        "or set SSD_COCO128 to where it is",
    )
    return path
