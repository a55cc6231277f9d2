"""ssd_lightning's Hydra plugins: the submitit launchers and the shared-study Optuna sweeper of conf/hydra/.

Hydra imports every module of the `hydra_plugins` namespace at start-up, so these modules import nothing
heavy: the work is in ssd_lightning.sweeps, imported when a sweep uses them.
"""
