"""A run's progress in fer-tune's words: one line per trial event on stderr, in place of Tune's tables.

    trial 3 started: optimizer=adam lr=0.0031 dropout=0.21  [1/8 done, 2 running]
    trial 3 epoch 2/5: val_acc 41.20 (best so far 45.10, trial 1)
    trial 3 pruned at epoch 2: val_acc 41.20  [4/8 done, 2 running, ETA ~3 min]
    trial 5 completed: best val_acc 47.85 at epoch 5  [5/8 done, 2 running, ETA ~2 min]
    trial 6 failed: RuntimeError: ...; Tune retries it (see its error.txt)

The ETA is the time the trials finished in this run took on average, times the trials left, over the trials
running at once: rough, and only once a trial has finished. Tune's own tables come back with --verbose.
Beside them, what every run has: a trial failed on a full disk stops it at once (FullDiskStops), and the test hook
that pauses a driver at a known point (PauseAfter).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from ...common import SQLITE_FULL
from . import signals
from .layout import state_saved_at

log = logging.getLogger(__name__)

FINISHED = ("TERMINATED", "ERROR")


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def params_line(params: dict) -> str:
    """A configuration as the progress lines show it: `optimizer=adam, lr=0.005539, dropout=0.4459`."""
    return ", ".join(f"{k}={_num(v)}" for k, v in params.items())


class TrialProgress(Callback):
    """Tune callback (in the driver) that logs each trial's start, epochs, end and errors.

    `name(trial)`: how a trial is called ("trial 3", "seed 1"); `ended(result, epochs)`: the word for a trial that
    finished after `epochs` epochs ("completed", "pruned at epoch 2", ...); `total`: trials of this run;
    `epochs`: the epochs of a trial, per value of a result's `phase` key ("" for all; the final stage: train, then
    fine-tune); `params`: show a trial's config when it starts; `best`: say which trial is the best so far."""

    def __init__(
        self,
        *,
        metric: str,
        mode: str,
        total: int,
        epochs: dict[str, int],
        name: Callable[[Any], str],
        ended: Callable[[dict, int], str],
        params: bool = True,
        best: bool = True,
    ):
        self._metric, self._sign = metric, 1.0 if mode == "max" else -1.0
        self._total, self._epochs = total, epochs
        self._name, self._ended, self._params, self._show_best = name, ended, params, best
        self._t0 = time.monotonic()
        self._finished_here = 0

    def _counts(self, trials: list, this: Any = None, now: str = "") -> str:
        """`[done/total, running, ETA]`, with `this` trial counted as `now` (Tune updates its status after the
        callback)."""
        states = [now if t is this and now else t.status for t in trials]
        done = sum(s in FINISHED for s in states)
        running = sum(s == "RUNNING" for s in states)
        total = max(self._total, len(trials))
        text = f"{done}/{total} done, {running} running"
        left = total - done
        if self._finished_here and left > 0:
            per_trial = (time.monotonic() - self._t0) / self._finished_here
            text += f", ETA ~{max(1, round(per_trial * left / 60))} min"
        return f"[{text}]"

    def _best(self, trials: list, this: Any = None, result: dict | None = None) -> str:
        """The best value any trial has reported (`result`: `this` trial's newest, not yet in its last_result)."""
        key = "best_" + self._metric
        latest = [(result if t is this and result else t.last_result, t) for t in trials]
        scored = [(r.get(key, r.get(self._metric)), t) for r, t in latest if r]
        scored = [(v, t) for v, t in scored if isinstance(v, (int, float))]
        if not scored:
            return ""
        value, trial = max(scored, key=lambda vt: self._sign * vt[0])
        return "the best so far" if trial is this else f"best so far {value:.2f}, {self._name(trial)}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        config = trial.config or {}
        shown = params_line(config) if self._params else ""
        log.info(
            "%s started%s  %s", self._name(trial), f": {shown}" if shown else "", self._counts(trials, trial, "RUNNING")
        )

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" not in result or result.get("status") == "done":
            return
        phase = result.get("phase")
        of = self._epochs.get(phase or "", self._epochs.get("", 0))
        where = f"epoch {result['epoch']}/{of}" + (f" ({phase})" if phase and len(self._epochs) > 1 else "")
        value = result.get(self._metric)
        shown = f"{self._metric} {value:.2f}" if isinstance(value, (int, float)) else ""
        best = self._best(trials, trial, result) if self._show_best else ""
        log.info("%s %s: %s%s", self._name(trial), where, shown, f" ({best})" if best else "")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished_here += 1
        result = trial.last_result or {}
        log.info(
            "%s %s  %s", self._name(trial), self._ended(result, int(result.get("epoch", 0) or 0)), self._counts(trials)
        )

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.warning("%s crashed; Tune starts it again from its last checkpoint", self._name(trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        lines = [line for line in last_error(trial).splitlines() if line.strip()]
        log.warning(
            "%s failed%s (details: %s)  %s",
            self._name(trial),
            f": {lines[-1][:300]}" if lines else "",
            getattr(trial, "error_file", None) or "its trial directory",
            self._counts(trials),
        )


def last_error(trial: Any) -> str:
    """The text of a trial's latest failure, from the error.txt Tune keeps beside the driver ("" when none)."""
    error_file = getattr(trial, "error_file", None)
    try:
        text = Path(error_file).read_text() if error_file else ""
    except OSError:
        return ""
    return text.rsplit("Failure # ", 1)[-1]


# how a full disk or quota reads in an error's text (Python's, pyarrow's, sqlite's)
FULL_DISK = {
    errno.ENOSPC: ("[Errno 28]", "[errno 28]", "No space left on device", SQLITE_FULL),
    errno.EDQUOT: ("[Errno 122]", "[errno 122]", "Disk quota exceeded"),
}
NAMED_FILE = re.compile(r"(?:No space left on device|Disk quota exceeded): '([^']+)'")


class FullDiskStops(Callback):
    """A trial that failed on a full disk (its checkpoint could not be written to the storage) stops the run at
    once, as a full disk met by the driver does: Tune would retry it (stage.FAILURES times), and every other trial
    with it, each failing the same way at its next checkpoint."""

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    @staticmethod
    def _check(trial: Any) -> None:
        text = last_error(trial)
        for code, words in FULL_DISK.items():
            said = [line.strip() for line in text.splitlines() if any(w in line for w in words)]
            if said:
                # the error's own line says which write failed (a node's /tmp, the storage); Python's names the file
                log.warning("fer-tune: %s failed on a full disk: %s", trial, said[-1][:300])
                named = NAMED_FILE.search(said[-1])
                raise OSError(code, os.strerror(code), *([named.group(1)] if named else []))


PAUSE_ENV = "FER_TUNE_PAUSE_AFTER"  # test hook "N:MARKER": see PauseAfter


class PauseAfter(Callback):
    """A test hook (PAUSE_ENV "N:MARKER"): once this driver has handled N trial results and Tune has saved its
    experiment state after that, the driver writes MARKER and stops handling anything, so that a test kills it at
    a point it knows instead of after a guessed sleep. A SIGTERM or SIGHUP ends the pause: the driver then stops
    as the signal asks. Only the first driver to get there pauses: once MARKER exists, a later one started with the
    same environment (a SLURM job's next allocation) runs through."""

    def __init__(self, spec: str, exp_dir: str):
        n, _, self.marker = spec.partition(":")
        self.n, self.exp_dir, self.seen, self.at = int(n), exp_dir, 0, None

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.seen += 1
        if self.seen == self.n and not Path(self.marker).exists():
            self.at = time.time()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.at is not None and (state_saved_at(self.exp_dir) or 0.0) > self.at:
            self.at = None  # once
            Path(self.marker).write_text(str(self.seen))
            deadline = time.time() + 600
            while time.time() < deadline and not signals.received():  # until killed, or stopped by a signal
                time.sleep(0.1)
