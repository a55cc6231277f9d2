"""Sweeps beyond one process: jobs on SLURM or local processes (submitit), an Optuna study that several sweep
processes share, pruning on intermediate validation values, and the sweep's report.

Hydra instantiates launchers and sweepers only from the `hydra_plugins` namespace: the thin plugin classes
are in hydra_plugins/ssd_lightning_sweeps/, the work is here. Nothing here is imported at package import.
"""

import logging

# Alembic (under Optuna's database storage) logs each of its plugins at INFO when it is imported: pages of
# lines in a sweep's log. Its own schema steps are quieted where a study is opened (sweeps.study).
logging.getLogger("alembic").setLevel(logging.WARNING)
