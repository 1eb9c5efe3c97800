"""What drives a study's trials in Ray Tune: the Optuna searcher, early stopping, and Tune's callbacks.

- StudySearch: OptunaSearch on the study's persistent storage that survives crashes and restores and records
  early stopping as pruning;
- ResumableASHA: ASHA whose rungs are rebuilt after a resume (Ray does not save them);
- FinishedInStudy: a Stopper for trials Tune runs again although the study already holds them as finished;
- NumpyTBXLoggerCallback: Tune's TensorBoard logger without torch in the driver.

The private Ray and Optuna attributes they use are read through fer_tune.tune.runtime.internals.
"""

from __future__ import annotations

import logging
import pickle
import sys
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune import Stopper
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from ..runtime import internals as ri
from .outputs import read_results
from .record import StudyRecord, epoch_values, load_optuna_study, optuna_lib, resolve_storage
from .spec import StudySpec

log = logging.getLogger(__name__)

DONE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class StudySearch(OptunaSearch):
    """OptunaSearch on a persistent storage that (1) ignores Tune's repeated reports for trials the DB already
    holds as finished (a trial that finished after Tune's last snapshot runs again on resume), (2) on restore hands
    the RUNNING DB trials Tune does not know (suggested after its last snapshot) to its next new trials and draws a
    fresh sampler seed (so old suggestions are not replayed), and counts the run's trials that began and finished
    after that snapshot (so the run still makes num_samples trials in all), (3) tells ASHA-stopped trials as PRUNED
    and diverged ones as FAIL, (4) never pickles the storage URL (it may hold a password): it is re-resolved on
    restore. Each trial it makes records the run's name (user attribute `run`)."""

    def __init__(
        self,
        *,
        storage_ref: str,
        study_name: str,
        max_epochs: int,
        run: str | None = None,
        num_samples: int | None = None,
        adopt: bool = False,
        **kw: Any,
    ):
        """`run`, `num_samples`: the run's name (Tune's experiment directory) and size. `adopt`: a run that starts
        over because its driver died before Tune saved a state: the study's RUNNING trials are its own, handed to
        its first Tune trials, and the sampler's seed is fresh (the seeded one would suggest those trials'
        parameters again)."""
        optuna_lib()
        self._storage_ref = storage_ref
        self._max_epochs = max_epochs
        self._run, self._num_samples = run, num_samples
        self._last: dict[str, dict] = {}
        self._orphans: list[int] = []
        self._finished_unseen = 0
        super().__init__(storage=resolve_storage(storage_ref), study_name=study_name, **kw)
        if adopt:
            self._adopt(known=set())

    def _adopt(self, known: set[int]) -> None:
        """The study's RUNNING trials that Tune does not know (`known`: the numbers it does) become the
        trials handed to Tune's next new trials; the run's finished trials that Tune does not know are counted
        (they are not made again); a fresh sampler seed, so the suggestions made after Tune's last saved state are
        not replayed."""
        ri.search_name_and_sampler(self)[1].reseed_rng()
        study = ri.search_study(self)
        self._orphans = [
            ri.trial_id(t)
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if ri.trial_id(t) not in known
        ]
        run = getattr(self, "_run", None)  # None: pickled by an earlier release, whose trials do not name their run
        self._finished_unseen = (
            sum(
                t.user_attrs.get("run") == run and ri.trial_id(t) not in known
                for t in study.get_trials(deepcopy=False, states=DONE)
            )
            if run is not None
            else 0
        )

    def _full(self) -> bool:
        """True when the run has its num_samples trials: those Tune knows and those it forgot that finished."""
        n = getattr(self, "_num_samples", None)
        return n is not None and len(ri.search_trials(self)) + getattr(self, "_finished_unseen", 0) >= n

    @property
    def _db(self) -> Any:
        return ri.study_storage(ri.search_study(self))

    def _db_state(self, trial_id: str) -> TrialState | None:
        ot = ri.search_trials(self).get(trial_id)
        return None if ot is None else self._db.get_trial(ri.trial_id(ot)).state

    def suggest(self, trial_id: str) -> dict | None:
        trials = ri.search_trials(self)
        if trial_id not in trials and self._orphans:
            # a trial asked after Tune's last snapshot: Tune forgot it, so hand its (already sampled) params to the
            # next Tune trial instead of asking a new one; the study keeps num_samples trials
            trials[trial_id] = optuna.Trial(ri.search_study(self), self._orphans.pop(0))
        elif trial_id not in trials and self._full():
            # trials that began and finished after Tune's last snapshot: Tune forgot them, the study holds them
            return Searcher.FINISHED
        params = super().suggest(trial_id)
        number = ri.trial_id(trials[trial_id])
        self._db.set_trial_user_attr(number, "ray_trial_id", trial_id)
        if getattr(self, "_run", None) is not None:
            self._db.set_trial_user_attr(number, "run", self._run)
        return params

    @property
    def _metrics(self) -> list[str]:
        return self.metric if isinstance(self.metric, list) else [self.metric]

    @property
    def _pick(self) -> Any:
        """max or min: what the first objective's mode wants."""
        return max if (self.mode[0] if isinstance(self.mode, list) else self.mode) == "max" else min

    def _report_epoch(self, trial_id: str, result: dict) -> None:
        """The epoch's metric as an Optuna intermediate value (step = epoch, stable across restarts). Optuna refuses
        Trial.report in a multi-objective study (and its samplers would read intermediate values as one objective's
        pruned score), so there every objective's value of the epoch goes to the trial's `objectives` attribute."""
        first = self._metrics[0]
        if first in result and "epoch" in result and result.get("status") != "diverged":
            ot = ri.search_trials(self)[trial_id]
            number, epoch = ri.trial_id(ot), int(result["epoch"])
            frozen = self._db.get_trial(number)
            if epoch in epoch_values(frozen):
                return
            if len(self._metrics) == 1:
                ot.report(float(result[first]), epoch)
                return
            by_epoch = dict(frozen.user_attrs.get("objectives", {}))
            by_epoch[str(epoch)] = [float(result[m]) if m in result else None for m in self._metrics]
            self._db.set_trial_user_attr(number, "objectives", by_epoch)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        state = self._db_state(trial_id)
        if state is None or state.is_finished():
            return
        self._last[trial_id] = result
        self._report_epoch(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        state = self._db_state(trial_id)
        if state is None or state.is_finished():
            ri.search_finished(self, trial_id)
            return
        result = result or self._last.get(trial_id) or {}
        ot = ri.search_trials(self)[trial_id]
        number = ri.trial_id(ot)
        self._report_epoch(trial_id, result)  # Tune hands the last result only to on_trial_complete
        frozen = self._db.get_trial(number)
        by_epoch = epoch_values(frozen)
        values = by_epoch.values()
        self._keep_two_epochs(number, frozen, by_epoch)  # while the trial can still be written to
        status = result.get("status")
        epochs = int(result.get("epoch", 0) or 0)
        if error or status == "diverged" or not values:
            self._db.set_trial_user_attr(number, "status", "diverged" if status == "diverged" else "error")
            self._tell(ot, state=TrialState.FAIL)
        elif epochs < self._max_epochs:  # stopped early by the scheduler (ASHA, median)
            self._db.set_trial_user_attr(number, "status", "pruned")
            self._tell(ot, state=TrialState.PRUNED)
        elif (value := self._values(frozen, by_epoch)) is None:  # an objective the trial never reported
            self._db.set_trial_user_attr(number, "status", "error")
            self._tell(ot, state=TrialState.FAIL)
        else:  # the trial's value: its best epoch (the checkpoint a user would keep)
            self._db.set_trial_user_attr(number, "status", "completed")
            self._tell(ot, value)
        ri.search_finished(self, trial_id)
        self._last.pop(trial_id, None)

    def _values(self, frozen: Any, by_epoch: dict[int, float]) -> float | list[float] | None:
        """A completed trial's value: its first metric at its best epoch by that metric, and in a multi-objective
        study the other objectives at that epoch too (kept by _keep_two_epochs)."""
        epoch, value = self._pick(by_epoch.items(), key=lambda kv: kv[1])
        if len(self._metrics) == 1:
            return value
        values = frozen.user_attrs.get("objectives", {}).get(str(epoch))
        return None if values is None or None in values else values

    def _keep_two_epochs(self, number: int, frozen: Any, by_epoch: dict[int, float]) -> None:
        """A finished trial of a multi-objective study keeps its best and last epochs' values (where its values are
        from, where the study stopped it), not every epoch's, which Optuna's plots would show in every hover."""
        if len(self._metrics) > 1 and by_epoch:
            keep = {str(self._pick(by_epoch, key=by_epoch.get)), str(max(by_epoch))}
            kept = {e: v for e, v in frozen.user_attrs["objectives"].items() if e in keep}
            self._db.set_trial_user_attr(number, "objectives", kept)

    def _tell(self, ot: optuna.Trial, *args: Any, **kw: Any) -> None:
        try:
            ri.search_study(self).tell(ot, *args, **kw)
        except RuntimeError as exc:  # GridSampler calls study.stop() after the last grid point
            if "Study.stop" not in str(exc):
                raise

    # pickling (tuner.pkl, searcher state): no storage object, no URL; reconnect from the reference
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ri.SEARCH_UNPICKLED}
        state["_ot_trial_ids"] = {tid: ri.trial_id(t) for tid, t in ri.search_trials(self).items()}
        state["_has_study"] = ri.search_study(self) is not None
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        ids = state.pop("_ot_trial_ids", {})
        has_study = state.pop("_has_study", False)
        self.__dict__.update(state)
        self.__dict__[ri.SEARCH_STORAGE] = resolve_storage(self._storage_ref)
        self.__dict__[ri.SEARCH_STUDY] = None
        self.__dict__[ri.SEARCH_TRIALS] = {}
        if has_study:
            name, sampler = ri.search_name_and_sampler(self)
            study = optuna_lib().load_study(study_name=name, storage=self.__dict__[ri.SEARCH_STORAGE], sampler=sampler)
            self.__dict__[ri.SEARCH_STUDY] = study
            self.__dict__[ri.SEARCH_TRIALS] = {tid: optuna.Trial(study, i) for tid, i in ids.items()}

    def save(self, checkpoint_path: str) -> None:
        state = self.__getstate__()
        state.pop("_space", None)  # the define-by-run closure lives in tuner.pkl (cloudpickle)
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(state, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__setstate__(pickle.load(fh))
        self._adopt(known={ri.trial_id(t) for t in ri.search_trials(self).values()})


class FinishedInStudy(Stopper):
    """Stops a trial that restarted (a resume, a retry) although the Optuna study already holds it as completed or
    pruned: it finished after Tune's last saved state, so Tune runs it again from an older checkpoint. Checked at
    the first result after each start, in the driver (which always reaches the Optuna storage); errored trials are
    retried as before."""

    def __init__(self, record: StudyRecord):
        self._record = {k: record[k] for k in ("optuna_study", "storage")}
        self._done: set[str] | None = None

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get("iterations_since_restore") != 1:
            return False
        if self._done is None:  # read once: only trials that finished before this driver started can rerun
            study = load_optuna_study(self._record)
            self._done = {
                t.user_attrs.get("ray_trial_id")
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            }
        return trial_id in self._done

    def __getstate__(self) -> dict:  # pickled into Tune's state: the set is read again by the next driver
        return {**self.__dict__, "_done": None}

    def stop_all(self) -> bool:
        return False


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs are rebuilt from the results trials reported before an interruption (Ray does not save
    them): after a resume it prunes as strictly as an uninterrupted study."""

    def __init__(self, history_dirs: list[str], **kw: Any):
        super().__init__(**kw)
        self.history_dirs = history_dirs
        self._seeded = False

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        if not self._seeded:
            self._seeded = True
            n = self.seed_rungs()
            if n:
                log.info("ASHA: rebuilt its rungs from %d results reported before the interruption", n)

    def seed_rungs(self) -> int:
        """Record every earlier result in the first rung of each bracket that it reaches and lacks; the count."""
        metric, time_attr, sign = ri.asha_reading(self)
        n = 0
        results = read_results(self.history_dirs)
        for bracket in ri.asha_brackets(self):
            for tid, rows in results.items():
                for row in rows:
                    if metric not in row or time_attr not in row:
                        continue
                    for milestone, recorded in ri.bracket_rungs(bracket):
                        if row[time_attr] < milestone or tid in recorded:
                            continue
                        recorded[tid] = sign * row[metric]
                        n += 1
                        break
        return n


def make_scheduler(spec: StudySpec, history_dirs: list[str]) -> TrialScheduler:
    """The study's early stopping (time is the epoch, stable across restarts); ASHA's rungs are rebuilt from the
    results in `history_dirs` (every run of the study) on a restore."""
    es = spec.early_stopping
    if es["type"] == "asha":
        return ResumableASHA(
            history_dirs=history_dirs,
            metric=spec.metric,
            mode=spec.mode,
            max_t=spec.max_epochs,
            grace_period=es["grace_period"],
            reduction_factor=es["reduction_factor"],
            time_attr="epoch",
        )
    if es["type"] == "median":
        return MedianStoppingRule(
            metric=spec.metric,
            mode=spec.mode,
            time_attr="epoch",
            grace_period=es["grace_period"],
            min_samples_required=3,
        )
    return FIFOScheduler()


class NumpyTBXLoggerCallback(TBXLoggerCallback):
    """Tune's TensorBoard logger (event files in every trial directory) without torch in the driver: tensorboardX
    imports torch if it can (`try: import torch`, for tensor inputs), which would cost seconds of CPU before the
    first trial could start. Tune logs plain numbers, which tensorboardX writes with numpy."""

    def __init__(self) -> None:
        block = "torch" not in sys.modules and "tensorboardX" not in sys.modules
        if block:
            sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
        try:
            super().__init__()
        finally:
            if block:
                del sys.modules["torch"]
