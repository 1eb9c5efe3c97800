"""Ray's lifecycle and the trial adapter: the only module that starts or stops Ray.

`ray_session()` starts a local Ray (or joins a cluster) for the commands inside it and stops it at the end if it
started it; nested sessions reuse the running one (the demo runs its sweep and final stage in one). `study_trial`
is the few lines that turn fer_tune.train.fit's per-epoch callback into `ray.tune.report(metrics,
checkpoint=...)`; the final stage's adapter lives beside its driver (fer_tune.tune.final.driver).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ... import __version__
from ...common import FerTuneError
from . import internals, signals

log = logging.getLogger(__name__)

# Tune snapshots its experiment state (every trial's status and config, the searcher's state) every few seconds.
# The snapshot grows with the study (147 MB at 4,000 trials) and is written by the driver: a fixed period would
# take a growing share of its time. fer-tune snapshots at least every SNAPSHOT_S seconds (a crash redoes a few
# seconds of bookkeeping; trials that finish or begin after the snapshot are taken up by the resume), and at most
# SNAPSHOT_SHARE of the time, as Tune's own "auto" mode does (which waits 10 s at least).
SNAPSHOT_S = 3.0
SNAPSHOT_SHARE = 0.05

# Tune starts at most TUNE_MAX_PENDING_TRIALS_PG trials at a time, and only 1 with a searcher like ours: the second
# trial's worker would start only once the first one's had, and an autoscaler would see one waiting trial at a
# time. fer-tune sets it (unless the user did) to --max-concurrent, else to the number of trials the cluster's
# resources hold now.
_USER_PENDING = os.environ.get("TUNE_MAX_PENDING_TRIALS_PG", "")


OUTPUTS = (
    "quiet",
    "progress",
    "tables",
)  # --quiet, the default (fer_tune.tune.runtime.progress), --verbose (Tune's own)


def tune_env(output: str) -> None:
    """Tune settings read from the environment; set before ray.tune is imported."""
    if "TUNE_GLOBAL_CHECKPOINT_S" not in os.environ:  # a user's (or a test's) period stands
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "auto"
        bounded_snapshots()
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if output == "tables" else "0"
    # Tune keeps every checkpoint's entry (fer_tune.tune.runtime.checkpoints deletes the files): without their metrics, so
    # that the experiment state it saves every few seconds stays small
    os.environ.setdefault("TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE", "1")
    from .layout import rerooted_resumes, whole_state_uploads

    whole_state_uploads()
    rerooted_resumes()


def bounded_snapshots(minimum: float = SNAPSHOT_S, share: float = SNAPSHOT_SHARE) -> None:
    """Tune's "auto" snapshot period made max(minimum, the time the driver spent writing the last snapshot /
    share). Tune's own: max(10 s, 19 x the snapshot's time including its waits for the storage's copy, which on
    S3 made the period tens of seconds though the driver was idle). Idempotent."""
    manager = internals.snapshot_manager()
    sync = getattr(manager, internals.SNAPSHOT_SYNC)
    if getattr(sync, "bounded", False):
        return
    init = manager.__init__
    auto, period = internals.SNAPSHOT_ATTRS

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if getattr(self, auto):
            setattr(self, period, minimum)

    @functools.wraps(sync)
    def bounded(self: Any, save_fn: Any, force: bool = False, wait: bool = False) -> None:
        spent: list[float] = []

        def timed() -> None:
            t0 = time.monotonic()
            save_fn()
            spent.append(time.monotonic() - t0)

        sync(self, timed, force=force, wait=wait)
        if spent and getattr(self, auto):
            setattr(self, period, max(minimum, spent[0] * (1 - share) / share))

    bounded.bounded = True  # type: ignore[attr-defined]
    manager.__init__ = __init__
    setattr(manager, internals.SNAPSHOT_SYNC, bounded)
    setattr(manager, internals.SNAPSHOT_UPDATE, lambda self, time_taken: None)  # the period is set above


def set_pending_trials(max_concurrent: int | None, resources: dict) -> None:
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = _USER_PENDING or str(max_concurrent or trials_that_fit(resources))


def trials_that_fit(res: dict) -> int:
    """How many trials of `res` the cluster's resources hold now (at least 1)."""
    import ray

    total = ray.cluster_resources()
    fits = [int(total.get(key.upper(), 0) / res[key] + 1e-9) for key in ("cpu", "gpu") if res[key]]
    return max(1, min(fits, default=1))


class _LogFile(logging.FileHandler):
    """ray.log: where it cannot be written (a full disk) it says so once and stops, instead of a traceback per
    record and one more at the end."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
        elif not self.broken:
            self.broken = True
            log.warning("fer-tune: cannot write %s (%s); Ray's messages are no longer kept", self.baseFilename, exc)

    def close(self) -> None:
        try:
            super().close()
        except OSError:
            self.stream = None  # type: ignore[assignment]


class _RayLog(logging.Handler):
    """Ray's own log records in the driver (its start-up notes, Tune's warnings, a trial's traceback): kept in
    memory until the command names its log file (`ray_log_to`), then written there, and counted. Tune's Ctrl-C
    notice is said in fer-tune's words. Records never given a file reach stderr at the end (a refused command)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.kept: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None
        self.path: Path | None = None
        self.warnings = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Stop signal received" in record.getMessage():
            log.warning("\nfer-tune: stopping the trials and saving the study's state (Ctrl-C again stops at once)")
        self.warnings += record.levelno >= logging.WARNING
        if self.file is not None:
            self.file.emit(record)
        else:
            self.kept.append(record)

    def to_file(self, path: Path) -> None:
        if self.file is not None:
            self.file.close()
        if path != self.path:  # another stage's log (one Ray, several stages): count what this one holds
            self.warnings = sum(r.levelno >= logging.WARNING for r in self.kept)
        self.file, self.path = _LogFile(path, encoding="utf-8"), path
        self.file.setFormatter(self.formatter)
        for record in self.kept:
            self.file.emit(record)
        self.kept.clear()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        for record in self.kept:
            if record.levelno >= logging.WARNING:
                sys.stderr.write(self.format(record) + "\n")
        self.kept.clear()
        super().close()


_RAY_LOG: list[_RayLog] = []  # the running session's


def ray_log_to(path: Path) -> None:
    """Ray's log records of this session go to `path` (appended) from now on, with those kept so far."""
    if _RAY_LOG:
        _RAY_LOG[-1].to_file(path)


def say_ray_log() -> None:
    """At the end of a run: how many warnings Ray logged and where, if it logged any."""
    if _RAY_LOG and _RAY_LOG[-1].warnings and _RAY_LOG[-1].path is not None:
        log.info("Ray logged %d warning(s) on the way: %s", _RAY_LOG[-1].warnings, _RAY_LOG[-1].path)


@contextmanager
def ray_session(address: str | None, *, num_cpus: int | None = None, output: str = "quiet") -> Iterator[bool]:
    """Ray for the block: joined at `address`, else a local Ray (with `num_cpus`); yields True when this call
    started it, and then shuts it down at the end. SIGTERM and SIGHUP act as Ctrl-C while it runs."""
    import ray

    tune_env(output)
    if ray.is_initialized():
        yield False
        return
    if num_cpus is not None and address:
        raise FerTuneError("--num-cpus applies to a local Ray only; a cluster's CPUs are set where it starts")
    # trial workers' logs (one "Checkpoint successfully created" line per epoch) stay in Ray's log files;
    # Tune's own progress tables and trial error reports print in the driver
    kw: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": True,
        "logging_level": "WARNING",
    }
    if num_cpus is not None:
        kw["num_cpus"] = num_cpus
    if not address:
        # a local Ray without the idle workers nothing uses (internals.PRESTART_ENV); a user's setting stands
        os.environ.setdefault(internals.PRESTART_ENV, "0")
    ray_logger = logging.getLogger("ray")
    saved = ray_logger.handlers[:]
    ray_log = _RayLog()
    ray_logger.handlers = [ray_log]  # Ray's own messages into the study's ray.log (see _RayLog)
    _RAY_LOG.append(ray_log)
    try:
        try:
            with _own_session_for_ray_daemons():
                ray.init(address=address, **kw)
        except ConnectionError as exc:
            raise FerTuneError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
        signals.install()  # SIGTERM / SIGHUP as Ctrl-C, in place of Ray's handler
        try:
            yield True
        finally:
            ray.shutdown()
            signals.restore()
    finally:
        ray_logger.handlers = saved
        _RAY_LOG.remove(ray_log)
        ray_log.close()


@contextmanager
def _own_session_for_ray_daemons() -> Iterator[None]:
    """The local Ray's daemons (GCS, raylet and through it the trial workers) start in a session of their own, so
    that a signal to the driver's whole process group (a closed terminal, a batch system's SIGTERM, `kill -TERM
    -PGID`) reaches only the driver, which then stops the trials and saves the study before it stops them. They
    still end with the driver (Ray ties them to it) and Ctrl-C reaches them as before (Ray masks it for them).
    Where a Ray release has no such Popen class, nothing changes."""
    where = internals.ray_console_popen()
    if where is None:
        yield
        return
    module, name = where
    popen = getattr(module, name)

    class SessionPopen(popen):
        def __init__(self, *args: Any, **kw: Any):
            kw.setdefault("start_new_session", True)
            super().__init__(*args, **kw)

    setattr(module, name, SessionPopen)
    try:
        yield
    finally:
        setattr(module, name, popen)


def tune_verbosity(output: str) -> int:
    """RunConfig.verbose: Tune's tables only for --verbose."""
    return 1 if output == "tables" else 0


def set_output(tuner: Any, output: str, progress: Any, exp_dir: str, guards: tuple = ()) -> None:
    """Tune's verbosity and fer-tune's progress callback on a Tuner of the experiment in `exp_dir`, new or restored
    (a restored one keeps the RunConfig it was saved with: its verbosity, and the callbacks of an earlier run,
    which are replaced); the stop on a full disk (first, before a callback that writes to that disk); the stage's
    `guards` (callbacks the driver reads after the run); and the test hook PAUSE_ENV where it is set."""
    from .progress import PAUSE_ENV, FullDiskStops, PauseAfter, TrialProgress

    run_config = internals.tuner_run_config(tuner)
    if run_config is None:  # Ray Client: the Tuner lives on the cluster
        return
    run_config.verbose = tune_verbosity(output)
    ours = (TrialProgress, PauseAfter, FullDiskStops, *map(type, guards))
    callbacks = [c for c in (run_config.callbacks or []) if not isinstance(c, ours)]
    pause = [PauseAfter(os.environ[PAUSE_ENV], exp_dir)] if os.environ.get(PAUSE_ENV) else []
    shown = [progress] if output == "progress" else []
    run_config.callbacks = [FullDiskStops(), *callbacks, *guards, *shown, *pause]


def restore_tuner(exp_dir: str, trainable: Any, saved_by: str | None = None) -> Any:
    """Tune's saved experiment in `exp_dir`, to continue its unfinished and errored trials. Tune pickles the
    searcher, the scheduler and the trainable by name: a state another fer-tune release saved is refused in one
    line (`saved_by`: that release, when known)."""
    from ray import tune

    from ... import __version__

    try:
        return tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    except (ImportError, AttributeError) as exc:
        by = f"fer-tune {saved_by}" if saved_by else "another fer-tune release"
        raise FerTuneError(
            f"{exp_dir}: Tune's saved state was written by {by} and cannot be read by fer-tune {__version__} "
            f"({type(exc).__name__}: {exc}); continue it with the release that started it"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# inside a trial
# ---------------------------------------------------------------------------------------------------------


def versions() -> dict:
    """The versions a study's fingerprint holds (a change asks for --force on resume)."""
    import optuna
    import ray

    return {"fer_tune": __version__, "torch": torch_version(), "ray": ray.__version__, "optuna": optuna.__version__}


def torch_version() -> str:
    """torch.__version__ (with its local part, e.g. 2.14.1+cu130) read from torch/version.py: the driver never
    imports torch (the trials do; it would delay a study's start by seconds)."""
    import importlib.util
    import sys

    if "torch" in sys.modules:
        return str(sys.modules["torch"].__version__)
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise FerTuneError("PyTorch is not installed in this Python environment (pip install torch)")
    namespace: dict = {}
    exec((Path(spec.submodule_search_locations[0]) / "version.py").read_text(), namespace)
    return str(namespace["__version__"])
