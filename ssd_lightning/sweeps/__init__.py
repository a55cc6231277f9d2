"""Sweeps beyond one process: jobs on SLURM or local processes (submitit), an Optuna study that several sweep
processes share, pruning on intermediate validation values, and the sweep's report.

Hydra instantiates launchers and sweepers only from the `hydra_plugins` namespace: the thin plugin classes
are in hydra_plugins/ssd_lightning_sweeps/, the work is here. Nothing here is imported at package import.
"""
