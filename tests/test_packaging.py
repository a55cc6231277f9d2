"""An installable package: the wheel carries the configs and the console scripts, which work from any
folder, and a user's own config folder adds to ours without copying them."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from setuptools import find_namespace_packages, find_packages
from wheel_install import PROJECT_ROOT, install_wheel, outside_env, run, site_packages


def test_pyproject_lists_every_code_package() -> None:
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"]) - {"ssd_lightning.conf"}
    ours = find_packages(str(PROJECT_ROOT), include=["ssd_lightning*"])
    plugins = find_namespace_packages(str(PROJECT_ROOT), include=["hydra_plugins.*"])  # Hydra's namespace
    assert listed == set(ours) | set(plugins)


@pytest.mark.timeout(900)
def test_the_wheel_runs_from_any_folder_with_its_own_configs(tmp_path: Path) -> None:
    venv = install_wheel(tmp_path)
    site = site_packages(venv)
    python = venv / "bin" / "python"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = outside_env()
    shown = run([str(venv / "bin" / "ssd-train"), "--cfg", "job"], elsewhere, env)
    assert "  name: compact\n" in shown and "  name: shapes\n" in shown
    # A user's config folder beside ours: a new experiment, using our groups.
    mine = elsewhere / "my_configs" / "experiment"
    mine.mkdir(parents=True)
    (mine / "tiny_ssd300.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: ssd300\nrun_name: tiny\n"
        "dataset:\n  global_batch_size: 4\n"
    )
    # The other console scripts: installed, their entry points import, their configs compose from the
    # package; then ssd-train's entry point with the user's folder. One interpreter for all of it: each
    # start costs seconds of torch and Lightning imports, and ssd-train's script has run above.
    check = (
        "import sys\n"
        "from importlib.metadata import entry_points\n"
        "from hydra import compose, initialize_config_dir\n"
        "from ssd_lightning.conf_dir import HYDRA_VERSION_BASE, config_dir\n"
        "print(config_dir())\n"
        "scripts = {e.name: e for e in entry_points(group='console_scripts') if e.name.startswith('ssd-')}\n"
        "for name, config in (('ssd-eval', 'eval'), ('ssd-predict', 'predict'), ('ssd-export', 'export')):\n"
        "    main = scripts[name].load()\n"
        "    with initialize_config_dir(config_dir=str(config_dir()), version_base=HYDRA_VERSION_BASE):\n"
        "        cfg = compose(config)\n"
        "    print(name, main.__module__, cfg.task_name, cfg._get_node('ckpt_path')._value())\n"
        "from hydra.core.plugins import Plugins\n"
        "print(sorted(n for n in Plugins.instance().class_name_to_class if 'ssd_lightning' in n))\n"
        "sys.argv = ['ssd-train', '--config-dir', 'my_configs', 'experiment=tiny_ssd300', '--cfg', 'job']\n"
        "scripts['ssd-train'].load()()\n"
    )
    for script in ("ssd-eval", "ssd-predict", "ssd-export"):
        assert (venv / "bin" / script).is_file()
    where, *shown = run([str(python), "-c", check], elsewhere, env).splitlines(keepends=True)
    assert Path(where.strip()) == site / "ssd_lightning" / "conf"  # the package's own copy, not the sources
    # eval and predict take ckpt_path= or model_path= (an exported file): neither is mandatory on its own
    assert shown[:3] == [
        "ssd-eval ssd_lightning.cli.eval eval None\n",
        "ssd-predict ssd_lightning.cli.predict predict None\n",
        "ssd-export ssd_lightning.cli.export export ???\n",
    ]
    # The sweeps' Hydra plugins (hydra/launcher=submitit_slurm, hparams_search=...), found in the wheel.
    classes = ("launchers.LocalLauncher", "launchers.SlurmLauncher", "sweepers.SharedStudySweeper")
    assert shown[3] == f"{[f'hydra_plugins.ssd_lightning_sweeps.{name}' for name in classes]}\n"
    user_job = "".join(shown[4:])
    assert "run_name: tiny\n" in user_job and "  name: ssd300\n" in user_job
    assert "  global_batch_size: 4\n" in user_job
