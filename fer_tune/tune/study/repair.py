"""`fer-tune repair`: a study's own Optuna database rebuilt from its trials' own results.

optuna.db can be cut off by a full disk or a kill mid-write, damaged on a network filesystem, or left behind
when a study is copied. What the sampler needs is also in Tune's files, which such damage does not touch: each
trial's parameters (its config in Tune's saved state, or params.json), its per-epoch results (result.json) and how
it ended (Tune's status, the last result). The rebuild takes the trials in the order the study made them and
decides each one's state and value as the study's searcher does (fer_tune.tune.study.searcher.StudySearch), so
`resume` and `extend` go on with the sampler's full history; the damaged file is kept aside. Tune's saved
searcher states name the Optuna trials by their storage ids: where the rebuild numbers a trial differently, they
are rewritten to match.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any

from ...common import FerTuneError
from ..runtime import internals as ri
from ..runtime.layout import experiment_trials, searcher_states
from ..runtime.lock import acquire
from ..runtime.storage import experiment_dir, read_bytes, write_bytes
from .database import database_damage, own_database
from .outputs import has_unfinished, study_results, write_trials_csv
from .record import OWN_DB, StudyRecord, optuna_lib, read_study, study_spec
from .spec import StudySpec
from .warmstart import enqueue, point_key

log = logging.getLogger(__name__)
FINISHED = ("TERMINATED", "ERROR")  # Tune's states of a trial that ended
TRIAL_IDS = "_ot_trial_ids"  # StudySearch's saved state: {ray trial id: Optuna storage trial id}


def repair(sdir: str | Path, *, force: bool = False) -> dict:
    """Rebuild the study's own optuna.db from its trials' results; what was done: {"trials", "states",
    "skipped", "problem" (what was wrong with the database, None: nothing), "aside" (its new name, None: it was
    missing), "renumbered" (searcher states rewritten), "unfinished" (the last run has trials to finish)}."""
    sdir = Path(sdir).resolve()
    record = read_study(sdir, check=False)
    db = own_database(sdir, record)
    if db is None:
        raise FerTuneError(
            f"{sdir}: the study keeps its Optuna trials in {record['storage'].split('://')[0]} storage, not in its "
            f"own {OWN_DB}; repair rebuilds only a study's own database (restore a server's from its backups)"
        )
    with acquire(sdir, what="the study"):  # never under a command that runs it
        problem = database_damage(db) if db.exists() else "missing"
        if problem is None and not force:
            raise FerTuneError(
                f"{db} is whole; repair rebuilds a damaged or lost database (pass --force to rebuild it anyway)"
            )
        spec = study_spec(sdir, record)
        trials, skipped, old_ids = rebuilt_trials(sdir, record, spec)
        part = db.with_name(f".{OWN_DB}.rebuilding")
        part.unlink(missing_ok=True)
        new_ids = _write_study(part, record["optuna_study"], spec, trials, record.get("warm_start"))
        aside = None
        if db.exists():
            aside = db.with_name(f"{OWN_DB}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            db.rename(aside)
            journal = db.with_name(OWN_DB + "-journal")
            if journal.exists():
                journal.rename(aside.with_name(aside.name + "-journal"))
        os.replace(part, db)
        renumbered = _renumber_searcher_states(sdir, record, new_ids) if new_ids != old_ids else 0
        write_trials_csv(sdir, record)
        last = record["runs"][-1]
        unfinished = has_unfinished(record, last, experiment_dir(sdir, record, last), errors=True)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {
        "trials": len(trials),
        "states": states,
        "skipped": skipped,
        "problem": problem,
        "aside": aside,
        "renumbered": renumbered,
        "unfinished": unfinished,
    }


def rebuilt_trials(sdir: Path, record: StudyRecord, spec: StudySpec) -> tuple[list[Any], list[str], dict[str, int]]:
    """(the study's trials as Optuna FrozenTrials, in the order the study made them; the Ray trial ids of trials
    whose config the space cannot express; {ray trial id: Optuna storage id} as Tune's saved searcher states
    knew them)."""
    results, _ = study_results(sdir, record)
    made, old_ids = [], {}
    for i, run in enumerate(record["runs"]):
        exp = experiment_dir(sdir, record, run)
        made += [(i, j, t) for j, t in enumerate(experiment_trials(exp, unsaved=True))]
        newest = searcher_states(exp)[-1:]  # every trial the run's searcher knew at Tune's last saved state
        for path in newest:
            old_ids.update(_saved_ids(path))
    # the study's order: as the searcher numbered them, then the trials it made after its last saved state
    made.sort(key=lambda m: (old_ids.get(m[2]["trial_id"], float("inf")), m[0], m[1]))
    # a grid study's trials name the grid point they visited, as its sampler numbers them
    grid = spec.make_sampler() if spec.sampler == "grid" else None
    trials, skipped = [], []
    warm = {point_key(p["params"]): p["from"] for p in (record.get("warm_start") or {}).get("points", [])}
    for i, _, t in made:
        frozen = _trial(t, results.get(t["trial_id"], []), spec, record["runs"][i]["dir"])
        if frozen is None:
            skipped.append(t["trial_id"])
            continue
        if i == 0 and point_key(frozen.params) in warm:  # a configuration the sweep ran first
            frozen.user_attrs["warm_start"] = warm.pop(point_key(frozen.params))
        if grid is not None:
            frozen.system_attrs.update(ri.grid_point(grid, frozen.params))
        trials.append(frozen)
    return trials, skipped, {k: v for k, v in old_ids.items() if k not in skipped}


def _saved_state(path: str) -> dict:
    """A searcher state Tune saved ({} when it is cut off, unreadable or from another release)."""
    try:
        state = pickle.loads(read_bytes(path) or b"")
    except Exception:
        return {}
    return state if isinstance(state, dict) else {}


def _saved_ids(path: str) -> dict[str, int]:
    ids = _saved_state(path).get(TRIAL_IDS, {})  # none: the trials keep the order Tune made them in
    return {str(k): int(v) for k, v in ids.items()} if isinstance(ids, dict) else {}


def _trial(made: dict, rows: list[dict], spec: StudySpec, run: str) -> Any:
    """One trial of the run named `run` as StudySearch would have told the study (None: its config is not one of
    the space's)."""
    optuna = optuna_lib()
    from optuna.trial import TrialState

    fixed = optuna.trial.FixedTrial(made["config"])
    try:
        spec.define_by_run()(fixed)
    except ValueError:  # a parameter the space suggests is not in the config
        return None
    metrics = spec.metrics if spec.multi else [spec.metric]
    first = metrics[0]
    pick = max if spec.mode == "max" else min
    scored = [r for r in rows if first in r and r.get("status") != "diverged"]
    by_epoch = {int(r["epoch"]): float(r[first]) for r in scored}
    objectives = {str(int(r["epoch"])): [_float(r.get(m)) for m in metrics] for r in scored}
    last = rows[-1] if rows else {}
    epochs = int(last.get("epoch", 0) or 0)
    diverged = last.get("status") == "diverged"
    status = made["status"]
    attrs: dict[str, Any] = {"ray_trial_id": made["trial_id"], "run": run}
    values = None
    if not (status in FINISHED or diverged or epochs >= spec.max_epochs):
        state = TrialState.RUNNING  # interrupted: a resume continues it
    elif status == "ERROR" or diverged or not by_epoch:
        state, attrs["status"] = TrialState.FAIL, "diverged" if diverged else "error"
    elif epochs < spec.max_epochs:  # stopped early by the scheduler; Optuna gives a pruned trial its last value
        state, attrs["status"] = TrialState.PRUNED, "pruned"
        values = None if spec.multi else [by_epoch[max(by_epoch)]]
    else:  # its best epoch's value(s)
        best = pick(by_epoch, key=by_epoch.get)
        values = objectives[str(best)] if spec.multi else [by_epoch[best]]
        state, attrs["status"] = TrialState.COMPLETE, "completed"
        if values is None or None in values:  # an objective the trial never reported
            state, values, attrs["status"] = TrialState.FAIL, None, "error"
    if spec.multi and objectives:
        if state.is_finished() and by_epoch:  # a finished trial keeps its best and last epochs' (_keep_two_epochs)
            keep = {str(pick(by_epoch, key=by_epoch.get)), str(max(by_epoch))}
            objectives = {e: v for e, v in objectives.items() if e in keep}
        attrs["objectives"] = objectives
    start = made["start_time"] or next((r["trial_start"] for r in rows if r.get("trial_start")), None)
    end = last.get("timestamp") or start
    started = _when(start) or datetime.datetime.now()
    return optuna.trial.FrozenTrial(
        number=0,  # numbered by the storage in the order added
        state=state,
        value=None,
        values=values,
        datetime_start=started,
        datetime_complete=(_when(end) or started) if state.is_finished() else None,
        params=fixed.params,
        distributions=fixed.distributions,
        user_attrs=attrs,
        system_attrs={},
        intermediate_values={} if spec.multi else by_epoch,
        trial_id=0,
    )


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _when(stamp: Any) -> datetime.datetime | None:
    return datetime.datetime.fromtimestamp(float(stamp)) if isinstance(stamp, (int, float)) and stamp > 0 else None


def _write_study(path: Path, name: str, spec: StudySpec, trials: list[Any], warm: dict | None) -> dict[str, int]:
    """A new sqlite database at `path` holding the study `name` with `trials`, and the warm start's points that
    no trial began yet queued again; {ray trial id: storage id}."""
    optuna = optuna_lib()
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    try:
        modes = spec.modes if spec.multi else [spec.mode]
        study = optuna.create_study(
            study_name=name, storage=storage, directions=["maximize" if m == "max" else "minimize" for m in modes]
        )
        study.add_trials(trials)
        ids = {t.user_attrs["ray_trial_id"]: ri.trial_id(t) for t in study.get_trials(deepcopy=False)}
        enqueue(study, warm)
        return ids
    finally:
        storage.engine.dispose()


def _renumber_searcher_states(sdir: Path, record: StudyRecord, ids: dict[str, int]) -> int:
    """Tune's saved searcher states, each naming the Optuna trials by their ids in the rebuilt database; how many
    were rewritten."""
    n = 0
    for run in record["runs"]:
        for path in searcher_states(experiment_dir(sdir, record, run)):
            state = _saved_state(path)
            old = state.get(TRIAL_IDS)
            if not isinstance(old, dict):
                continue
            new = {tid: ids[tid] for tid in old if tid in ids}
            if new == old:
                continue
            state[TRIAL_IDS] = new
            write_bytes(path, pickle.dumps(state))
            n += 1
    return n
