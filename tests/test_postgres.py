"""Studies on a real PostgreSQL server (tests/pgserver.py starts one per module): the password only in the
environment, two studies on one database at once, the server restarted mid-study, then the driver SIGKILLed and the study
resumed with nothing lost. Skipped where PostgreSQL is not installed, unless FER_TUNE_REQUIRE_POSTGRES is set (CI)."""

import os
import signal
import subprocess
import threading
import time

import pytest
from conftest import cli_args, fer_tune, kill_at_pause, pausing, read_csv, write_space
from pgserver import PgServer, pg_bin

ENV_VAR = "FER_TUNE_TEST_PG_URL"


@pytest.fixture(scope="module")
def pg():
    pytest.importorskip("psycopg")
    bindir = pg_bin()
    if bindir is None:
        if os.environ.get("FER_TUNE_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    server = PgServer(bindir)
    server.start()
    yield server
    server.close()


def trials_of(url: str, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=url).trials


def files_hold(root, text: str) -> list[str]:
    """The files under root whose bytes contain `text` (tuner.pkl, experiment state, logs, everything)."""
    return [str(f) for f in root.rglob("*") if f.is_file() and text.encode() in f.read_bytes()]


def test_a_storage_call_waits_while_the_server_is_down(pg):
    """The retrying storage itself: a call made while the server is stopped returns once it is back."""
    from fer_tune.tune.study.record import resolve_storage

    url = pg.create_db("retry")
    storage = resolve_storage(url)
    study_id = storage.create_new_study([], "r")
    pg.halt()
    restart = threading.Timer(3.0, pg.start)
    restart.start()
    t0 = time.monotonic()
    try:
        assert storage.get_study_name_from_id(study_id) == "r"
    finally:
        restart.join()
    assert time.monotonic() - t0 >= 2.5  # it waited for the server


def open_at_once(url: str, drivers: int) -> tuple[list[str], list[str]]:
    """`drivers` threads open the storage at url at the same moment and each creates a study: (names, errors)."""
    from fer_tune.tune.study.record import resolve_storage

    start, errors, names = threading.Barrier(drivers), [], []

    def open_and_use(i: int) -> None:
        start.wait()
        try:
            storage = resolve_storage(url)
            names.append(storage.get_study_name_from_id(storage.create_new_study([], f"s{i}")))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    threads = [threading.Thread(target=open_and_use, args=(i,)) for i in range(drivers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return sorted(names), errors


def test_drivers_opening_a_fresh_database_at_the_same_moment_all_get_it(pg):
    """Four drivers race to create Optuna's schema on a new database (studies started together): none fails."""
    for round_ in range(3):
        names, errors = open_at_once(pg.create_db(f"fresh{round_}"), 4)
        assert errors == [] and names == ["s0", "s1", "s2", "s3"], errors


def test_two_studies_on_one_database_at_once_with_the_password_only_in_the_environment(pg, tmp_path, env):
    url = pg.create_db("shared")
    env = {**env, ENV_VAR: url}
    results = tmp_path / "results"
    procs = {}
    for name, seed in (("a", 0), ("b", 1)):
        (tmp_path / name).mkdir()
        space = write_space(tmp_path / name, name=name, seed=seed)
        procs[name] = subprocess.Popen(
            cli_args("sweep", space, "--results", results, "--optuna-storage", f"env:{ENV_VAR}", "--quiet", num_cpus=1),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, out[-2000:], err[-3000:])
        assert pg.password not in out + err
    for name in ("a", "b"):
        trials = trials_of(url, name)
        assert len(trials) == 6 and all(t.state.is_finished() for t in trials), name
        assert len(read_csv(results / name)) == 6
    # the password is in no file either study wrote (study.json records env:VAR)
    assert files_hold(results, pg.password) == []
    assert files_hold(results, f"env:{ENV_VAR}")  # what is recorded instead
    r = fer_tune(env, "status", results / "a")
    assert r.returncode == 0 and "6/6 trials finished" in r.stdout


def start_sweep(space, results, env, num_cpus: int = 2, **popen) -> subprocess.Popen:
    """`fer-tune sweep SPACE` on the PostgreSQL storage named by ENV_VAR, as a background process."""
    args = cli_args(
        "sweep", space, "--results", results, "--optuna-storage", f"env:{ENV_VAR}", "--quiet", num_cpus=num_cpus
    )
    return subprocess.Popen(args, env=env, **popen)


def test_the_server_restarts_mid_study_then_a_sigkill_and_a_resume_lose_nothing(pg, tmp_path, env):
    url = pg.create_db("restarted")
    env = {**env, ENV_VAR: url}
    space = write_space(
        tmp_path, name="s", max_epochs=4, early_stopping={"type": "asha", "grace_period": 2, "reduction_factor": 2}
    )
    results = tmp_path / "results"
    marker = tmp_path / "paused"
    # the driver pauses (to be killed) after its 6th result: past the restart, whose outage holds it at the first
    # storage call after the first result
    proc = start_sweep(
        space,
        results,
        pausing(env, marker, results=6),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        deadline = time.time() + 240
        while not any((results / "s").glob("tune/*/result.json")):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.3)
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        pg.halt()  # every connection drops; back once the driver has met the closed door (not after a guessed time)
        while not any("the Optuna database went away" in line for line in lines):
            assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        pg.start()
        # the driver's storage calls waited for the server instead of failing the study, and said so
        while not any("the Optuna database is back" in line for line in lines):
            assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        assert not marker.exists()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    kill_at_pause(proc, marker)  # then a crash: the driver and its Ray, after results that followed the outage
    reader.join(timeout=60)
    before = trials_of(url, "s")
    assert before and not all(t.state.is_finished() for t in before) or len(before) < 6
    r = fer_tune(env, "resume", results / "s", "--quiet")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    trials = trials_of(url, "s")
    assert len(trials) == 6 and all(t.state.is_finished() for t in trials)  # no duplicates, none left running
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    assert len(read_csv(results / "s")) == 6 and files_hold(results, pg.password) == []
    assert "Traceback" not in "".join(lines)


def test_a_database_that_is_not_there_at_start_is_one_line(monkeypatch):
    pytest.importorskip("psycopg")
    from fer_tune.common import FerTuneError
    from fer_tune.tune.study import dbretry
    from fer_tune.tune.study.record import resolve_storage

    monkeypatch.setattr(dbretry, "CONNECT_SECONDS", 1.0)
    monkeypatch.setenv(ENV_VAR, "postgresql+psycopg://u:hunter2@127.0.0.1:1/db")  # nothing listens on port 1
    with pytest.raises(FerTuneError, match=f"storage env:{ENV_VAR}: the database cannot be reached") as info:
        resolve_storage(f"env:{ENV_VAR}")
    assert "hunter2" not in str(info.value) and "\n" not in str(info.value)
