"""Hydra entry points: `train`, `eval`, `predict`, `export` (console scripts ssd-train, ...; root scripts
train.py, ...). Importing the package registers the config resolvers (`${ssd.*:...}`) that conf/ uses."""

import warnings

from hydra.core.plugins import Plugins

from hydra_plugins.ssd_lightning_sweeps.launchers import LocalLauncher, SlurmLauncher
from hydra_plugins.ssd_lightning_sweeps.sweepers import SharedStudySweeper
from ssd_lightning.cli.resolvers import register as _register_resolvers

_register_resolvers()
# Hydra finds plugins by listing the modules of the `hydra_plugins` namespace, which misses ours in an
# editable install (setuptools' import hook cannot list them): register them by hand.
for _plugin in (LocalLauncher, SlurmLauncher, SharedStudySweeper):
    Plugins.instance().register(_plugin)
# conf/hydra/launcher/submitit_{slurm,local}.yaml take the names of hydra-submitit-launcher's own configs (so
# that `hydra/launcher=submitit_slurm` is ours) and Hydra validates them against those configs' schemas, which
# it calls deprecated: they hold the schemas' keys only, so they compose the same once Hydra stops.
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/submitit_(slurm|local)' is validated against ConfigStore schema"
)
