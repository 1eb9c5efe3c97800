"""A study's disk footprint: the checkpoints of trials that have finished and cannot matter again go.

While a trial runs it keeps its newest checkpoints and its best (fer_tune.tune.runtime.checkpoints.pruner), so a
crash costs a few epochs. Once it has finished, nothing resumes it: a trial stopped early (pruned) or diverged
needs none of its checkpoints (an errored one keeps them: `resume` retries it from its last), and a completed one
only its best (the checkpoint its value is from), and
only while it is among the study's `keep` best completed trials (the final and PBT stages retrain from the
configurations; the kept checkpoints are the models a user may want as they are). Every other checkpoint is
emptied like the pruner's: its directory and its result-EPOCH.json stay (trials.csv and the report read them),
the weights go. A study's space chooses (`keep_checkpoints: K`, default 4, or `all`: every trial keeps what the
pruner leaves); study.json records it with the spec.

A trial's checkpoints go only GRACE_S after it finished (Tune's saved state, a few seconds behind, says it is
finished by then, so a resume never hands it a checkpoint that is gone); a multi-objective study keeps its
completed trials' best checkpoints (its front is decided at the end). A driver started again (resume, extend)
first reads the trials earlier drivers finished, from their result.json.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from typing import Any

from ray.tune import Callback

from ...config import checkpoint_bytes
from ..runtime.checkpoints import GRACE_S, checkpoint_dirs, empty, read_meta
from ..runtime.layout import experiment_trials, trial_results
from ..runtime.storage import filesystem, join
from .space_check import sample_configs
from .spec import StudySpec

log = logging.getLogger(__name__)


class FinishedCheckpoints(Callback):
    """Empties the checkpoints of finished trials that cannot matter again (see the module docstring); a few
    operations per event whatever the study's size."""

    def __init__(
        self,
        *,
        keep: int,
        metric: str,
        mode: str,
        max_epochs: int,
        history_dirs: list[str],
        multi: bool = False,
        grace_s: float = GRACE_S,
    ):
        self.keep, self.metric, self.max_epochs, self.multi, self.grace_s = keep, metric, max_epochs, multi, grace_s
        self.sign = 1.0 if mode == "max" else -1.0
        self.history_dirs = history_dirs
        self._seeded = False
        self._best: dict[str, float] = {}  # trial id -> its best signed metric so far
        self._where: dict[str, tuple[Any, str]] = {}  # trial id -> (filesystem, trial directory)
        self._top: list[tuple[float, str]] = []  # heap of the kept completed trials, the worst first
        self._due: deque[tuple[float, str, bool]] = deque()  # (finished at, trial id, keep its best), in time order
        self.emptied = 0  # checkpoints emptied by this driver

    # ---- Tune's events ----------------------------------------------------------------------------
    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._seed()
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and result.get("status") != "diverged":
            self._better(trial.trial_id, value)
        self._sweep(time.monotonic())

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self._where[trial.trial_id] = (checkpoint.filesystem, checkpoint.path.rstrip("/").rsplit("/", 1)[0])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._seed()
        self._finish(trial.trial_id, trial.last_result or {}, at=time.monotonic())
        self._sweep(time.monotonic())

    def on_experiment_end(self, trials, **info):
        self._sweep(float("inf"))  # the run is over: none of its trials is resumed

    # ---- the policy --------------------------------------------------------------------------------
    def _better(self, tid: str, value: float) -> None:
        best = self._best.get(tid)
        self._best[tid] = self.sign * value if best is None else max(best, self.sign * value)

    def _finish(self, tid: str, last: dict, *, at: float) -> None:
        """A trial finished `at`: completed (its best kept while among the top `keep`) or not (all its go)."""
        epochs = int(last.get("epoch", 0) or 0)
        if last.get("status") != "diverged" and epochs < self.max_epochs and tid in self._where:
            # a trial that had completed before a restart is stopped at its first result since (FinishedInStudy):
            # its checkpoints' results say how far it went and how well
            fs, trial_dir = self._where[tid]
            for path in checkpoint_dirs(fs, trial_dir):
                meta = read_meta(fs, path)
                epochs = max(epochs, int(meta.get("epoch", 0) or 0))
                if isinstance(meta.get(self.metric), (int, float)) and meta.get("status") != "diverged":
                    self._better(tid, meta[self.metric])
        completed = last.get("status") != "diverged" and epochs >= self.max_epochs
        score = self._best.get(tid) if completed else None
        if score is None:
            self._due.append((at, tid, False))
        elif self.multi:  # the front is decided at the end: every completed trial keeps its best
            self._due.append((at, tid, True))
        elif len(self._top) < self.keep or (self._top and (score, tid) > self._top[0]):
            heapq.heappush(self._top, (score, tid))
            self._due.append((at, tid, True))
            if len(self._top) > self.keep:
                _, out = heapq.heappop(self._top)
                self._due.append((at, out, False))  # pushed out of the top: its best goes too
        else:
            self._due.append((at, tid, False))

    def _sweep(self, now: float) -> None:
        """Empty the checkpoints of the trials that finished more than grace_s ago."""
        while self._due and now - self._due[0][0] >= self.grace_s:
            at, tid, keep_best = self._due[0]
            if tid in self._where:
                fs, trial_dir = self._where[tid]
                try:
                    paths = checkpoint_dirs(fs, trial_dir)
                    best = self._best_checkpoint(fs, paths) if keep_best else None
                    self.emptied += sum(empty(fs, p) > 0 for p in paths if p != best)
                except OSError as exc:  # a storage hiccup: tried again at the next event
                    log.warning("fer-tune: could not delete the checkpoints in %s: %s", trial_dir, exc)
                    return
            self._due.popleft()

    def _best_checkpoint(self, fs: Any, paths: list[str]) -> str | None:
        """The checkpoint of a trial's best epoch (by the result it holds)."""
        scored = []
        for path in paths:
            value = read_meta(fs, path).get(self.metric)
            if isinstance(value, (int, float)):
                scored.append((self.sign * value, path))
        return max(scored)[1] if scored else None

    def _seed(self) -> None:
        """The trials earlier drivers of the study finished, with their best values, from their result.json."""
        if self._seeded:
            return
        self._seeded = True
        for exp in self.history_dirs:
            for t in experiment_trials(exp):
                if t["status"] != "TERMINATED" or not t["logdir"]:
                    continue
                trial_dir = join(str(exp), t["logdir"])
                rows = list(trial_results(trial_dir))
                for row in rows:
                    if isinstance(row.get(self.metric), (int, float)) and row.get("status") != "diverged":
                        self._better(t["trial_id"], row[self.metric])
                self._where.setdefault(t["trial_id"], filesystem(trial_dir))
                self._finish(t["trial_id"], rows[-1] if rows else {}, at=float("-inf"))


def checkpoint_need(spec: StudySpec, keep: int | str, at_once: int) -> tuple[int, str]:
    """(bytes, how they were reckoned) the study's checkpoints take at most: 4 per running trial (the pruner's 3
    latest and the best), 1 per kept completed trial, or 4 per trial when all are kept; a checkpoint as large as
    the largest of the space's sampled configurations'."""
    per = max(checkpoint_bytes(c) for c in sample_configs(spec, 16))
    at_once = max(1, min(at_once, spec.num_samples))
    count = 4 * spec.num_samples if keep == "all" else 4 * at_once + min(int(keep), spec.num_samples)
    kept = "every trial's 4 kept" if keep == "all" else f"4 per trial for {at_once} at once and {keep} kept"
    return count * per, f"{count} checkpoints of up to {per / 2**20:.0f} MiB: {kept}"
