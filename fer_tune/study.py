"""The study engine: a search space + data -> a Ray Tune experiment driven by Optuna, resumable and extendable.

results/NAME/       (on the driver)
    study.json      what was launched: spec, data source, Optuna storage, Ray storage, runs, fingerprint
    space.yaml      a copy of the space file as launched
    optuna.db       the Optuna study (sqlite, unless --optuna-storage points elsewhere)
    tune/           Ray's experiment directory of the sweep (trial dirs, checkpoints, experiment state)
    extend-1/ ...   one Ray experiment per `fer-tune extend`
    trials.csv      one row per trial, rewritten at the end of every run
    .lock           who runs the study now (sweep, resume and extend hold it; see fer_tune.lock)

With --storage URI|DIR (a cluster's shared storage) tune/ and extend-N/ live in URI/NAME/ instead; study.json
records it as `ray_storage` and fer_tune.storage reads them from there.

Every trial runs fer_tune.train.fit; the few lines in `_trial` turn its per-epoch callback into
`ray.tune.report(metrics, checkpoint=...)`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .common import NAME_RULE, FerTuneError, is_plain_name, write_json
from .lock import acquire
from .spaces import StudySpec, load_space, parse_space
from .storage import experiment_dir, study_storage
from .trials import write_trials_csv

STUDY_FILE = "study.json"
SNAPSHOT_S = "3"  # TUNE_GLOBAL_CHECKPOINT_S: a crash redoes at most a few seconds of bookkeeping


# ---------------------------------------------------------------------------------------------------------
# the trial: fit() inside Ray Tune
# ---------------------------------------------------------------------------------------------------------
class _Splits:
    """The uint8 arrays from Ray's object store (read-only, shared by the trials of a node)."""

    def __init__(self, arrays: dict):
        self._arrays = arrays

    def arrays(self, split: str):
        return self._arrays[split]


def _trial(config: dict, *, base: dict, data: dict, weight: float, crash: str = "",
           renames: dict | None = None) -> None:
    import ray
    from ray import tune

    from .config import TrainConfig
    from .spaces import train_keys
    from .train import fit, load_checkpoint, save_checkpoint, select_device

    cfg = TrainConfig.from_dict({**base, **train_keys(config, renames or {})}, source="trial config")
    from .checkpoints import restore, write_meta

    checkpoint = tune.get_checkpoint()
    state = restore(checkpoint, lambda d: load_checkpoint(d / "state.pt")) if checkpoint is not None else None
    trial_start = time.time()
    fail_at = None
    if crash:  # test hook "MARKER_FILE:EPOCH": the first trial to get here crashes once at EPOCH
        marker, _, epoch = crash.rpartition(":")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, tune.get_context().get_trial_id().encode())
            os.close(fd)
            fail_at = int(epoch)
        except FileExistsError:
            pass
    start_epoch = int(state["epoch"]) if state else 0
    trial_id = tune.get_context().get_trial_id()
    node = ray.util.get_node_ip_address()
    node_id = ray.get_runtime_context().get_node_id()[:12]
    device = select_device()

    def on_epoch(metrics: dict, st: dict | None):
        # the metric first: Tune's progress table shows the first few columns
        first = [k for k in ("val_acc", "best_val_acc", "epoch", "val_loss") if k in metrics]
        out = {k: metrics[k] for k in first + [k for k in metrics if k not in first]
               if isinstance(metrics[k], (int, float, str, bool))}
        out.update(node=node, node_id=node_id, device=str(device), start_epoch=start_epoch,
                   trial_start=trial_start, trial_id=trial_id, **_memory_mb())
        if st is None:  # diverged: no checkpoint, the study goes on
            out.setdefault("val_acc", 0.0)
            out["device_seconds"] = 0.0
            tune.report(out)
            return False
        out["device_seconds"] = weight * sum(h["epoch_seconds"] for h in st["history"])
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(st, Path(d) / "state.pt")
            write_meta(Path(d), out)
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))
        return None

    fit(cfg, data=_Splits(data), device=device, checkpoint=state, on_epoch=on_epoch, fail_at_epoch=fail_at)


def _memory_mb() -> dict:
    """This trial process's resident memory: rss (shared pages counted in full), pss (shared pages split between
    the processes that map them) and uss (private pages only; the dataset in Ray's object store is not in it);
    store_rss / store_pss: the part that is Ray's object store (its /dev/shm plasma mapping), where the dataset
    lives: a store_pss well under store_rss means other processes map the same pages."""
    kb: dict[str, int] = {}
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                kb[key] = int(rest.split()[0])
        in_store = False
        with open("/proc/self/smaps") as fh:
            for line in fh:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:  # a mapping's header line
                    in_store = "/plasma" in line
                elif in_store and line.startswith(("Rss:", "Pss:")):
                    key = "store_" + line[:3]
                    kb[key] = kb.get(key, 0) + int(line.split()[1])
    except (OSError, ValueError, IndexError):  # not Linux
        return {}
    return {"rss_mb": round(kb.get("Rss", 0) / 1024, 1), "pss_mb": round(kb.get("Pss", 0) / 1024, 1),
            "store_rss_mb": round(kb.get("store_Rss", 0) / 1024, 1),
            "store_pss_mb": round(kb.get("store_Pss", 0) / 1024, 1),
            "uss_mb": round((kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024, 1)}


# ---------------------------------------------------------------------------------------------------------
# Optuna searcher that survives crashes and restores, and records early stopping as pruning
# ---------------------------------------------------------------------------------------------------------
def _searcher_class():
    import optuna
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class StudySearch(OptunaSearch):
        """OptunaSearch on a persistent storage that (1) ignores Tune's repeated reports for trials the DB
        already holds as finished (a trial that finished after Tune's last snapshot runs again on resume),
        (2) on restore marks RUNNING DB trials Tune does not know as FAIL and draws a fresh sampler seed (so
        old suggestions are not replayed), (3) tells ASHA-stopped trials as PRUNED and diverged ones as FAIL,
        (4) never pickles the storage URL (it may hold a password): it is re-resolved on restore."""

        def __init__(self, *, storage_ref: str, study_name: str, max_epochs: int, **kw):
            self._storage_ref = storage_ref
            self._max_epochs = max_epochs
            self._last: dict[str, dict] = {}
            self._orphans: list[int] = []
            super().__init__(storage=resolve_storage(storage_ref), study_name=study_name, **kw)

        def _db_state(self, trial_id: str):
            ot = self._ot_trials.get(trial_id)
            if ot is None:
                return None
            return self._ot_study._storage.get_trial(ot._trial_id).state

        def suggest(self, trial_id: str):
            if trial_id not in self._ot_trials and self._orphans:
                # a trial asked after Tune's last snapshot: Tune forgot it, so hand its (already sampled)
                # params to the next Tune trial instead of asking a new one; the study keeps num_samples trials
                self._ot_trials[trial_id] = optuna.Trial(self._ot_study, self._orphans.pop(0))
            params = super().suggest(trial_id)
            ot = self._ot_trials[trial_id]
            self._ot_study._storage.set_trial_user_attr(ot._trial_id, "ray_trial_id", trial_id)
            return params

        def _report(self, trial_id: str, result: dict) -> None:
            """The epoch's metric as an Optuna intermediate value (step = epoch, stable across restarts)."""
            if self.metric in result and "epoch" in result and result.get("status") != "diverged":
                ot = self._ot_trials[trial_id]
                if int(result["epoch"]) not in self._ot_study._storage.get_trial(ot._trial_id).intermediate_values:
                    ot.report(float(result[self.metric]), int(result["epoch"]))

        def on_trial_result(self, trial_id: str, result: dict):
            state = self._db_state(trial_id)
            if state is None or state.is_finished():
                return
            self._last[trial_id] = result
            self._report(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            state = self._db_state(trial_id)
            if state is None or state.is_finished():
                self._completed_trials.add(trial_id)
                return
            result = result or self._last.get(trial_id) or {}
            ot = self._ot_trials[trial_id]
            storage = self._ot_study._storage
            self._report(trial_id, result)  # Tune hands the last result only to on_trial_complete
            values = storage.get_trial(ot._trial_id).intermediate_values.values()
            status = result.get("status")
            epochs = int(result.get("epoch", 0) or 0)
            if error or status == "diverged" or not values:
                storage.set_trial_user_attr(ot._trial_id, "status", "diverged" if status == "diverged" else "error")
                self._tell(ot, state=TrialState.FAIL)
            elif epochs < self._max_epochs:  # stopped early by the scheduler (ASHA, median)
                storage.set_trial_user_attr(ot._trial_id, "status", "pruned")
                self._tell(ot, state=TrialState.PRUNED)
            else:  # the trial's value: its best epoch (the checkpoint a user would keep)
                storage.set_trial_user_attr(ot._trial_id, "status", "completed")
                self._tell(ot, (max if self.mode == "max" else min)(values))
            self._completed_trials.add(trial_id)
            self._last.pop(trial_id, None)

        def _tell(self, ot, *args, **kw):
            try:
                self._ot_study.tell(ot, *args, **kw)
            except RuntimeError as exc:  # GridSampler calls study.stop() after the last grid point
                if "Study.stop" not in str(exc):
                    raise

        # pickling (tuner.pkl, searcher state): no storage object, no URL; reconnect from the reference
        def __getstate__(self):
            state = {k: v for k, v in self.__dict__.items() if k not in ("_ot_study", "_ot_trials", "_storage")}
            state["_ot_trial_ids"] = {tid: t._trial_id for tid, t in self.__dict__.get("_ot_trials", {}).items()}
            state["_has_study"] = self.__dict__.get("_ot_study") is not None
            return state

        def __setstate__(self, state):
            state = dict(state)
            ids = state.pop("_ot_trial_ids", {})
            has_study = state.pop("_has_study", False)
            self.__dict__.update(state)
            self._storage = resolve_storage(self._storage_ref)
            self._ot_trials = {}
            self._ot_study = None
            if has_study:
                optuna.logging.set_verbosity(optuna.logging.WARNING)
                self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                                   sampler=self._sampler)
                self._ot_trials = {tid: optuna.Trial(self._ot_study, i) for tid, i in ids.items()}

        def save(self, checkpoint_path: str):
            import pickle

            state = self.__getstate__()
            state.pop("_space", None)  # the define-by-run closure lives in tuner.pkl (cloudpickle)
            with open(checkpoint_path, "wb") as fh:
                pickle.dump(state, fh)

        def restore(self, checkpoint_path: str):
            import pickle

            with open(checkpoint_path, "rb") as fh:
                self.__setstate__(pickle.load(fh))
            # a fresh seed: the pickled sampler would replay the suggestions made after the last snapshot
            self._sampler.reseed_rng()
            known = {t._trial_id for t in self._ot_trials.values()}
            self._orphans = [t._trial_id for t in self._ot_study.get_trials(deepcopy=False, states=(
                TrialState.RUNNING, TrialState.WAITING)) if t._trial_id not in known]

    return StudySearch


def _stopper_class():
    from ray.tune import Stopper

    class FinishedInStudy(Stopper):
        """Stops a trial that restarted (a resume, a retry) although the Optuna study already holds it as completed
        or pruned: it finished after Tune's last saved state, so Tune runs it again from an older checkpoint.
        Checked at the first result after each start, in the driver (which always reaches the Optuna storage);
        errored trials are retried as before."""

        def __init__(self, storage_ref: str, study_name: str):
            self._ref, self._name = storage_ref, study_name
            self._done: set[str] | None = None

        def __call__(self, trial_id: str, result: dict) -> bool:
            if result.get("iterations_since_restore") != 1:
                return False
            if self._done is None:  # read once: only trials that finished before this driver started can rerun
                import optuna

                optuna.logging.set_verbosity(optuna.logging.WARNING)
                study = optuna.load_study(study_name=self._name, storage=resolve_storage(self._ref))
                self._done = {t.user_attrs.get("ray_trial_id") for t in study.get_trials(
                    deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))}
            return trial_id in self._done

        def __getstate__(self):  # pickled into Tune's state: the set is read again by the next driver
            return {**self.__dict__, "_done": None}

        def stop_all(self) -> bool:
            return False

    return FinishedInStudy


def _tensorboard_callback():
    """Tune's TensorBoard logger (event files in every trial directory) without torch in the driver: tensorboardX
    imports torch if it can (`try: import torch`, for tensor inputs), which cost about 2 s of CPU before the
    first trial could start. Tune logs plain numbers, which tensorboardX writes with numpy."""
    import sys

    from ray.tune.logger import TBXLoggerCallback

    class NumpyTBXLoggerCallback(TBXLoggerCallback):
        def __init__(self):
            block = "torch" not in sys.modules and "tensorboardX" not in sys.modules
            if block:
                sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
            try:
                super().__init__()
            finally:
                if block:
                    del sys.modules["torch"]

    return NumpyTBXLoggerCallback()


def resolve_storage(ref: str):
    """'sqlite:///...', 'env:VAR' (the URL read from the environment, e.g. with a password) or any SQLAlchemy URL."""
    import optuna

    url = ref
    if ref.startswith("env:"):
        url = os.environ.get(ref[4:], "")
        if not url:
            raise FerTuneError(f"storage {ref}: the environment variable {ref[4:]} is not set on this machine")
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite")
                                      else {"connect_args": {"timeout": 60}})


def _storage_ref(arg: str | None, sdir: Path) -> str:
    """The Optuna storage reference recorded in study.json (`storage`): --optuna-storage, else sqlite in sdir."""
    if not arg:
        return f"sqlite:///{sdir / 'optuna.db'}"
    if arg.startswith("env:"):
        return arg
    if "://" not in arg:
        raise FerTuneError(f"--optuna-storage {arg}: give a SQLAlchemy URL (sqlite:////ABS/PATH/optuna.db, "
                           "postgresql://USER@HOST/DB) or env:VAR naming an environment variable that holds one; "
                           "--storage is where Ray keeps checkpoints and results")
    from urllib.parse import urlsplit

    if urlsplit(arg).password:
        raise FerTuneError("--optuna-storage: the URL holds a password, which would be written to the study files; "
                           "put the URL in an environment variable and pass --optuna-storage env:VARNAME")
    return arg


def _scheduler(spec: StudySpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    es = spec.early_stopping
    if es["type"] == "asha":

        class ResumableASHA(ASHAScheduler):
            """ASHA whose rungs are rebuilt from the results trials reported before an interruption (Ray does
            not save them): after a resume it prunes as strictly as an uninterrupted study."""

            def __init__(self, history_dirs: list[str], **kw):
                super().__init__(**kw)
                self._history_dirs = history_dirs
                self._seeded = False

            def on_trial_add(self, tune_controller, trial):
                super().on_trial_add(tune_controller, trial)
                if not self._seeded:
                    self._seeded = True
                    n = self.seed_rungs()
                    if n:
                        print(f"ASHA: rebuilt its rungs from {n} results reported before the interruption",
                              flush=True)

            def seed_rungs(self) -> int:
                from .trials import read_results

                n = 0
                for tid, rows in read_results(self._history_dirs).items():
                    for bracket in self._brackets:
                        for row in rows:
                            if self._metric not in row or self._time_attr not in row:
                                continue
                            it, rew = row[self._time_attr], self._metric_op * row[self._metric]
                            for milestone, recorded in bracket._rungs:
                                if it < milestone or tid in recorded:
                                    continue
                                recorded[tid] = rew
                                n += 1
                                break
                return n

        return ResumableASHA(history_dirs=[], metric=spec.metric, mode=spec.mode, max_t=spec.max_epochs,
                             grace_period=es["grace_period"], reduction_factor=es["reduction_factor"],
                             time_attr="epoch")
    if es["type"] == "median":
        return MedianStoppingRule(metric=spec.metric, mode=spec.mode, time_attr="epoch",
                                  grace_period=es["grace_period"], min_samples_required=3)
    return FIFOScheduler()


# ---------------------------------------------------------------------------------------------------------
# study files
# ---------------------------------------------------------------------------------------------------------
def _versions() -> dict:
    import optuna
    import ray

    from . import __version__

    return {"fer_tune": __version__, "torch": _torch_version(), "ray": ray.__version__, "optuna": optuna.__version__}


def _torch_version() -> str:
    """torch.__version__ (with its local part, e.g. 2.14.1+cu130) read from torch/version.py: the driver never
    imports torch (about 2.5 s of a study's start; the trials import it)."""
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


def read_study(sdir: str | Path) -> dict:
    sdir = Path(sdir)
    f = sdir / STUDY_FILE
    if not f.is_file():
        hint = " (it does not exist)" if not sdir.exists() else f" ({sdir} has no {STUDY_FILE})"
        raise FerTuneError(f"{sdir} is not a fer-tune study directory{hint}; start one with fer-tune sweep")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise FerTuneError(f"{f} is damaged ({exc}); the study cannot be resumed from it") from None


def _write_study(sdir: Path, record: dict) -> None:
    write_json(sdir / STUDY_FILE, record)


def _fingerprint(spec: StudySpec, data) -> dict:
    return {"space_sha256": spec.sha256, "data_source": data.source, "data_fingerprint": data.fingerprint,
            "protocol": data.protocol, "versions": _versions()}


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# ---------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------
def _tune_env(quiet: bool) -> None:
    """Tune settings read from the environment; set before ray.tune is imported."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", SNAPSHOT_S)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0" if quiet else "1"
    # Tune keeps every checkpoint's entry (fer_tune.checkpoints deletes the files): without their metrics, so
    # that the experiment state it saves every few seconds stays small
    os.environ.setdefault("TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE", "1")


# Tune starts at most TUNE_MAX_PENDING_TRIALS_PG trials at a time, and only 1 with a searcher like ours: the second
# trial's worker would start only once the first one's had (about 5 s later on this 2-CPU machine), and an
# autoscaler would see one waiting trial at a time. fer-tune sets it (unless the user did) to --max-concurrent,
# else to the number of trials the cluster's resources hold now.
_USER_PENDING = os.environ.get("TUNE_MAX_PENDING_TRIALS_PG", "")


def _trials_that_fit(res: dict) -> int:
    import ray

    total = ray.cluster_resources()
    fits = [int(total.get(key.upper(), 0) / res[key] + 1e-9) for key in ("cpu", "gpu") if res[key]]
    return max(1, min(fits, default=1))


def _init_ray(address: str | None, quiet: bool, num_cpus: int | None = None) -> bool:
    """Start (or join) Ray; returns True when this call started it (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    # trial workers' logs (one "Checkpoint successfully created" line per epoch) stay in Ray's log files;
    # Tune's own progress tables and trial error reports print in the driver
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": True,
                          "logging_level": "WARNING"}
    if num_cpus is not None:
        if address:
            raise FerTuneError("--num-cpus applies to a local Ray only; a cluster's CPUs are set where it starts")
        kw["num_cpus"] = num_cpus
    from . import signals

    try:
        with _own_session_for_ray_daemons():
            ray.init(address=address, **kw)
    except ConnectionError as exc:
        raise FerTuneError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
    signals.install()  # SIGTERM / SIGHUP as Ctrl-C, in place of Ray's handler
    return True


@contextmanager
def _own_session_for_ray_daemons():
    """The local Ray's daemons (GCS, raylet and through it the trial workers) start in a session of their own, so
    that a signal to the driver's whole process group (a closed terminal, a batch system's SIGTERM, `kill -TERM
    -PGID`) reaches only the driver, which then stops the trials and saves the study before it stops them. They
    still end with the driver (Ray ties them to it) and Ctrl-C reaches them as before (Ray masks it for them).
    Ray starts them through `ray._private.services.ConsolePopen`; where a Ray release lacks it, nothing changes."""
    from ray._private import services

    popen = getattr(services, "ConsolePopen", None)
    if popen is None:
        yield
        return

    class SessionPopen(popen):
        def __init__(self, *args, **kw):
            kw.setdefault("start_new_session", True)
            super().__init__(*args, **kw)

    services.ConsolePopen = SessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = popen


def _shutdown_ray() -> None:
    import ray

    from . import signals

    ray.shutdown()
    signals.restore()


def _start(address: str | None, quiet: bool, num_cpus: int | None, loc: str, resources: dict, fix: str,
           what: str = "trial") -> bool:
    """Start or join Ray, check that one `what` of `resources` fits (else `fix` says which flags help) and that
    the Ray storage `loc` suits it; True when this call started Ray (the study and the final stage both start
    here)."""
    _tune_env(quiet)
    started = _init_ray(address, quiet, num_cpus)
    try:
        from .preflight import check_study_storage, check_trials_fit

        check_study_storage(loc, address, resources)  # a refusal comes before the note that we wait for nodes
        check_trials_fit(resources, address, fix, what)
    except BaseException:
        if started:
            _shutdown_ray()
        raise
    return started


def _stop(started: bool) -> None:
    if started:
        _shutdown_ray()


def _run(sdir: Path, record: dict, spec: StudySpec, data, run: dict, *, restore: bool, address: str | None,
         quiet: bool, num_cpus: int | None = None) -> int:
    _tune_env(quiet)
    crash = os.environ.get("FER_TUNE_CRASH_ONCE", "")  # test hook, see _trial
    from ray import tune

    import optuna

    from . import signals
    from .checkpoints import pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = _init_ray(address, quiet, num_cpus)
    try:
        res = spec.resources
        weight = res["gpu"] if res["gpu"] else res["cpu"]  # device-seconds per second of training
        base = spec.base_config()
        base["threads"] = base["threads"] or max(1, int(res["cpu"]))
        arrays = {s: data.arrays(s) for s in ("train", "val")}
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=base, data=arrays, weight=weight, crash=crash,
                                 renames=spec.renames()),
            resources={"cpu": res["cpu"], "gpu": res["gpu"]},
        )
        exp_dir = experiment_dir(sdir, record, run)
        max_conc = run.get("max_concurrent") or 0
        os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = _USER_PENDING or str(max_conc or _trials_that_fit(res))
        if restore and _has_state(exp_dir):
            tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            Search = _searcher_class()
            search = Search(space=spec.define_by_run(), metric=spec.metric, mode=spec.mode,
                            sampler=spec.make_sampler(run["seed"]), storage_ref=record["storage"],
                            study_name=record["optuna_study"], max_epochs=spec.max_epochs)
            scheduler = _scheduler(spec)
            if hasattr(scheduler, "_history_dirs"):  # rungs rebuilt from every run of the study on a restore
                scheduler._history_dirs = [experiment_dir(sdir, record, r) for r in record["runs"]]
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=run["num_samples"],
                                            max_concurrent_trials=max_conc or None, reuse_actors=True),
                run_config=tune.RunConfig(
                    name=run["dir"], storage_path=study_storage(sdir, record), verbose=0 if quiet else 1,
                    # Tune deletes no checkpoint: fer_tune.checkpoints keeps each trial's latest 3 and its best
                    failure_config=tune.FailureConfig(max_failures=2),
                    stop=_stopper_class()(record["storage"], record["optuna_study"]),
                    callbacks=[_tensorboard_callback(), pruner(latest=3, score=spec.metric, mode=spec.mode)],
                ),
            )
        t0 = time.time()
        interrupted = False
        try:
            grid = tuner.fit()
        except KeyboardInterrupt:
            interrupted, grid = True, None
        run["wall_seconds"] = run.get("wall_seconds", 0.0) + time.time() - t0
        _write_study(sdir, record)
        table = write_trials_csv(sdir, record)
        if interrupted or (grid is not None and _interrupted(exp_dir)):
            print(f"\nstudy interrupted; continue it with:\n    fer-tune resume {sdir}", flush=True)
            return signals.exit_code()
        _print_summary(sdir, spec, table)
        return 0
    finally:
        _stop(started)


def _has_state(exp_dir: str) -> bool:
    """True when a Ray experiment (local path or URI) holds Tune's state, so Tuner.restore can continue it."""
    from .storage import exists, join

    return exists(join(exp_dir, "tuner.pkl"))


def _interrupted(exp_dir: str, *, errors: bool = False) -> bool:
    """True when Ray's experiment state still holds trials that did not finish (a Ctrl-C, a killed driver);
    with errors=True, trials that errored out count as unfinished too (resume retries them)."""
    from .trials import experiment_trial_states

    done = ("TERMINATED",) if errors else ("TERMINATED", "ERROR")
    return any(s not in done for s in experiment_trial_states(exp_dir).values())


def _print_summary(sdir: Path, spec: StudySpec, table: list[dict]) -> None:
    done = [r for r in table if r["best_" + spec.metric] != ""]
    states: dict[str, int] = {}
    for r in table:
        states[r["state"]] = states.get(r["state"], 0) + 1
    print(f"\n{sdir}: {len(table)} trials ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))})")
    if done:
        key = "best_" + spec.metric
        best = (max if spec.mode == "max" else min)(done, key=lambda r: float(r[key]))
        params = {k[len("param_"):]: v for k, v in best.items() if k.startswith("param_") and v != ""}
        print(f"best: trial {best['number']} {spec.metric} {float(best[key]):.2f} at epoch {best['best_epoch']} "
              f"with {params}")
    errored = states.get("FAIL", 0)
    if errored:
        print(f"{errored} trial(s) diverged or errored (see the status column); `fer-tune resume {sdir}` retries "
              "errored ones")
    print(f"trials: {sdir / 'trials.csv'}")


def sweep(space_path: str, *, data_arg: str | None, name: str | None, results: str, storage: str | None,
          address: str | None, num_samples: int | None, max_concurrent: int | None, gpus: float | None,
          cpus: float | None, quiet: bool, loader, num_cpus: int | None = None,
          optuna_storage: str | None = None) -> int:
    """A new study. `storage`: Ray's storage for the experiment directories (a URI or shared path; the study
    gets a NAME folder there), default the study directory; `optuna_storage`: the Optuna DB URL or env:VAR."""
    spec = load_space(space_path)
    raw_overrides = {}
    if num_samples is not None:
        raw_overrides["num_samples"] = num_samples
    if gpus is not None or cpus is not None:
        raw_overrides["resources"] = {**spec.resources, **({"gpu": gpus} if gpus is not None else {}),
                                      **({"cpu": cpus} if cpus is not None else {})}
    if raw_overrides:
        spec = _spec_with(spec.text, raw_overrides, f"{space_path} (with command-line overrides)", spec.name)
    if max_concurrent is not None and max_concurrent < 1:
        raise FerTuneError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    sdir = study_dir(results, name, spec.name, space_path)
    name = sdir.name
    with acquire(sdir, what="the study", force=None, create=True):
        if (sdir / STUDY_FILE).exists():
            raise FerTuneError(f"{sdir} already holds a study; continue it with `fer-tune resume {sdir}`, add "
                               f"trials with `fer-tune extend {sdir} --num-samples N`, or choose another --name")
        return _sweep(spec, space_path, sdir, name, data_arg, raw_overrides, storage, address, max_concurrent,
                      quiet, loader, num_cpus, optuna_storage)


def study_dir(results: str, name: str | None, default: str, space_path: str) -> Path:
    """RESULTS/NAME for a new study, refused unless NAME is a plain name and the directory is inside RESULTS."""
    given = "--name" if name else f"the study name of {space_path}"
    name = name or default
    if not is_plain_name(name):
        raise FerTuneError(f"{given} {name!r}: {NAME_RULE} (it becomes RESULTS/NAME, Ray's storage prefix and the "
                           "Optuna study's name)" + ("" if given == "--name" else "; pass --name NAME"))
    root = Path(results).expanduser().resolve()
    sdir = (root / name).resolve()
    if sdir.parent != root:
        raise FerTuneError(f"{root / name} leads to {sdir}, outside the results root {root} (a symbolic link?); "
                           "choose another --name or --results")
    return sdir


def _sweep(spec: StudySpec, space_path: str, sdir: Path, name: str, data_arg: str | None, raw_overrides: dict,
           storage: str | None, address: str | None, max_concurrent: int | None, quiet: bool, loader,
           num_cpus: int | None, optuna_storage: str | None) -> int:
    from . import storage as st

    ray_storage = st.join(st.normalize(storage), name) if storage else None
    loc = ray_storage or str(sdir)
    if ray_storage and st.exists(st.join(ray_storage, "tune")):
        raise FerTuneError(f"the Ray storage {ray_storage} already holds a study's experiments; choose another "
                           "--name or --storage")
    optuna_ref = _storage_ref(optuna_storage, sdir)
    source = data_arg or spec.data.get("path") or "synthetic"
    from .data import is_synthetic

    if spec.data.get("required") and is_synthetic(source):
        raise FerTuneError(f"{space_path} is a study of real faces: pass --data PATH (FER2013's fer2013.csv or its "
                           "Kaggle image folders)" + (", not synthetic data" if data_arg else ""))
    protocol = spec.data.get("protocol", "paper")
    data = loader(source, protocol)
    # refuses a trial too big for a local Ray and a node-local path on a cluster, before any file is written
    started = _start(address, quiet, num_cpus, loc, spec.resources,
                     "pass --cpus-per-trial N and --gpus-per-trial F that fit it (--gpus-per-trial 0 on a machine "
                     "without a GPU), or --address to run on a Ray cluster")
    try:
        return _new_study(sdir, spec, space_path, raw_overrides, name, source, protocol, data, optuna_ref,
                          ray_storage, max_concurrent, address=address, quiet=quiet, num_cpus=num_cpus)
    finally:
        _stop(started)


def _new_study(sdir: Path, spec: StudySpec, space_path: str, raw_overrides: dict, name: str, source: str,
               protocol: str, data, optuna_ref: str, ray_storage: str | None, max_concurrent: int | None, *,
               address: str | None, quiet: bool, num_cpus: int | None) -> int:
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / "space.yaml").write_text(spec.text)
    record = {
        "name": name, "space_file": str(Path(space_path).resolve()), "spec": spec.to_dict(),
        "overrides": raw_overrides, "data": {"source": source, "protocol": protocol, **data.describe()},
        "storage": optuna_ref, "ray_storage": ray_storage, "optuna_study": name,
        "fingerprint": _fingerprint(spec, data),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": [{"dir": "tune", "num_samples": spec.num_samples, "seed": spec.seed,
                  "max_concurrent": max_concurrent}],
    }
    _write_study(sdir, record)
    print(f"study {name}: {spec.num_samples} trials of at most {spec.max_epochs} epochs, sampler {spec.sampler}, "
          f"early stopping {spec.early_stopping['type']}, {spec.resources['cpu']} CPU / {spec.resources['gpu']} "
          f"GPU per trial, data {source} ({protocol}); results in {sdir}"
          + (f", Ray storage {ray_storage}" if ray_storage else ""), flush=True)
    return _run(sdir, record, spec, data, record["runs"][0], restore=False, address=address, quiet=quiet,
                num_cpus=num_cpus)


def _spec_with(text: str, overrides: dict, source: str, name: str) -> StudySpec:
    """The spec of a space file's text with the command-line overrides a study was launched with."""
    import yaml

    return parse_space({**yaml.safe_load(text), **overrides}, source=source, text=text, default_name=name)


def _reopen(sdir: Path, force: bool, loader) -> tuple[dict, StudySpec, Any]:
    record = read_study(sdir)
    spec = _spec_with((sdir / "space.yaml").read_text(), record["overrides"], str(sdir / "space.yaml"),
                      record["name"])
    data = loader(record["data"]["source"], record["data"]["protocol"])
    now = _fingerprint(spec, data)
    changes = _diff(record["fingerprint"], now)
    space_file = Path(record["space_file"])
    if space_file.is_file() and space_file.read_text() != spec.text:
        changes.append(f"space file {space_file} was edited since the study started (the study keeps its copy)")
    if changes and not force:
        raise FerTuneError(f"{sdir}: the study's inputs changed since it started: " + "; ".join(changes)
                           + ". Pass --force to continue anyway.")
    return record, spec, data


_RESUME_FIX = ("the study was launched with these resources per trial: run it on a Ray cluster that has them "
               "(--address), or on this machine with --num-cpus N to let Ray count more CPUs than it found")


def resume(sdir: str, *, force: bool, address: str | None, quiet: bool, loader,
           num_cpus: int | None = None) -> int:
    sdir_p = Path(sdir).resolve()
    read_study(sdir_p)  # a study directory, before a lock is made in it
    with acquire(sdir_p, what="the study", force=force):
        return _resume(sdir_p, force=force, address=address, quiet=quiet, loader=loader, num_cpus=num_cpus)


def _resume(sdir_p: Path, *, force: bool, address: str | None, quiet: bool, loader, num_cpus: int | None) -> int:
    record, spec, data = _reopen(sdir_p, force, loader)
    run = record["runs"][-1]
    exp = experiment_dir(sdir_p, record, run)
    if not _has_state(exp):
        raise FerTuneError(f"{exp} holds no Ray experiment state; nothing to resume")
    if not _interrupted(exp, errors=True):
        table = write_trials_csv(sdir_p, record)
        print(f"{sdir_p}: the study is complete; nothing to resume "
              f"(add trials with fer-tune extend {sdir_p} --num-samples N)")
        _print_summary(sdir_p, spec, table)
        return 0
    print(f"resuming study {record['name']} ({run['dir']}) in {sdir_p}", flush=True)
    started = _start(address, quiet, num_cpus, study_storage(sdir_p, record), spec.resources, _RESUME_FIX)
    try:
        return _run(sdir_p, record, spec, data, run, restore=True, address=address, quiet=quiet,
                    num_cpus=num_cpus)
    finally:
        _stop(started)


def extend(sdir: str, *, num_samples: int, force: bool, address: str | None, quiet: bool, loader,
           num_cpus: int | None = None) -> int:
    sdir_p = Path(sdir).resolve()
    if num_samples < 1:
        raise FerTuneError(f"--num-samples must be >= 1, got {num_samples}")
    read_study(sdir_p)
    with acquire(sdir_p, what="the study", force=force):
        return _extend(sdir_p, num_samples=num_samples, force=force, address=address, quiet=quiet, loader=loader,
                       num_cpus=num_cpus)


def _extend(sdir_p: Path, *, num_samples: int, force: bool, address: str | None, quiet: bool, loader,
            num_cpus: int | None) -> int:
    record, spec, data = _reopen(sdir_p, force, loader)
    last = record["runs"][-1]
    last_exp = experiment_dir(sdir_p, record, last)
    if _has_state(last_exp) and _interrupted(last_exp):
        raise FerTuneError(f"{sdir_p}: the last run ({last['dir']}) is unfinished; fer-tune resume {sdir_p} first")
    if spec.sampler == "grid":
        import optuna

        done = len(optuna.load_study(study_name=record["optuna_study"],
                                     storage=resolve_storage(record["storage"])).trials)
        left = spec.grid_size() - done
        if num_samples > left:
            raise FerTuneError(f"the grid has {spec.grid_size()} points and {done} were tried; "
                               f"extend by at most {left}")
    started = _start(address, quiet, num_cpus, study_storage(sdir_p, record), spec.resources, _RESUME_FIX)
    try:
        return _extend_run(sdir_p, record, spec, data, num_samples, last, address=address, quiet=quiet,
                           num_cpus=num_cpus)
    finally:
        _stop(started)


def _extend_run(sdir_p: Path, record: dict, spec: StudySpec, data, num_samples: int, last: dict, *,
                address: str | None, quiet: bool, num_cpus: int | None) -> int:
    k = len(record["runs"])
    run = {"dir": f"extend-{k}", "num_samples": num_samples, "seed": spec.seed + 1000 * k,
           "max_concurrent": last.get("max_concurrent")}
    record["runs"].append(run)
    _write_study(sdir_p, record)
    print(f"extending study {record['name']} by {num_samples} trials ({run['dir']}); the sampler sees all "
          "earlier trials", flush=True)
    return _run(sdir_p, record, spec, data, run, restore=False, address=address, quiet=quiet, num_cpus=num_cpus)
