"""Every private attribute of Ray and Optuna that fer-tune relies on, in one place.

fer-tune extends three classes from the inside (Ray's OptunaSearch and ASHAScheduler, Optuna's trials) and starts
Ray's daemons in a session of their own. Those hooks read attributes that are not public API, so a minor release
may rename them: the versions in pyproject.toml are bounded to the minor releases tested, and
tests/test_internals.py checks every name listed here against the installed Ray and Optuna, so that a renamed one
fails one clear test instead of a resume months later.
"""

from __future__ import annotations

from typing import Any

# OptunaSearch (ray.tune.search.optuna): its study, its {Tune trial id: optuna.Trial}, the storage it was given,
# the trials it has finished, and the sampler; StudySearch pickles itself without the first three
SEARCH_STUDY, SEARCH_TRIALS, SEARCH_STORAGE = "_ot_study", "_ot_trials", "_storage"
SEARCH_UNPICKLED = (SEARCH_STUDY, SEARCH_TRIALS, SEARCH_STORAGE)
SEARCH_ATTRS = (*SEARCH_UNPICKLED, "_completed_trials", "_sampler", "_study_name", "_space")
# Tuner (ray.tune): its local TunerInternal, whose RunConfig and TuneConfig (its scheduler) a restored Tuner cannot
# be given
TUNER_ATTRS = ("_local_tuner",)
TUNER_INTERNAL_ATTRS = ("_tune_config",)
# PopulationBasedTraining (ray.tune.schedulers): {Trial: its state}, each with the time it last reported at an interval
PBT_ATTRS = ("_trial_state",)
PBT_STATE_ATTRS = ("last_train_time",)
# ray.train._internal.storage: the function Tune's background syncer copies the driver's state to the storage with
STORAGE_UPLOAD = ("ray.train._internal.storage", "_upload_to_fs_path")
# ASHAScheduler (ray.tune.schedulers): its brackets, each with rungs [(milestone, {trial id: reward})]
ASHA_ATTRS = ("_brackets", "_metric", "_metric_op", "_time_attr")
BRACKET_ATTRS = ("_rungs",)
# Tune's snapshots of its experiment state: the manager that takes them every `_checkpoint_period` seconds, and in
# the "auto" mode (`_auto_checkpoint_enabled`) sets that period from the time each snapshot took
SNAPSHOT_MANAGER = ("ray.tune.execution.experiment_state", "_ExperimentCheckpointManager")
SNAPSHOT_ATTRS = ("_auto_checkpoint_enabled", "_checkpoint_period")
SNAPSHOT_UPDATE = "_update_auto_checkpoint_time"
SNAPSHOT_SYNC = "sync_up_experiment_state"  # (save_fn, force, wait): saves the state, then copies it to the storage
# TuneController (ray.tune.execution): `resume` restores its search algorithm (`_search_alg`), a SearchGenerator
# whose saved experiment (`_experiment`, its `spec["storage"]` the StorageContext new trials are made with) names
# the storage the run started in; the controller's own (`_storage`) is where the run is now
CONTROLLER = ("ray.tune.execution.tune_controller", "TuneController")
CONTROLLER_ATTRS = ("_search_alg", "_storage")
GENERATOR_EXPERIMENT = "_experiment"
# Ray's setting (read by its daemons from the environment, RAY_<name>) to start idle Python workers for the first
# driver that connects: one per CPU of the node (services.py passes --num_prestart_python_workers=num_cpus; 2 here,
# with 2 cores, for num_cpus 2 as for 16). Tune's trials are actors that start workers of their own, so these
# stay idle for the local Ray's life (about 1 CPU-second each to start, then 0.6 CPU-second a minute each, and their
# memory). A release that renamed it would start them again, nothing more.
PRESTART_ENV = "RAY_prestart_worker_first_driver"
# GridSampler (optuna.samplers): its grid points in the order it visits them, and the parameters' order in each;
# a trial visited grid point `grid_id` of `search_space` (its system attributes)
GRID_ATTRS = ("_all_grids", "_param_names", "_search_space")


def search_study(search: Any) -> Any:
    """The optuna.Study an OptunaSearch asks and tells (None before its study is set up)."""
    return search.__dict__.get(SEARCH_STUDY)


def search_trials(search: Any) -> dict:
    """{Tune trial id: optuna.Trial} of an OptunaSearch (the dict itself: adding to it hands a trial over)."""
    return search.__dict__.setdefault(SEARCH_TRIALS, {})


def search_finished(search: Any, trial_id: str) -> None:
    """Tell an OptunaSearch that a Tune trial is done with (it then ignores further results of it)."""
    search._completed_trials.add(trial_id)


def search_name_and_sampler(search: Any) -> tuple[str, Any]:
    return search._study_name, search._sampler


def trial_id(trial: Any) -> int:
    """The storage's id of an optuna.Trial or FrozenTrial (what storage calls take; not its number)."""
    return trial._trial_id


def study_storage(study: Any) -> Any:
    """The optuna.storages.BaseStorage of an optuna.Study."""
    return study._storage


def asha_brackets(scheduler: Any) -> list:
    """The brackets of an ASHAScheduler, in order."""
    return scheduler._brackets


def bracket_rungs(bracket: Any) -> list[tuple[Any, dict]]:
    """[(milestone, {trial id: reward})] of one ASHA bracket (the dicts themselves: adding to one records a result)."""
    return bracket._rungs


def asha_reading(scheduler: Any) -> tuple[str, str, float]:
    """(metric, time attribute, sign) of an ASHAScheduler: a rung records sign * metric at time >= milestone."""
    return scheduler._metric, scheduler._time_attr, scheduler._metric_op


def grid_point(sampler: Any, params: dict) -> dict:
    """The system attributes by which a GridSampler knows a trial with `params` visited its grid point ({} when
    they are no point of its grid)."""
    point = tuple(params.get(n) for n in sampler._param_names)
    if point not in sampler._all_grids:
        return {}
    return {"grid_id": sampler._all_grids.index(point), "search_space": sampler._search_space}


def snapshot_manager() -> Any:
    """The class whose instance times Tune's snapshots of its experiment state (see SNAPSHOT_MANAGER)."""
    import importlib

    module, name = SNAPSHOT_MANAGER
    return getattr(importlib.import_module(module), name)


def tune_controller() -> Any:
    """The class that runs a Tune experiment and resumes it (see CONTROLLER)."""
    import importlib

    module, name = CONTROLLER
    return getattr(importlib.import_module(module), name)


def reroot_search(controller: Any) -> bool:
    """After a resume: the experiment its search algorithm makes new trials from gets the controller's storage
    (where the run is now); False when the search algorithm keeps no experiment (a BasicVariantGenerator)."""
    search, storage = (getattr(controller, a) for a in CONTROLLER_ATTRS)
    experiment = getattr(search, GENERATOR_EXPERIMENT, None)
    if experiment is None or not isinstance(getattr(experiment, "spec", None), dict):
        return False
    experiment.storage = storage
    experiment.spec["storage"] = storage
    return True


def tuner_run_config(tuner: Any) -> Any:
    """The RunConfig a ray.tune.Tuner runs with (a restored one: the saved one), None under Ray Client."""
    local = getattr(tuner, "_local_tuner", None)
    return None if local is None else local.get_run_config()


def tuner_tune_config(tuner: Any) -> Any:
    """The TuneConfig a ray.tune.Tuner runs with (a restored one: the saved one), None under Ray Client."""
    local = getattr(tuner, TUNER_ATTRS[0], None)
    return None if local is None else getattr(local, TUNER_INTERNAL_ATTRS[0])


def pbt_train_time(scheduler: Any, trial: Any) -> float:
    """The time (time_attr) at which a PBT scheduler last saw `trial` report at a perturbation interval (after a
    clone: its donor's); what the scheduler gives every trial a fair share of by."""
    return getattr(getattr(scheduler, PBT_ATTRS[0])[trial], PBT_STATE_ATTRS[0])


def storage_upload() -> tuple[Any, str]:
    """(module, attribute name) of the function Tune copies a staged directory to its storage with (looked up by
    name at each copy, so the driver can wrap it: fer_tune.tune.runtime.layout.whole_state_uploads)."""
    import importlib

    module, name = STORAGE_UPLOAD
    return importlib.import_module(module), name


def ray_console_popen() -> tuple[Any, str] | None:
    """(module, attribute name) of the Popen class Ray starts its local daemons with, None where there is none."""
    try:
        from ray._private import services
    except ImportError:
        return None
    return (services, "ConsolePopen") if hasattr(services, "ConsolePopen") else None
