"""The study commands: sweep, resume and extend a study of Ray Tune trials driven by Optuna.

results/NAME/       (on the driver)
    study.json      what was launched: spec, data source, Optuna storage, Ray storage, runs, fingerprint
    space.yaml      a copy of the space file as launched
    optuna.db       the Optuna study (sqlite, unless --optuna-storage points elsewhere)
    tune/           Ray's experiment directory of the sweep (trial dirs, checkpoints, experiment state)
    extend-1/ ...   one Ray experiment per `fer-tune extend`
    trials.csv      one row per trial, rewritten at the end of every run
    ray.log         Ray's and Tune's own log messages (kept out of the terminal; see fer_tune.tune.runtime.session)
    .lock           who runs the study now (sweep, resume and extend hold it; see fer_tune.tune.runtime.lock)

With --storage URI|DIR (a cluster's shared storage) tune/ and extend-N/ live in URI/NAME/ instead; study.json
records it as `ray_storage` and fer_tune.tune.runtime.storage reads them from there.

Every trial runs fer_tune.train.fit through fer_tune.tune.study.trial.study_trial. Each command returns its exit
code; progress goes to the `fer_tune` logger (stderr), the results to trials.csv (the CLI prints the summary).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...common import FerTuneError
from ..mlflow.study import catch_up_study, track_study
from ..mlflow.tracking import check as check_tracking
from ..runtime import preflight
from ..runtime import storage as fs
from ..runtime.layout import experiment_trial_states, has_tune_state, restorable
from ..runtime.lock import acquire
from ..runtime.session import (
    ray_log_to,
    ray_session,
    restore_tuner,
    say_ray_log,
    set_output,
    set_pending_trials,
    trials_that_fit,
)
from ..runtime.stage import RunOptions, run_config, stopped, threads, trainable, weight
from ..runtime.storage import experiment_dir, experiment_dirs, study_storage
from .outputs import (
    has_unfinished,
    left_to_finish,
    study_progress,
    trials_table,
    unread_trials,
    write_trials_csv,
)
from .record import (
    STUDY_FILE,
    RunRecord,
    StudyRecord,
    load_optuna_study,
    new_record,
    new_run,
    new_session,
    read_study,
    reopen,
    spec_with,
    storage_ref,
    study_dir,
    write_study,
)
from .spaces import load_space
from .spec import StudySpec
from .trial import CRASH_ENV, study_trial

log = logging.getLogger(__name__)


def _run(
    sdir: Path, record: StudyRecord, spec: StudySpec, data: Any, run: RunRecord, *, restore: bool, output: str
) -> int:
    """One Ray experiment of the study (the sweep, an extend, or its restore) in the running Ray session."""
    from ray import tune

    from ..runtime.checkpoints import pruner
    from .footprint import FinishedCheckpoints
    from .searcher import FinishedInStudy, NumpyTBXLoggerCallback, StudySearch, make_scheduler
    from .warmstart import enqueue

    ray_log_to(sdir / "ray.log")
    res = spec.resources
    base = spec.base_config()
    base["threads"] = base["threads"] or threads(res)
    fn = trainable(
        study_trial,
        res,
        base=base,
        data={s: data.arrays(s) for s in ("train", "val")},
        weight=weight(res),
        crash=os.environ.get(CRASH_ENV, ""),
        renames=spec.renames(),
    )
    exp_dir = experiment_dir(sdir, record, run)
    max_conc = run.get("max_concurrent") or 0
    set_pending_trials(max_conc, res)
    if restore and restorable(exp_dir):
        tuner = restore_tuner(exp_dir, fn, record["fingerprint"]["versions"].get("fer_tune"))
    else:
        search = StudySearch(
            space=spec.define_by_run(),
            metric=spec.metrics if spec.multi else spec.metric,
            mode=spec.modes if spec.multi else spec.mode,
            sampler=spec.make_sampler(run["seed"]),
            storage_ref=record["storage"],
            study_name=record["optuna_study"],
            max_epochs=spec.max_epochs,
            run=run["dir"],
            num_samples=run["num_samples"],
            adopt=restore,  # a run whose driver died before Tune saved a state: it starts over
        )
        if run is record["runs"][0]:  # the sweep's run: the warm start's points first (none it enqueued before)
            enqueue(load_optuna_study(record), record.get("warm_start"))
        history = experiment_dirs(sdir, record)
        scheduler = make_scheduler(spec, history)
        callbacks = [NumpyTBXLoggerCallback(), pruner(latest=3, score=spec.metric, mode=spec.mode)]
        keep = record["spec"].get("keep_checkpoints", "all")  # a study of an earlier release keeps all
        if keep != "all":
            callbacks.append(
                FinishedCheckpoints(
                    keep=keep,
                    metric=spec.metric,
                    mode=spec.mode,
                    max_epochs=spec.max_epochs,
                    history_dirs=history,
                    multi=spec.multi,
                )
            )
        tuner = tune.Tuner(
            fn,
            tune_config=tune.TuneConfig(
                search_alg=search,
                scheduler=scheduler,
                num_samples=run["num_samples"],
                max_concurrent_trials=max_conc or None,
                reuse_actors=True,
            ),
            # Tune deletes no checkpoint: fer_tune.tune.runtime.checkpoints keeps each running trial's latest 3 and
            # its best, fer_tune.tune.study.footprint those of finished trials that matter
            run_config=run_config(
                run["dir"], study_storage(sdir, record), output, callbacks, stop=FinishedInStudy(record)
            ),
        )
    set_output(tuner, output, study_progress(record, spec, run), exp_dir)
    track_study(tuner, sdir, record, spec)
    session = new_session(left_to_finish(record, run, exp_dir) if restore else None)
    run.setdefault("sessions", []).append(session)
    write_study(sdir, record)  # a driver killed mid-run leaves its session without an end
    t0 = time.time()
    try:
        grid, interrupted = tuner.fit(), False
    except KeyboardInterrupt:
        grid, interrupted = None, True
    run["wall_seconds"] = run.get("wall_seconds", 0.0) + time.time() - t0
    states = experiment_trial_states(exp_dir)
    interrupted = interrupted or (
        grid is not None and left_to_finish(record, run, exp_dir, errors=False, states=states) > 0
    )
    session.update(
        ended=time.strftime("%Y-%m-%d %H:%M:%S"),
        wall_seconds=time.time() - t0,
        outcome="interrupted" if interrupted else "finished",
        trials_finished=sum(s in ("TERMINATED", "ERROR") for s in states.values()),
    )
    write_study(sdir, record)
    write_trials_csv(sdir, record)
    say_ray_log()
    return stopped("study", f"fer-tune resume {sdir}") if interrupted else 0


def _run_in_session(
    sdir: Path,
    record: StudyRecord,
    spec: StudySpec,
    data: Any,
    run: RunRecord,
    *,
    restore: bool,
    opts: RunOptions,
    fix: str = preflight.RESUME_FIX,
    before: Callable[[], None] | None = None,
) -> int:
    """Ray up, one trial checked to fit and the study's Ray storage to suit the cluster (else `fix` says which
    flags help), `before()` (what a new run writes once Ray has accepted it), then the run."""
    with ray_session(opts.address, num_cpus=opts.num_cpus, output=opts.output):
        preflight.check_run(study_storage(sdir, record), opts.address, spec.resources, fix)
        from .footprint import checkpoint_need

        at_once = min(run.get("max_concurrent") or spec.num_samples, trials_that_fit(spec.resources))
        need, detail = checkpoint_need(spec, record["spec"].get("keep_checkpoints", "all"), at_once)
        preflight.check_free_space([str(sdir), study_storage(sdir, record)], need, detail)
        if before is not None:
            before()
        return _run(sdir, record, spec, data, run, restore=restore, output=opts.output)


def sweep(
    space_path: str,
    opts: RunOptions,
    *,
    data_arg: str | None,
    name: str | None,
    results: str,
    storage: str | None,
    num_samples: int | None,
    max_concurrent: int | None,
    gpus: float | None,
    cpus: float | None,
    optuna_storage: str | None = None,
    space_label: str | None = None,
    warm_start: list[str] | None = None,
) -> int:
    """A new study. `storage`: Ray's storage for the experiment directories (a URI or shared path; the study
    gets a NAME folder there), default the study directory; `optuna_storage`: the Optuna DB URL or env:VAR;
    `space_label`: what study.json names as the space file when the space is no lasting file (the demo's);
    `opts.mlflow`: the MLflow tracking URI or env:VAR (fer_tune.tune.mlflow.tracking; resume and extend take it
    over the recorded one); `warm_start`: other studies whose best configurations run first ('DIR[:K]')."""
    spec = load_space(space_path)
    overrides: dict[str, Any] = {}
    if num_samples is not None:
        overrides["num_samples"] = num_samples
    if gpus is not None or cpus is not None:
        overrides["resources"] = {
            **spec.resources,
            **({"gpu": gpus} if gpus is not None else {}),
            **({"cpu": cpus} if cpus is not None else {}),
        }
    if overrides:
        spec = spec_with(spec.text, overrides, f"{space_path} (with command-line overrides)", spec.name)
    if max_concurrent is not None and max_concurrent < 1:
        raise FerTuneError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    sdir = study_dir(results, name, spec.name, space_path)
    with acquire(sdir, what="the study", force=None, create=True):
        if (sdir / STUDY_FILE).exists():
            raise FerTuneError(
                f"{sdir} already holds a study; continue it with `fer-tune resume {sdir}`, add "
                f"trials with `fer-tune extend {sdir} --num-samples N`, or choose another --name"
            )
        return _sweep(
            spec,
            space_path,
            sdir,
            opts,
            data_arg=data_arg,
            overrides=overrides,
            storage=storage,
            max_concurrent=max_concurrent,
            optuna_storage=optuna_storage,
            space_label=space_label,
            warm_start=warm_start or [],
        )


def _sweep(
    spec: StudySpec,
    space_path: str,
    sdir: Path,
    opts: RunOptions,
    *,
    data_arg: str | None,
    overrides: dict,
    storage: str | None,
    max_concurrent: int | None,
    optuna_storage: str | None,
    space_label: str | None,
    warm_start: list[str],
) -> int:
    from ...data import is_synthetic
    from .warmstart import describe, plan

    ray_storage = fs.join(fs.normalize(storage), sdir.name) if storage else None
    if ray_storage and fs.exists(fs.join(ray_storage, "tune")):
        raise FerTuneError(
            f"the Ray storage {ray_storage} already holds a study's experiments; choose another --name or --storage"
        )
    optuna_ref = storage_ref(optuna_storage, sdir)
    source = data_arg or spec.data.get("path") or "synthetic"
    if spec.data.get("required") and is_synthetic(source):
        raise FerTuneError(
            f"{space_path} is a study of real faces: pass --data PATH (FER2013's fer2013.csv or its "
            "Kaggle image folders)" + (", not synthetic data" if data_arg else "")
        )
    protocol = spec.data.get("protocol", "paper")
    mlflow_ref = check_tracking(opts.mlflow, sdir.name)
    warm = plan(spec, warm_start)  # the other studies read before any data is loaded
    data = opts.loader(source, protocol)
    record = new_record(
        sdir, spec, space_path, overrides, source, protocol, data, optuna_ref, ray_storage, max_concurrent, space_label
    )
    record["mlflow"] = mlflow_ref
    record["warm_start"] = warm

    def write() -> None:  # once Ray has accepted the trials: a refused study leaves nothing behind
        sdir.mkdir(parents=True, exist_ok=True)
        (sdir / "space.yaml").write_text(spec.text)
        write_study(sdir, record)
        log.info(
            "study %s: %d trials of at most %d epochs, sampler %s, early stopping %s, %s CPU / %s GPU per "
            "trial, data %s (%s); results in %s%s",
            sdir.name,
            spec.num_samples,
            spec.max_epochs,
            spec.sampler,
            spec.early_stopping["type"],
            spec.resources["cpu"],
            spec.resources["gpu"],
            source,
            protocol,
            sdir,
            f", Ray storage {ray_storage}" if ray_storage else "",
        )
        if describe(warm):
            log.info("%s", describe(warm))

    run = record["runs"][0]
    return _run_in_session(
        sdir, record, spec, data, run, restore=False, opts=opts, fix=preflight.SWEEP_FIX, before=write
    )


@contextmanager
def _reopened(sdir: Path, opts: RunOptions) -> Iterator[tuple[StudyRecord, StudySpec, Any]]:
    """A study to continue (resume, extend), held by this driver: its record (with the MLflow tracking URI to use
    now), its spec and its data, checked against its fingerprint."""
    read_study(sdir)  # a study directory, before a lock is made in it
    with acquire(sdir, what="the study", force=opts.force):
        record, spec, data = reopen(sdir, opts.force, opts.loader)
        record["mlflow"] = check_tracking(opts.mlflow, record["name"], record.get("mlflow"))
        yield record, spec, data


def resume(sdir: str, opts: RunOptions) -> int:
    """Continue the study's last run where it stopped (0 with a note when it had finished)."""
    sdir_p = Path(sdir).resolve()
    with _reopened(sdir_p, opts) as (record, spec, data):
        run = record["runs"][-1]
        exp = experiment_dir(sdir_p, record, run)
        if not has_unfinished(record, run, exp, errors=True):
            write_study(sdir_p, record)
            rows = trials_table(sdir_p, record)
            if unread := unread_trials(rows):  # a copy without tune/: trials.csv keeps the values it came with
                where = " and ".join(experiment_dirs(sdir_p, record))
                log.warning(
                    "fer-tune: warning: %d finished trial(s) have no results in %s: trials.csv is left as it is",
                    unread,
                    where,
                )
            else:
                write_trials_csv(sdir_p, record, rows)
            catch_up_study(sdir_p, record, spec)
            log.info(
                "%s: the study is complete; nothing to resume (add trials with fer-tune extend %s --num-samples N)",
                sdir_p,
                sdir_p,
            )
            return 0
        over = "" if has_tune_state(exp) else " (Tune saved no state before it stopped: the run starts over)"
        log.info("resuming study %s (%s) in %s%s", record["name"], run["dir"], sdir_p, over)
        return _run_in_session(sdir_p, record, spec, data, run, restore=True, opts=opts)


def extend(sdir: str, opts: RunOptions, *, num_samples: int) -> int:
    """A new run of `num_samples` trials in a finished study; the sampler sees every earlier trial."""
    sdir_p = Path(sdir).resolve()
    if num_samples < 1:
        raise FerTuneError(f"--num-samples must be >= 1, got {num_samples}")
    with _reopened(sdir_p, opts) as (record, spec, data):
        last = record["runs"][-1]
        last_exp = experiment_dir(sdir_p, record, last)
        if has_unfinished(record, last, last_exp):
            raise FerTuneError(f"{sdir_p}: the last run ({last['dir']}) is unfinished; fer-tune resume {sdir_p} first")
        if spec.sampler == "grid":
            done = len(load_optuna_study(record).trials)
            left = spec.grid_size() - done
            if num_samples > left:
                raise FerTuneError(
                    f"the grid has {spec.grid_size()} points and {done} were tried; extend by at most {left}"
                )
        k = len(record["runs"])
        run = new_run(f"extend-{k}", num_samples, spec.seed + 1000 * k, last.get("max_concurrent"))

        def write() -> None:
            record["runs"].append(run)
            write_study(sdir_p, record)
            log.info(
                "extending study %s by %d trials (%s); the sampler sees all earlier trials",
                record["name"],
                num_samples,
                run["dir"],
            )

        return _run_in_session(sdir_p, record, spec, data, run, restore=False, opts=opts, before=write)
