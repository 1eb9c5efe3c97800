"""MLflow tracking (--mlflow URI): a study's trials (one run each, fer_tune.tune.mlflow.study) and its final stage
(one run, fer_tune.tune.mlflow.final) as MLflow runs, in one MLflow experiment named after the study.

MLflow mirrors the study's own files. The runs are logged live from Tune's events in the driver, and brought up to
the study's results and its Optuna storage when a command starts, when MLflow answers again after an outage and when
a run ends. A continued trial logs into its run (found by its study and Optuna trial number), and a (metric, step)
pair that the run holds is never logged again, so resume and extend duplicate neither runs nor metrics.

The URI: a directory or file: URI (an MLflow file store), http(s)://HOST:PORT (a tracking server), or env:VAR naming
an environment variable that holds one (with credentials: it is never written to a file nor printed). Only this
reference is recorded (study.json, final.json); the callbacks pickle no URL and no client. MLflow never makes a
study fail: when the server goes away fer-tune says so once, tries it again every RETRY_S seconds and then sends
what it missed.
"""

from __future__ import annotations

import functools
import getpass
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ray.tune import Callback

from ... import __version__
from ...common import FerTuneError, code_revision
from ..runtime import internals
from ..study.record import mlflow_ref, mlflow_uri

log = logging.getLogger(__name__)

RETRY_S = 30.0
TIMEOUT_S = 5  # per MLflow request (connect, read), unless MLFLOW_HTTP_REQUEST_TIMEOUT says otherwise
ARTIFACT_TIMEOUT_S = 600  # an upload of a model file
TERMINAL = ("FINISHED", "FAILED", "KILLED")
BATCH = 1000  # metrics per log_batch call (MLflow's limit; 100 for params)
# MLflow answering "no" (a bad value, a deleted run, credentials refused): said once, not an outage
REFUSALS = frozenset(
    "INVALID_PARAMETER_VALUE RESOURCE_ALREADY_EXISTS RESOURCE_DOES_NOT_EXIST INVALID_STATE BAD_REQUEST "
    "PERMISSION_DENIED UNAUTHENTICATED".split()
)
_USER_TIMEOUT = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")  # the user's: uploads keep it too


def _settings(url: str) -> None:
    """MLflow's client settings in this process: short requests without retries of its own (fer-tune tries again
    later), no run URL printed (it may hold credentials), and the file store MLflow 3 asks to be allowed."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(TIMEOUT_S))
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if url.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


@contextmanager
def long_requests() -> Iterator[None]:
    """MLflow requests in the block may take ARTIFACT_TIMEOUT_S (uploads of model files), unless the user set a
    timeout."""
    if _USER_TIMEOUT:
        yield
        return
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(ARTIFACT_TIMEOUT_S)
    try:
        yield
    finally:
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(TIMEOUT_S)


def _check_writable(root: Path, what: str) -> None:
    """A file store's directory: made if missing, and written to (a file removed again)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".fer-tune-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise FerTuneError(f"{what}: the directory {root} cannot be written ({exc.strerror or exc})") from None


def check(arg: str | None, experiment: str, recorded: str | None = None) -> str | None:
    """The tracking reference a command records: --mlflow ARG when given, else the one recorded; checked once now
    (MLflow installed, the server answers, the store can be written, the experiment made), FerTuneError if not."""
    ref = mlflow_ref(arg) if arg is not None else recorded
    if ref:
        Mlflow(ref, experiment).open()
        log.info("MLflow: runs go to the experiment %r at %s", experiment, ref)
    return ref


class Run:
    """An MLflow run as this driver knows it: its id, its status, whether its params are in, and the (metric, step)
    pairs it holds (None until read)."""

    def __init__(self, run_id: str, status: str, logged: set | None, has_params: bool):
        self.id, self.status, self.logged, self.has_params = run_id, status, logged, has_params


class Mlflow:
    """The study's experiment in one MLflow tracking store. open() raises FerTuneError when it cannot be used; the
    calls after that never raise (see call())."""

    def __init__(self, ref: str, experiment: str):
        self.ref, self.experiment = ref, experiment
        self.client: Any = None
        self.experiment_id = ""
        self.came_back = False  # MLflow answered again after an outage: the caller catches it up
        self.writes = 0  # points, runs and statuses sent
        self._url = ""
        self._away_until: float | None = None
        self._refused: set[str] = set()

    def open(self) -> Mlflow:
        what = f"--mlflow {self.ref}"
        url = mlflow_uri(self.ref)
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise FerTuneError(
                f"{what}: MLflow is not installed in this Python environment (pip install -e '.[mlflow]')"
            ) from None
        _settings(url)
        if url.startswith("file:"):
            _check_writable(Path(unquote(urlsplit(url).path)), what)
        self._url = url
        client = MlflowClient(tracking_uri=url)
        try:
            self.experiment_id = self._experiment(client)
        except FerTuneError as exc:
            raise FerTuneError(f"{what}: {exc}") from None
        except Exception as exc:
            where = "the tracking server does not answer there" if url.startswith("http") else "MLflow refused it"
            raise FerTuneError(
                f"{what}: {where} ({self.why(exc)}); check the URI, or pass --mlflow off to run without MLflow"
            ) from None
        self.client = client
        return self

    def _experiment(self, client: Any) -> str:
        for _ in range(3):  # two commands may create it at once
            exp = client.get_experiment_by_name(self.experiment)
            if exp is not None and exp.lifecycle_stage == "deleted":
                raise FerTuneError(
                    f"the MLflow experiment {self.experiment!r} was deleted; restore it (mlflow experiments restore "
                    f"--experiment-id {exp.experiment_id}) or remove it for good (mlflow gc)"
                )
            if exp is not None:
                return exp.experiment_id
            try:
                return client.create_experiment(self.experiment, tags={"fer_tune": __version__})
            except Exception as exc:
                if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
        raise FerTuneError(f"the MLflow experiment {self.experiment!r} could not be made")

    def why(self, exc: BaseException) -> str:
        """An MLflow error in one short line, without the URL or its credentials."""
        text = str(exc)
        errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
        if errno:
            return errno.group(1).strip()
        if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
            return f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', TIMEOUT_S)} s"
        code = (re.findall(r"error code (\d{3})", text) or [""])[0]
        if code:
            return f"HTTP {code}" + (": no MLflow tracking server there?" if code == "404" else "")
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
        if self._url:
            first = first.replace(self._url, self.ref)
            password = urlsplit(self._url).password if self._url.startswith("http") else None
            if password:
                first = first.replace(password, "***")
        return first[:300]

    def call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """fn(client) (True for a call that returns nothing); None when MLflow is away (said once, tried again
        RETRY_S later) or refused it (said once per kind of call)."""
        if self.client is None or (self._away_until is not None and time.monotonic() < self._away_until):
            return None
        try:
            out = fn(self.client)
        except Exception as exc:
            if getattr(exc, "error_code", "") in REFUSALS:
                if what not in self._refused:
                    self._refused.add(what)
                    log.warning("fer-tune: MLflow refused to %s (%s); the study goes on", what, self.why(exc))
                return None
            if self._away_until is None:
                log.warning(
                    "fer-tune: MLflow at %s went away (%s: %s); the study goes on, and fer-tune tries MLflow again "
                    "every %.0f s and then sends what it missed",
                    self.ref,
                    what,
                    self.why(exc),
                    RETRY_S,
                )
            self._away_until = time.monotonic() + RETRY_S
            return None
        if self._away_until is not None:
            self._away_until, self.came_back = None, True
            log.warning("fer-tune: MLflow at %s is back; sending what it missed", self.ref)
        return True if out is None else out

    # ------------------------------------------------------------------ runs
    def find_runs(self, **tags: str) -> list | None:
        """The experiment's live runs with these tags, oldest first (None when MLflow is away)."""
        where = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())

        def search(client: Any) -> list:
            runs, token = [], None
            while True:
                page = client.search_runs(
                    [self.experiment_id],
                    where,
                    max_results=1000,
                    order_by=["attributes.start_time ASC"],
                    page_token=token,
                )
                runs += list(page)
                token = page.token
                if not token:
                    return runs

        return self.call("search runs", search)

    def known(self, run: Any) -> Run:
        return Run(run.info.run_id, run.info.status, None, bool(run.data.params))

    def create_run(self, name: str, tags: dict, start_ms: int | None = None) -> Run | None:
        tags = {**source_tags(), **tags}
        run = self.call(
            "create a run",
            lambda c: c.create_run(self.experiment_id, start_time=start_ms, tags=tags, run_name=name),
        )
        if run is None:
            return None
        self.writes += 1
        return Run(run.info.run_id, "RUNNING", set(), False)

    def log_params(self, run: Run, params: dict) -> bool:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            if self.call("log params", lambda c, batch=items[i : i + 100]: c.log_batch(run.id, params=batch)) is None:
                return False
        run.has_params = True
        return True

    def read_logged(self, run: Run) -> bool:
        """The (metric, step) pairs a run this driver did not make holds (read once); False when MLflow is away."""
        if run.logged is not None:
            return True
        got = self.call("read a run", lambda c: c.get_run(run.id))
        if got is None:
            return False
        logged = set()
        for key in got.data.metrics:
            history = self.call("read a run's metrics", lambda c, key=key: c.get_metric_history(run.id, key))
            if history is None:
                return False
            logged.update((key, m.step) for m in history)
        run.logged = logged
        return True

    def log(self, run: Run, points: Iterable[tuple[str, float, int]]) -> bool:
        """Send the (metric, value, step) points the run does not hold yet; False when MLflow is away."""
        from mlflow.entities import Metric

        if not self.read_logged(run):
            return False
        new: dict[tuple[str, int], float] = {}
        for key, value, step in points:
            if (key, step) not in run.logged:
                new[(key, step)] = value
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, s) for (k, s), v in new.items()]
        for i in range(0, len(items), BATCH):
            batch = items[i : i + BATCH]
            if self.call("log metrics", lambda c, batch=batch: c.log_batch(run.id, metrics=batch)) is None:
                return False
            run.logged.update((m.key, m.step) for m in batch)
            self.writes += len(batch)
        return True

    def set_status(self, run: Run, status: str, *, end_ms: int | None = None, tags: dict | None = None) -> bool:
        """The run's status (RUNNING again for a continued run) and tags; False when MLflow is away."""
        from mlflow.entities import RunTag

        def update(client: Any) -> None:
            if tags:
                client.log_batch(run.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            if status == "RUNNING":
                client.update_run(run.id, status="RUNNING")
            else:
                client.set_terminated(run.id, status, end_time=end_ms)

        if status == run.status and not tags:
            return True
        if self.call("set a run's status", update) is None:
            return False
        run.status = status
        self.writes += 1
        return True


class Tracking(Callback):
    """A Tune callback that tracks a run in MLflow: every hook guarded, so that nothing it does can stop a study. It
    pickles as the arguments it was made with (no client, no storage object, no URL); setup() calls _start()."""

    def __init__(self, *args: Any) -> None:
        self._args = args
        self._broken = False

    def __getstate__(self) -> dict:
        return {"_args": self._args}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["_args"])

    def setup(self, **info: Any) -> None:
        self.guard(self._start)

    def _start(self) -> None:  # connect, find the runs, catch up
        raise NotImplementedError

    def guard(self, fn: Callable, *args: Any) -> Any:
        if self._broken:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - tracking must never end a study
            self._broken = True
            ml = getattr(self, "ml", None)
            log.warning(
                "fer-tune: MLflow tracking stopped (%s: %s); the study goes on without it",
                type(exc).__name__,
                ml.why(exc) if ml is not None else str(exc)[:300],
            )
            return None

    def connect(self, ml: Mlflow) -> bool:
        try:
            ml.open()
        except FerTuneError as exc:
            self._broken = True
            log.warning("fer-tune: %s; the study goes on without MLflow", exc)
            return False
        return True


def attach(tuner: Any, tracking: Tracking | None) -> None:
    """A Tuner (new or restored) with this tracking callback, in place of any other."""
    run_config = internals.tuner_run_config(tuner)
    if run_config is None:
        if tracking is not None:
            log.warning(
                "fer-tune: --mlflow needs the driver on the cluster (--address auto), not Ray Client; not tracked"
            )
        return
    kept = [c for c in (run_config.callbacks or []) if not isinstance(c, Tracking)]
    run_config.callbacks = kept + ([tracking] if tracking is not None else [])


@functools.cache
def source_tags() -> dict:
    """MLflow's own tags for who ran what: the user, fer-tune and its git commit (when it runs from a checkout)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name in the environment nor in the password database
        user = "unknown"
    tags = {"mlflow.user": user, "mlflow.source.name": "fer-tune", "mlflow.source.type": "LOCAL"}
    code = code_revision()
    return {**tags, "mlflow.source.git.commit": code["sha"]} if code else tags


def numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
