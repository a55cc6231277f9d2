"""Hydra entry points: `train`, `eval`, `predict`, `export` (console scripts ssd-train, ...; root scripts
train.py, ...). Importing the package registers the config resolvers (`${ssd.*:...}`) that conf/ uses."""

import warnings

from ssd_lightning.cli.resolvers import register as _register_resolvers

_register_resolvers()
# conf/hydra/launcher/submitit_{slurm,local}.yaml take the names of hydra-submitit-launcher's own configs (so
# that `hydra/launcher=submitit_slurm` is ours) and Hydra validates them against those configs' schemas, which
# it calls deprecated: they hold the schemas' keys only, so they compose the same once Hydra stops.
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/submitit_(slurm|local)' is validated against ConfigStore schema"
)
