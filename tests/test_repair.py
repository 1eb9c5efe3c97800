"""A study whose own Optuna database is damaged or lost: every command says so in one line, and `fer-tune repair`
rebuilds it from the trials' own results, so that the study goes on with the sampler's full history."""

import shutil
import sqlite3
import subprocess
import sys

import pytest
from conftest import fer_tune, kill_at_pause, pausing, study_trials, write_space

from fer_tune.cli import damaged_database
from fer_tune.common import FerTuneError
from fer_tune.tune.study.database import check_database, database_damage


def _same(t):
    """What a trial is to the sampler and to fer-tune's readers."""
    return (
        t.number,
        t.state.name,
        t.params,
        t.distributions,
        t.values,
        t.intermediate_values,
        t.user_attrs,
        t._trial_id,
    )


def _truncate(db, share):
    with open(db, "r+b") as fh:
        fh.truncate(int(db.stat().st_size * share))


def _optuna_db(path, trials=3):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    study = optuna.create_study(study_name="t", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=trials)
    storage.engine.dispose()
    return path


def test_what_is_wrong_with_a_database_is_said_in_one_line(tmp_path):
    good = _optuna_db(tmp_path / "good.db", trials=40)
    assert database_damage(good) is None
    cut = tmp_path / "cut.db"
    for share in (0.9, 0.4, 0.0):
        shutil.copy(good, cut)
        _truncate(cut, share)
        problem = database_damage(cut)
        assert problem and "\n" not in problem, (share, problem)
    shutil.copy(good, cut)
    with open(cut, "r+b") as fh:  # a page overwritten with garbage
        fh.seek(4096)
        fh.write(bytes(range(256)) * 16)
    assert database_damage(cut) and "\n" not in database_damage(cut)
    # the record of a study whose own database is missing: refused once trials ran, fine before any did
    sdir = tmp_path / "s"
    (sdir / "tune").mkdir(parents=True)
    record = {"storage": f"sqlite:///{sdir / 'optuna.db'}", "ray_storage": None, "runs": [{"dir": "tune"}]}
    check_database(sdir, record)
    (sdir / "tune" / "trial_1").mkdir()
    (sdir / "tune" / "trial_1" / "params.json").write_text('{"x": 0.5}')
    (sdir / "tune" / "trial_1" / "result.json").write_text('{"trial_id": "a1", "epoch": 1}\n')
    with pytest.raises(FerTuneError, match=r"is missing while 1 trial\(s\) ran; .*fer-tune repair"):
        check_database(sdir, record)
    # damage found mid-command (sqlite's own error, wrapped by SQLAlchemy) is one line too
    wrapped = RuntimeError("while telling a trial")
    wrapped.__cause__ = sqlite3.DatabaseError("database disk image is malformed")
    assert "fer-tune repair" in damaged_database(wrapped) and "\n" not in damaged_database(wrapped)
    assert damaged_database(sqlite3.OperationalError("database is locked")) is None


def test_a_database_whose_writer_was_killed_mid_transaction_is_not_damaged(tmp_path):
    """A writer SIGKILLed mid-transaction (a SLURM requeue, a preemption) leaves a hot journal: read only, SQLite
    refuses the database ("attempt to write a readonly database"); it is rolled back, and nothing is lost."""
    import optuna

    db = _optuna_db(tmp_path / "optuna.db", trials=5)
    before = [_same(t) for t in optuna.load_study(study_name="t", storage=f"sqlite:///{db}").trials]
    kill = (
        "import os, signal, sqlite3, sys\n"
        "con = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "con.execute('PRAGMA cache_size=1')\n"  # the transaction's pages spill into the file before it commits
        "con.execute('BEGIN')\n"
        "con.execute('UPDATE trial_values SET value = value + 1')\n"
        "con.execute('CREATE TABLE filler (x)')\n"
        "con.executemany('INSERT INTO filler VALUES (?)', [(os.urandom(512),) for _ in range(400)])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", kill, str(db)], capture_output=True, timeout=60)
    assert r.returncode == -9 and (tmp_path / "optuna.db-journal").stat().st_size > 0
    ro = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly database"):  # what the check met before
        ro.execute("SELECT count(*) FROM trials").fetchone()
    ro.close()
    assert database_damage(db) is None
    after = optuna.load_study(study_name="t", storage=f"sqlite:///{db}").trials
    assert [_same(t) for t in after] == before


def test_a_lost_database_is_rebuilt_as_it_was_and_the_study_extends_on_it(tmp_path, env, small_study):
    sdir = tmp_path / "t"
    shutil.copytree(small_study, sdir)
    truth = [_same(t) for t in study_trials(sdir)]
    (sdir / "optuna.db").unlink()
    for command in (("status", sdir), ("report", sdir), ("extend", sdir, "--num-samples", "1")):
        r = fer_tune(env, *command)
        assert r.returncode == 2, (command, r.stderr[-2000:])
        assert "optuna.db, the study's Optuna database, is missing while 3 trial(s) ran" in r.stderr, r.stderr
        assert f"fer-tune repair {sdir}" in r.stderr and "Traceback" not in r.stderr
    assert not (sdir / "optuna.db").exists()  # no command made an empty one in its place

    r = fer_tune(env, "repair", sdir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "3 trials" in r.stdout and f"next: fer-tune status {sdir}" in r.stdout, r.stdout
    assert [_same(t) for t in study_trials(sdir)] == truth
    r = fer_tune(env, "repair", sdir)
    assert r.returncode == 2 and "is whole" in r.stderr and "--force" in r.stderr

    r = fer_tune(env, "extend", sdir, "--num-samples", "1", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    trials = study_trials(sdir)
    assert [_same(t) for t in trials[:3]] == truth and len(trials) == 4
    assert trials[3].state.is_finished() and trials[3].params not in [t[2] for t in truth]


def test_a_damaged_database_of_a_killed_sweep_is_rebuilt_and_the_study_resumes(tmp_path, env):
    space = write_space(tmp_path, num_samples=5, max_epochs=3)
    results = tmp_path / "results"
    sdir = results / "t"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fer_tune.cli", "sweep", str(space), "--results", str(results), "--quiet"]
        + ["--num-cpus", "2"],
        env=pausing(env, tmp_path / "paused"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    kill_at_pause(proc, tmp_path / "paused", within=180)
    truth = study_trials(sdir)
    assert any(t.state.name == "RUNNING" for t in truth)
    db = sdir / "optuna.db"
    _truncate(db, 0.4)
    for command in ("status", "resume"):
        r = fer_tune(env, command, sdir, "--quiet" if command == "resume" else "--json")
        assert r.returncode == 2 and "is damaged" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr

    r = fer_tune(env, "repair", sdir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"next: fer-tune resume {sdir}" in r.stdout and "damaged database is kept as" in r.stdout, r.stdout
    assert len(list(sdir.glob("optuna.db.damaged-*"))) == 1
    rebuilt = {t.user_attrs["ray_trial_id"]: t for t in study_trials(sdir)}
    for t in truth:  # every trial Tune had begun, as the study held it (finished ones with their values)
        tid = t.user_attrs.get("ray_trial_id")
        if tid in rebuilt and t.state.is_finished():
            assert _same(rebuilt[tid]) == _same(t)
        elif tid in rebuilt:
            assert (rebuilt[tid].number, rebuilt[tid].params) == (t.number, t.params)
    assert len(rebuilt) >= sum(t.state.is_finished() for t in truth)

    r = fer_tune(env, "resume", sdir, "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    trials = study_trials(sdir)
    assert len(trials) == 5 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials), trials
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 5
    for t in trials:  # the trials finished before the damage kept their values
        before = rebuilt.get(t.user_attrs["ray_trial_id"])
        if before is not None and before.state.is_finished():
            assert _same(t) == _same(before)


def test_the_searcher_states_of_a_study_in_an_object_store_are_read_and_renumbered(tmp_path, monkeypatch):
    """A study whose Ray storage is S3: repair reads the order its searcher numbered the trials in from Tune's saved
    searcher states there, and points them at the rebuilt database's trials, as it does in a local study."""
    pytest.importorskip("moto.server", reason="pip install 'moto[server]' (the test extra) for the S3 test")
    import pickle

    import boto3
    from moto.server import ThreadedMotoServer

    from fer_tune.tune.runtime import storage as st
    from fer_tune.tune.runtime.layout import searcher_states
    from fer_tune.tune.study import repair

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket="fer-repair")  # moto's buckets outlive its server in this process
        record = {"ray_storage": "s3://fer-repair/studies/t", "runs": [{"dir": "tune"}, {"dir": "extend-1"}]}
        exp = "s3://fer-repair/studies/t/tune"
        saved = {repair.TRIAL_IDS: {"a1": 1, "b2": 2, "c3": 3}, "searcher": "kept"}
        st.write_bytes(st.join(exp, "searcher-state-2026-12-01_10-00-00.pkl"), pickle.dumps(saved))
        st.write_text(st.join(exp, "experiment_state-2026-12-01_10-00-00.json"), "{}")
        (path,) = searcher_states(exp)
        assert path == "s3://fer-repair/studies/t/tune/searcher-state-2026-12-01_10-00-00.pkl"
        assert repair._saved_ids(path) == {"a1": 1, "b2": 2, "c3": 3}
        assert searcher_states("s3://fer-repair/studies/t/extend-1") == []

        assert repair._renumber_searcher_states(tmp_path, record, {"a1": 1, "b2": 3, "c3": 2}) == 1
        assert pickle.loads(st.read_bytes(path)) == {**saved, repair.TRIAL_IDS: {"a1": 1, "b2": 3, "c3": 2}}
        assert repair._renumber_searcher_states(tmp_path, record, {"a1": 1, "b2": 3, "c3": 2}) == 0
    finally:
        server.stop()


def test_a_study_without_its_copy_of_the_space_is_one_line(small_study, tmp_path, env):
    study = tmp_path / "t"
    shutil.copytree(small_study, study, ignore=shutil.ignore_patterns("final*", "pbt", ".lock"))
    (study / "space.yaml").unlink()
    for argv in (["resume", study], ["extend", study, "--num-samples", "1"]):
        r = fer_tune(env, *argv)
        assert r.returncode == 2 and "space.yaml is missing" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_copy_without_the_trials_results_keeps_its_trials_csv_on_resume(small_study, tmp_path, env):
    """`rsync --exclude tune/`, then `fer-tune resume` of the finished study: trials.csv keeps the values it came
    with (they are nowhere else in the copy but Optuna's database), and status says the results are missing."""
    study = tmp_path / "t"
    shutil.copytree(small_study, study, ignore=shutil.ignore_patterns("final*", "pbt", ".lock", "tune"))
    before = (study / "trials.csv").read_text()
    r = fer_tune(env, "resume", study, "--quiet")
    assert r.returncode == 0 and "trials.csv is left as it is" in r.stderr, r.stderr
    assert (study / "trials.csv").read_text() == before
    r = fer_tune(env, "status", study)
    assert r.returncode == 0 and "Results missing: 3 finished trial(s) have none in" in r.stdout, r.stdout
