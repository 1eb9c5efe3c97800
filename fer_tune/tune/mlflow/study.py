"""A study's trials as MLflow runs, one per Optuna trial (fer_tune.tune.mlflow.tracking: how they are kept up to date).

- params: the TrainConfig the trial trains with; metrics: its epochs (step = epoch), TRIAL_METRICS and
  val_recall_<emotion>; tags: stage=study, study, study_created, optuna_trial (its number), ray_trial_id, outcome
  (completed, pruned, diverged, error, interrupted); the status follows the Optuna study: FINISHED (completed,
  pruned), FAILED (failed, diverged), KILLED (left unfinished by a stopped command), RUNNING while it trains.

A run is found by its tags stage=study, study_created (the study's creation time in study.json: two studies of one
name share the experiment, not their runs) and optuna_trial (the trial's number, which a trial keeps through
resumes, retries and Tune's hand-over of a trial it forgot), so every command of a study logs into the same runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ... import __version__
from ...cost import COST_METRICS
from ..study.outputs import study_results
from ..study.record import StudyRecord, resolve_storage
from ..study.spec import StudySpec
from .tracking import TERMINAL, Mlflow, Run, Tracking, attach, numeric

log = logging.getLogger(__name__)

TRIAL_METRICS = (
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "best_val_acc",
    "lr",
    "epoch_seconds",
    "device_seconds",
    *COST_METRICS,
)


def ms(when: Any) -> int | None:
    """A datetime (Optuna's trial times) in milliseconds since the epoch, as MLflow counts time."""
    return int(when.timestamp() * 1000) if when is not None else None


def trial_points(row: dict) -> list[tuple[str, float, int]]:
    """A trial's epoch (a Tune result, or a row of the study's results) as MLflow points, step = epoch; none for a
    diverged epoch (its loss is no number; the run ends FAILED)."""
    if "epoch" not in row or row.get("status") == "diverged":
        return []
    step = int(row["epoch"])
    return [
        (k, float(v), step)
        for k, v in row.items()
        if (k in TRIAL_METRICS or k.startswith("val_recall_")) and numeric(v)
    ]


def run_status(trial: Any, end: bool) -> str | None:
    """The MLflow status of an Optuna trial's run; for an unfinished trial KILLED once the command's run is over
    (`end`), else None (the run goes on)."""
    state = trial.state.name
    if state in ("COMPLETE", "PRUNED"):
        return "FINISHED"
    if state == "FAIL":
        return "FAILED"
    return "KILLED" if end else None


class StudyTracking(Tracking):
    """Tune callback (in the driver): the study's trials as MLflow runs, live, and caught up with the study's files
    and its Optuna storage when the run starts, when MLflow is back after an outage and when the run ends."""

    def __init__(self, sdir: Path, record: StudyRecord, spec: StudySpec):
        super().__init__(sdir, record, spec)
        self._sdir, self._spec = sdir, spec
        self._record = {k: record.get(k) for k in ("name", "created", "optuna_study", "storage", "ray_storage", "runs")}
        self.ml = Mlflow(record["mlflow"], record["name"])
        self._runs: dict[int, Run] = {}  # by Optuna trial number
        self._by_tid: dict[str, Run] = {}
        self._numbers: dict[str, int] = {}
        self._live: set[str] = set()
        self._indexed = False
        self._behind = 0
        self._db: Any = None
        self._study_id = 0

    # ------------------------------------------------------------------ Tune's events
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.guard(self._trial_started, trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.guard(self._result, trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.guard(self._trial_ended, trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.guard(self._trial_ended, trial.trial_id)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._live.clear()
        self.guard(self.sync, True)
        if self._behind and not self._broken:
            log.warning(
                "fer-tune: MLflow at %s is behind the study by %d trial run(s); `fer-tune resume %s` sends them "
                "once it answers",
                self.ml.ref,
                self._behind,
                self._sdir,
            )

    def catch_up(self) -> None:
        """Outside a run (a complete study): MLflow brought up to the study."""
        self.setup()
        self.on_experiment_end(trials=[])

    # ------------------------------------------------------------------ the work
    def _start(self) -> None:
        if self.connect(self.ml):
            self.sync(False)

    def _trial_started(self, tid: str) -> None:
        self._live.add(tid)
        run = self._run_of(tid)
        if run is not None:
            self.ml.set_status(run, "RUNNING", tags={"ray_trial_id": tid})
        self._catch_up()

    def _result(self, tid: str, result: dict) -> None:
        run = self._run_of(tid)
        if run is not None:
            self.ml.log(run, trial_points(result))
        self._catch_up()

    def _trial_ended(self, tid: str) -> None:
        self._live.discard(tid)
        run = self._run_of(tid)
        if run is not None:
            self._settle(run, self._trial(self._numbers[tid]), end=False)

    def _catch_up(self) -> None:
        if self.ml.came_back:
            self.ml.came_back = False
            self.sync(False)

    def sync(self, end: bool) -> None:
        """MLflow brought up to the study's files: every trial with results gets its run, all its epochs and, once
        it finished, its final status; `end` (the command's run is over): an unfinished trial's run is KILLED. A run
        already ended (FINISHED, FAILED, KILLED) holds everything and is left alone."""
        if self.ml.client is None:
            return
        if not self._indexed:
            self._index()
        results, _ = study_results(self._sdir, self._record)
        behind = caught = 0
        for t in self._storage().get_all_trials(self._study_id, deepcopy=False):
            tid = t.user_attrs.get("ray_trial_id")
            if tid:
                self._numbers[tid] = t.number
            run = self._runs.get(t.number)
            rows = results.get(tid, []) if tid else []
            if (run is None and not rows) or (run is not None and run.status in TERMINAL):
                continue
            writes = self.ml.writes
            run = self._open(t, tid)  # made, or known and its params sent if they had not gone through
            if run is None or not self.ml.log(run, [p for row in rows for p in trial_points(row)]):
                behind += 1
                continue
            if not self._settle(run, t, end=end and tid not in self._live):
                behind += 1
            caught += tid not in self._live and self.ml.writes > writes
        self._behind = behind
        if caught and not end:
            log.info("MLflow: %d trial run(s) brought up to the study", caught)

    def _index(self) -> None:
        runs = self.ml.find_runs(stage="study", study_created=str(self._record["created"]))
        for r in runs or []:
            number = r.data.tags.get("optuna_trial", "")
            if number.isdigit():
                self._runs.setdefault(int(number), self.ml.known(r))
        self._indexed = runs is not None

    def _storage(self) -> Any:
        if self._db is None:
            self._db = resolve_storage(self._record["storage"])
            self._study_id = self._db.get_study_id_from_name(self._record["optuna_study"])
        return self._db

    def _trial(self, number: int) -> Any:
        """The Optuna trial of this number, read now."""
        db = self._storage()
        return db.get_trial(db.get_trial_id_from_study_id_trial_number(self._study_id, number))

    def _run_of(self, tid: str) -> Run | None:
        """The run of the Optuna trial a Tune trial runs (found or made; None when MLflow is away)."""
        if tid in self._by_tid:
            return self._by_tid[tid]
        if tid not in self._numbers:
            for t in self._storage().get_all_trials(self._study_id, deepcopy=False):
                if t.user_attrs.get("ray_trial_id"):
                    self._numbers[t.user_attrs["ray_trial_id"]] = t.number
        if tid not in self._numbers:
            return None
        run = self._open(self._trial(self._numbers[tid]), tid)
        if run is not None:
            self._by_tid[tid] = run
        return run

    def _open(self, t: Any, tid: str | None) -> Run | None:
        run = self._runs.get(t.number)
        if run is None:  # looked up before it is made: a run made by a request whose answer was lost is found
            found = self.ml.find_runs(
                stage="study", study_created=str(self._record["created"]), optuna_trial=str(t.number)
            )
            if found is None:
                return None
            tags = {
                "stage": "study",
                "study": self._record["name"],
                "study_created": str(self._record["created"]),
                "optuna_trial": str(t.number),
                "ray_trial_id": tid or "",
                "fer_tune": __version__,
            }
            run = (
                self.ml.known(found[0])
                if found
                else self.ml.create_run(f"trial {t.number}", tags, ms(t.datetime_start))
            )
            if run is None:
                return None
            self._runs[t.number] = run
        if not run.has_params and not self.ml.log_params(run, self._params(t)):
            return None  # away before its params went through: they go at the next catch-up
        return run

    def _params(self, t: Any) -> dict:
        """The TrainConfig the trial trains with: its sampled parameters, the constants the space adds to them, the
        space's fixed settings and the defaults."""
        import optuna

        params = dict(t.params)
        try:
            params.update(self._spec.define_by_run()(optuna.trial.FixedTrial(t.params)) or {})
            return self._spec.trial_config(params).to_dict()
        except Exception:  # noqa: BLE001 - a space that changed under --force: the sampled parameters alone
            return params

    def _settle(self, run: Run, t: Any, *, end: bool) -> bool:
        """The run's status from its Optuna trial (with the trial's outcome); False when MLflow is away."""
        status = run_status(t, end)
        if status is None or status == run.status:
            return True
        if status == "KILLED":
            return self.ml.set_status(run, status, tags={"outcome": "interrupted"})
        outcome = t.user_attrs.get("status") or t.state.name.lower()
        return self.ml.set_status(run, status, end_ms=ms(t.datetime_complete), tags={"outcome": outcome})


def study_tracking(sdir: Path, record: StudyRecord, spec: StudySpec) -> StudyTracking | None:
    return StudyTracking(sdir, record, spec) if record.get("mlflow") else None


def track_study(tuner: Any, sdir: Path, record: StudyRecord, spec: StudySpec) -> None:
    """The Tuner of one of the study's runs tracks its trials in MLflow when the study says so (study.json)."""
    attach(tuner, study_tracking(sdir, record, spec))


def catch_up_study(sdir: Path, record: StudyRecord, spec: StudySpec) -> None:
    """A complete study's runs brought up to it (nothing to do when MLflow holds them all)."""
    tracking = study_tracking(sdir, record, spec)
    if tracking is not None:
        tracking.catch_up()
