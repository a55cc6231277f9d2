"""An Optuna study that several sweep processes share (the workers of `hparams_search=...`): each claims the
next trials under a lock, the study ends with `n_trials` trials whoever ran them, and a trial whose worker
died is failed and asked again.

- Opening: two processes creating the same new SQLite study at once both fail in Optuna's schema creation
  (`table ... already exists`), so opening a SQLite study holds `<file>.lock`; a server database (any other
  SQLAlchemy URL) is retried a few times instead. Alembic's INFO lines about it are silenced.
- Claiming: under the same lock a worker fails the trials of dead workers (their `Owner` in the trial's
  system attributes: a process of this host that is gone) and enqueues them again (Optuna's
  RetryFailedTrialCallback), counts the trials (the interrupted ones excepted: their retry counts) and asks
  for at most the trials left. Without a lock (a server database) two workers may take the last place at
  once: the later trial by number is failed unrun as surplus and not counted.
- Seeds: each worker that joins a study gets its number (a study attribute), added to the sampler's seed:
  two workers never draw the same startup trials.
"""

from __future__ import annotations

import copy
import logging
import logging.config
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock
from optuna.trial import FrozenTrial, Trial, TrialState

from ssd_lightning.training.launch import Owner, may_be_training

log = logging.getLogger(__name__)

WORKER_ATTR = "ssd_worker"  # trial: the sweep process that asked for it (launch.Owner)
INTERRUPTED_ATTR = "ssd_interrupted"  # trial: its worker died while it ran; a retry replaces it
SURPLUS_ATTR = "ssd_surplus"  # trial: asked beyond n_trials by two workers at once, never run
WORKERS_ATTR = "ssd_workers"  # study: how many sweep processes have joined it
_SERVER_ATTEMPTS = 3
_SQLITE_TIMEOUT_S = 60  # a writer waits this long for another's transaction (SQLite's default is 5 s)


def sqlite_file(url: str | None) -> Path | None:
    """The database file of a `sqlite:///<path>` URL (relative to the working directory), else None."""
    if not url or not str(url).startswith("sqlite:///"):
        return None
    path = str(url)[len("sqlite:///") :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path).absolute()


@contextmanager
def study_lock(url: str | None) -> Iterator[None]:
    """Held while opening the study and claiming trials: a file lock beside a SQLite database (workers on one
    machine or one shared file system); nothing for a server database or the in-memory storage."""
    database = sqlite_file(url)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock"):
        yield


def _storage(url: str | None) -> Any:
    """Optuna's storage of `url` (None: in memory), its tables created on first use."""
    if url is None:
        return None
    from sqlalchemy.exc import SQLAlchemyError

    engine_kwargs = {"connect_args": {"timeout": _SQLITE_TIMEOUT_S}} if sqlite_file(url) else {}
    for attempt in range(1, _SERVER_ATTEMPTS + 1):
        try:
            return optuna.storages.RDBStorage(str(url), engine_kwargs=engine_kwargs)
        except SQLAlchemyError:  # another worker creating the schema of a server database at this moment
            if attempt == _SERVER_ATTEMPTS or sqlite_file(url):
                raise
            time.sleep(attempt)
    raise AssertionError("unreachable")


@contextmanager
def quiet_storage() -> Iterator[None]:
    """Opening a study keeps this process's logging as it is. Optuna runs alembic's env.py when it creates
    or checks a study's schema, and that calls `logging.config.fileConfig(alembic.ini)`: it would replace
    the process's handlers, disable its loggers and log every schema step at INFO (pages of lines)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    file_config = logging.config.fileConfig
    logging.config.fileConfig = lambda *args, **kwargs: None
    try:
        yield
    finally:
        logging.config.fileConfig = file_config


def open_study(
    url: str | None, name: str | None, directions: Sequence[str], pruner: Any = None
) -> tuple[optuna.Study, int]:
    """The study `name` in `url` (created, or loaded to continue it), and this worker's number in it
    (0 for the first process that opened it)."""
    with quiet_storage(), study_lock(url):
        study = optuna.create_study(
            study_name=name,
            storage=_storage(url),
            directions=list(directions),
            pruner=pruner,
            load_if_exists=True,
        )
        worker = int(study.system_attrs.get(WORKERS_ATTR, 0))
        study.set_system_attr(WORKERS_ATTR, worker + 1)
    return study, worker


def counts(trial: FrozenTrial) -> bool:
    """Whether a trial counts towards the study's n_trials (an interrupted one is replaced by its retry)."""
    return not trial.system_attrs.get(INTERRUPTED_ATTR) and not trial.system_attrs.get(SURPLUS_ATTR)


def trials_left(study: optuna.Study, n_trials: int) -> int:
    return n_trials - sum(counts(t) for t in study.get_trials(deepcopy=False))


def _worker(trial: FrozenTrial) -> Owner | None:
    recorded = trial.system_attrs.get(WORKER_ATTR)
    try:
        return Owner(**recorded) if recorded else None
    except TypeError:
        return None


def recover_interrupted(study: optuna.Study, me: Owner) -> list[int]:
    """Fail the running trials whose worker is gone and enqueue each again (same parameters); the numbers of
    the failed ones. A worker on another host (or SLURM job) is taken to be alive."""
    with warnings.catch_warnings():  # experimental in Optuna 2.x
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryFailedTrialCallback()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = _worker(trial)
        if worker is None or worker == me or may_be_training(worker, me):
            continue
        study._storage.set_trial_system_attr(trial._trial_id, INTERRUPTED_ATTR, True)
        study.tell(trial.number, state=TrialState.FAIL)
        # The retry copies the trial's system attributes: not ours (it runs, and counts, afresh).
        again = copy.deepcopy(trial)
        again.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith("ssd_")}
        retry(study, again)
        recovered.append(trial.number)
        log.warning(
            "Trial %d of study %s was interrupted (its sweep process, %s, is gone): recorded as failed "
            "and asked again with the same parameters",
            trial.number,
            study.study_name,
            worker,
        )
    return recovered


def _is_surplus(study: optuna.Study, trial: Trial, n_trials: int) -> bool:
    before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and counts(t)]
    return len(before) >= n_trials


def claim_trials(study: optuna.Study, url: str | None, n_trials: int, n_jobs: int, me: Owner) -> list[Trial]:
    """The next trials of this worker (at most `n_jobs`, none when the study has its `n_trials`)."""
    with study_lock(url):
        recover_interrupted(study, me)
        wanted = min(n_jobs, trials_left(study, n_trials))
        trials = []
        for _ in range(max(0, wanted)):
            trial = study.ask()  # a retry waiting in the queue first
            trial.set_system_attr(WORKER_ATTR, asdict(me))
            trials.append(trial)
    claimed = []
    for trial in trials:
        if _is_surplus(study, trial, n_trials):
            trial.set_system_attr(SURPLUS_ATTR, True)
            study.tell(trial, state=TrialState.FAIL)
        else:
            claimed.append(trial)
    return claimed
