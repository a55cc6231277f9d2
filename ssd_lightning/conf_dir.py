"""Where the Hydra configs are: `conf/` of a source checkout, else the copy the wheel ships in the package.

The top-level `conf/` is the source; `pip install .` copies it to `ssd_lightning/conf/` (pyproject.toml), so
installed console scripts (`ssd-train`, ...) find the same configs from any folder.
"""

from __future__ import annotations

from pathlib import Path

HYDRA_VERSION_BASE = "1.3"


def config_dir() -> Path:
    """The folder holding train.yaml, eval.yaml, ... and the config groups."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "conf"
    if (checkout / "train.yaml").is_file() and (package.parent / "pyproject.toml").is_file():
        return checkout
    shipped = package / "conf"
    if not (shipped / "train.yaml").is_file():
        raise FileNotFoundError(
            f"no Hydra configs at {checkout} or {shipped}: reinstall ssd_lightning (pip install .)"
        )
    return shipped
