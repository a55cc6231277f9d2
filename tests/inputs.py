"""Missing test inputs (data beside the project, optional packages): a failure in CI (`CI` set, as .ci/run
does), a skip elsewhere whose reason says what to do."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

IN_CI = bool(os.environ.get("CI"))


def require(present: bool, what: str, how: str) -> None:
    """Fail (in CI) or skip (elsewhere) unless `present`; the message names `what` is missing and `how` to
    get it."""
    if present:
        return
    message = f"{what} is missing: {how}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_module(name: str) -> ModuleType:
    """`import name`, under the rule of `require` (the dev extras install every test dependency)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        require(False, f"the Python package {name}", 'pip install -e ".[dev]"')
        raise  # not reached: require fails or skips
