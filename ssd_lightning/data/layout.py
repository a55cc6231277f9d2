"""Where `dataset.root` must point for VOC and COCO, and what to suggest when it points one level off.

Pointing at the wrong folder level (VOCdevkit/VOC2007 instead of VOCdevkit, or coco/annotations
instead of coco) is the commonest first mistake; the error names the folder that would work.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .base import DatasetError, Problem

README_SECTION = "see README, section Data"


def _folders(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # missing or unreadable
        return []


def nearby_root(root: str | os.PathLike, is_root: Callable[[Path], bool]) -> Path | None:
    """A folder one or two levels above or below `root` that `is_root` accepts, or None."""
    root = Path(root).expanduser().absolute()
    above = [root.parent, root.parent.parent]
    below = _folders(root)
    below += [grandchild for child in below[:50] for grandchild in _folders(child)[:50]]
    return next((candidate for candidate in [*below, *above] if is_root(candidate)), None)


def root_error(
    name: str, root: str | os.PathLike, expected: str, is_root: Callable[[Path], bool], note: str = ""
) -> DatasetError:
    """The error for a `dataset.root` that does not hold `expected`, suggesting a folder that does."""
    root = Path(root)
    problem = f"holds no {expected}" if root.is_dir() else "dataset root does not exist or is not a folder"
    suggestion = nearby_root(root, is_root)
    if suggestion is not None:
        hint = f"Did you mean dataset.root={suggestion} ? That folder holds {expected}."
    else:
        note = f" ({note})" if note else ""
        hint = f"dataset.root must be the folder that holds {expected}{note}; {README_SECTION}."
    return DatasetError(name, [Problem(str(root), problem)], hint=hint)
