"""Hydra entry points: `train`, `eval`, `predict`, `export` (console scripts ssd-train, ...; root scripts
train.py, ...). Importing the package registers the config resolvers (`${ssd.*:...}`) that conf/ uses."""

from ssd_lightning.cli.resolvers import register as _register_resolvers

_register_resolvers()
