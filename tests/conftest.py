import os
from pathlib import Path

import numpy as np
import pytest

# the real FER2013 for the tests that need it (skipped when absent): $FER2013_DIR, else ../shared/datasets/fer2013
REAL_DATA = Path(
    os.environ.get("FER2013_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "fer2013"
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own dataset cache, never ~/.cache."""
    monkeypatch.setenv("FER_TUNE_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True, scope="session")
def _fer_tune_logging():
    """fer-tune's lines on stderr as a command prints them, whichever test runs first in a process (tests of the
    library read what it logged, as a command's user would see it)."""
    from fer_tune.cli import _configure_logging

    _configure_logging()


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(1)


def rows(n, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 48, 48), dtype=np.uint8)
    labels = np.arange(n) % 7
    return images, labels


def write_challenge_csv(path, n_per_usage=(14, 7, 7), seed=0, mutate=None):
    """A small challenge CSV; `mutate(lines)` may edit the text lines (index 0 = header)."""
    images, labels = rows(sum(n_per_usage), seed)
    usage = ["Training"] * n_per_usage[0] + ["PublicTest"] * n_per_usage[1] + ["PrivateTest"] * n_per_usage[2]
    lines = ["emotion,pixels,Usage"] + [
        f"{l},{' '.join(map(str, img.reshape(-1)))},{u}" for img, l, u in zip(images, labels, usage)
    ]
    if mutate:
        mutate(lines)
    Path(path).write_text("\n".join(lines) + "\n")
    return images, labels, usage


# ---------------------------------------------------------------------------------------------------------
# studies and the CLI in subprocesses, each command with its own local Ray under a private RAY_TMPDIR
# ---------------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
# the small study the study, final-stage and cluster tests run
SPACE = {
    "name": "t",
    "description": "test study",
    "sampler": "tpe",
    "seed": 0,
    "num_samples": 6,
    "max_epochs": 4,
    "early_stopping": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "resources": {"cpu": 1, "gpu": 0},
    "data": {"path": "synthetic:500", "protocol": "paper"},
    "fixed": {"width": 0.0625, "train_crops": "one", "test_crops": "center", "batch_size": 32, "threads": 1},
    "space": {
        "optimizer": {"type": "categorical", "choices": ["sgd_nesterov", "adam"]},
        "lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    },
}
LOCAL_RAY_COMMANDS = ("sweep", "resume", "extend", "final", "demo")


def ray_env(cache: Path, **extra: str) -> tuple[dict, str]:
    """(the environment for fer-tune subprocesses, its RAY_TMPDIR to remove afterwards)."""
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    return {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "RAY_AUTH_MODE": "disabled",
        "FER_TUNE_CACHE": str(cache),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }, ray_tmp


@pytest.fixture
def env(tmp_path):
    import shutil

    e, ray_tmp = ray_env(tmp_path / "cache")
    yield e
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def module_env(tmp_path_factory):
    """One environment (and Ray temp dir) for a module's tests that share a study."""
    import shutil

    e, ray_tmp = ray_env(tmp_path_factory.mktemp("cache"))
    yield e
    shutil.rmtree(ray_tmp, ignore_errors=True)


def cli_args(*args, num_cpus: int | None = 2) -> list[str]:
    """`python -m fer_tune.cli ARGS`; commands that start a local Ray get an explicit CPU count."""
    import sys

    args = [*map(str, args)]
    if num_cpus is not None and args[0] in LOCAL_RAY_COMMANDS and not any(a.startswith("--num-cpus") for a in args):
        args.append(f"--num-cpus={num_cpus}")
    return [sys.executable, "-m", "fer_tune.cli", *args]


RAY_COMMANDS = (*LOCAL_RAY_COMMANDS, "pbt")
# the session Ray's CPUs (session_ray); FER_TUNE_TEST_RAY_CPUS=2 measures the suite with two trials at once
SESSION_RAY_CPUS = int(os.environ.get("FER_TUNE_TEST_RAY_CPUS", "1"))
_SESSION_RAY: list = []  # the test session's one local Ray for commands run in-process (started on first use)


def session_ray() -> None:
    """One local Ray (SESSION_RAY_CPUS, 1 by default; private RAY_TMPDIR) for every command the tests run
    in-process, started once: each command's own local Ray cost 9-14 s. fer-tune's commands join a running Ray
    (as the demo's sweep and final stage share one). One CPU: their trials run one at a time, in one trial process
    each (its PyTorch and Tune imports cost 3-4 CPU-seconds); two trials at once are the subject of the tests that
    run a command as a process with --num-cpus 2. Shut down at the end of the session (pytest_sessionfinish)."""
    import tempfile

    if _SESSION_RAY:
        return
    from fer_tune.tune.runtime.session import ray_session

    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled")
    ctx = ray_session(None, num_cpus=SESSION_RAY_CPUS, output="quiet")
    ctx.__enter__()
    _SESSION_RAY.append((ctx, ray_tmp))


def pytest_sessionfinish(session, exitstatus):
    import shutil

    while _SESSION_RAY:
        ctx, ray_tmp = _SESSION_RAY.pop()
        ctx.__exit__(None, None, None)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def run_in_process(env: dict, args: list[str], cwd=None):
    """`fer-tune ARGS` through fer_tune.cli.main in this process (the variables of `env` that differ from
    os.environ set for the call, stdout and stderr captured): a CompletedProcess as from a subprocess."""
    import contextlib
    import io
    import subprocess
    import traceback

    from fer_tune.cli import main
    from fer_tune.tune.runtime.progress import PAUSE_ENV

    if env.get(PAUSE_ENV):  # it would pause this process: a driver that pauses is killed, so it runs as one of its own
        raise RuntimeError(f"{PAUSE_ENV} is set: run the command with fer_tune(..., process=True) or Popen")
    if args[0] in RAY_COMMANDS:
        session_ray()
    saved, here = dict(os.environ), os.getcwd()
    os.environ.update({k: v for k, v in env.items() if k != "RAY_TMPDIR" and os.environ.get(k) != v})
    out, err = io.StringIO(), io.StringIO()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(args)
            except SystemExit as exc:  # argparse
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # as a subprocess would end: the traceback on stderr, exit 1
                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["fer-tune", *args], rc, out.getvalue(), err.getvalue())


def fer_tune(env, *args, timeout=300, cwd=None, num_cpus: int | None = 2, process: bool = False):
    """Run a fer-tune command; its CompletedProcess with text stdout / stderr. In this process by default, on the
    session's one local Ray; as a user does (a subprocess with its own local Ray) with `process=True`, where the
    process itself is under test (its local Ray's resources, signals, its exit), and for a cluster (--address,
    num_cpus None)."""
    import subprocess

    argv = cli_args(*args, num_cpus=num_cpus)
    if process or num_cpus is None or any(a.startswith("--address") for a in argv):
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return run_in_process(env, argv[3:], cwd=cwd)


def pausing(env: dict, marker: Path, results: int = 3) -> dict:
    """`env` for a driver that pauses (fer_tune.tune.runtime.progress.PauseAfter) once it has handled `results`
    trial results (with 2 trials at once, one of them has reported 2 epochs) and Tune has saved its state after
    them, and then writes `marker`: a known point to kill it at (kill_at_pause)."""
    from fer_tune.tune.runtime.progress import PAUSE_ENV

    # Tune saves its state at every step (not every 3 s): the pause comes right after the N-th result, before
    # fast trials have run on
    return {**env, PAUSE_ENV: f"{results}:{marker}", "TUNE_GLOBAL_CHECKPOINT_S": "0"}


def processes() -> list[tuple[int, str, dict]]:
    """(PID, command line, environment) of every process on this host that this user may read."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            entries = (d / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        out.append((int(d.name), cmd, dict(e.split("=", 1) for e in entries if "=" in e)))
    return out


def kill_at_pause(proc, marker: Path, within: float = 240.0) -> None:
    """SIGKILL a driver started with pausing(...) once it has paused, like a machine going away; then the local
    Ray of its session (it must have been started with start_new_session=True)."""
    import os
    import signal
    import time

    try:
        deadline = time.time() + within
        while not Path(marker).exists():
            assert proc.poll() is None, "the command ended before it paused"
            assert time.time() < deadline, f"the command did not pause within {within:.0f} s"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:  # (one that ended early is reaped already: its PID may be another's now)
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(1)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def sweep_small(env, root: Path, **changes) -> Path:
    """The small study (SPACE with `changes`) swept in `root`; its directory, results/t."""
    import yaml

    space = root / "t.yaml"
    space.write_text(yaml.safe_dump({**SPACE, **changes}, sort_keys=False))
    r = fer_tune(env, "sweep", space, "--results", root / "results", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "results" / "t"


@pytest.fixture(scope="session")
def small_study(tmp_path_factory):
    """The small study, 3 trials of at most 2 epochs, swept once for every module's tests of the stages after it
    (the final stage's, the PBT stage's): each writes its own stage directory in it, and no test changes the
    study itself."""
    import shutil

    e, ray_tmp = ray_env(tmp_path_factory.mktemp("cache"))
    yield sweep_small(e, tmp_path_factory.mktemp("study"), num_samples=3, max_epochs=2)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def write_space(tmp_path, **changes):
    import yaml

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({**SPACE, **changes}, sort_keys=False))
    return path


def study_trials(sdir, name="t"):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sdir / 'optuna.db'}").trials


def epochs_reported(sdir) -> int:
    """The most epochs any trial of the study in `sdir` has reported to its Optuna storage so far (0: none yet, or
    no storage yet). The driver writes each epoch there as the result arrives: the earliest sign a test can see
    that a trial has a checkpoint."""
    import sqlite3

    db = sdir / "optuna.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            (most,) = con.execute("SELECT MAX(step) FROM trial_intermediate_values").fetchone()
    except sqlite3.Error:
        return 0
    return int(most or 0)


def read_csv(sdir):
    import csv

    with open(sdir / "trials.csv") as fh:
        return list(csv.DictReader(fh))


# the files that take longest (each several minutes on one worker), longest first: pytest-xdist's --dist loadfile
# hands whole files to the workers in collection order, so the suite ends on short files on both workers instead
# of one worker running SLURM's tests alone at the end
LONG_FILES = (
    "test_slurm.py",
    "test_study.py",
    "test_interrupted.py",
    "test_final.py",
    "test_pbt.py",
    "test_final_ensemble.py",
    "test_postgres.py",
    "test_mlflow.py",
    "test_gpu_script.py",
    "test_multiobjective.py",
    "test_cluster.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist would order the files by their number of tests
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Tests that start Ray, a server (PostgreSQL: the `pg` fixture), a browser or a fer-tune process, train
    through the CLI or several models (the ensemble's `trained` members), or read the real FER2013 are `slow`:
    the fast lane, `pytest -m "not slow"`, is the tests of a second or two. The long files come first
    (LONG_FILES), each file's tests in their order."""
    first = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(LONG_FILES)))
    for item in items:
        if item.get_closest_marker("slow") is None and (
            item.get_closest_marker("realdata") is not None
            or any(
                f in getattr(item, "fixturenames", ())
                for f in ("env", "module_env", "study", "small_study", "cluster", "pg", "trained")
            )
        ):
            item.add_marker(pytest.mark.slow)
