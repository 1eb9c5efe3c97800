"""Studies whose driver was killed at the moments Tune's saved state says least: before Tune saved any state, after
the searcher suggested trials that Tune's last saved state does not name yet, and while Tune was writing its state
(a full disk cuts it off the same way)."""

import glob
import json
import os
import pickle
import posixpath
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import cli_args, fer_tune, kill_at_pause, pausing, study_trials, write_space

from fer_tune.tune.runtime import layout
from fer_tune.tune.study.outputs import to_finish


def _all_finished_once(sdir, n):
    trials = study_trials(sdir)
    assert [t.state.name for t in trials].count("RUNNING") == 0, [t.state.name for t in trials]
    assert len(trials) == n and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == n  # no suggestion replayed
    return trials


def test_trials_to_finish_count_those_tune_does_not_name_yet():
    assert to_finish({"a": "TERMINATED", "b": "TERMINATED"}, 2) == 0
    assert to_finish({"a": "TERMINATED", "b": "TERMINATED"}, 3) == 1  # one begun after Tune's last state
    assert to_finish({}, 4) == 4  # no state saved at all
    assert to_finish({"a": "TERMINATED", "b": "RUNNING", "c": "PENDING"}, 3) == 2
    assert to_finish({"a": "TERMINATED", "b": "ERROR"}, 2) == 1  # resume retries an errored trial
    assert to_finish({"a": "TERMINATED", "b": "ERROR"}, 2, errors=False) == 0


def test_trials_that_began_and_finished_after_tunes_last_state_are_not_made_again(tmp_path):
    """A driver stopped long after Tune's last whole state (its saves failed on a full disk, then a kill): the run's
    trials the searcher made after that state and that finished are in the Optuna study, not in Tune's state. The
    restored searcher hands a RUNNING one to Tune's next trial, makes new ones only up to the run's num_samples,
    and the run counts as finished once Tune's trials end."""
    from ray.tune.search import Searcher

    from fer_tune.tune.study.outputs import left_to_finish
    from fer_tune.tune.study.searcher import StudySearch

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    record = {"storage": url, "optuna_study": "t"}
    run = {"dir": "tune", "num_samples": 5}

    def space(trial):
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)

    def searcher():
        import optuna

        return StudySearch(
            sampler=optuna.samplers.TPESampler(seed=0),
            space=space, metric="val_acc", mode="max", storage_ref=url, study_name="t", max_epochs=2,
            run="tune", num_samples=5,
        )  # fmt: skip

    first = searcher()
    for tid in ("a", "b"):
        first.suggest(tid)
        first.on_trial_complete(tid, {"val_acc": 30.0, "epoch": 2})
    first.save(str(tmp_path / "searcher-state.pkl"))  # Tune's last whole state: trials a and b
    for tid in ("c", "d", "e"):
        first.suggest(tid)
    first.on_trial_complete("c", {"val_acc": 31.0, "epoch": 2})  # c finished, d stopped early, e was running
    first.on_trial_complete("d", {"val_acc": 20.0, "epoch": 1})
    states = {"a": "TERMINATED", "b": "TERMINATED"}
    assert left_to_finish(record, run, "", states=states) == 1  # e (c and d are done)
    other_run = {"dir": "extend-1", "num_samples": 5}  # the count is the run's own
    assert left_to_finish(record, other_run, "", states=states) == 3

    again = searcher()
    again.restore(str(tmp_path / "searcher-state.pkl"))
    params = again.suggest("f")  # takes over e, the trial Tune forgot
    assert params is not None and params != Searcher.FINISHED
    assert again.suggest("g") == Searcher.FINISHED  # 5 trials: a, b, c, d and e (as f)
    trials = study_trials(tmp_path)
    assert len(trials) == 5 and [t.user_attrs["ray_trial_id"] for t in trials] == ["a", "b", "c", "d", "f"]
    assert {t.user_attrs["run"] for t in trials} == {"tune"}
    again.on_trial_complete("f", {"val_acc": 29.0, "epoch": 2})
    done = {**states, "f": "TERMINATED"}
    assert left_to_finish(record, run, "", states=done, errors=False) == 0


def test_a_driver_killed_before_tune_saved_a_state_starts_its_run_over(tmp_path, env):
    n = 4
    space = write_space(tmp_path, num_samples=n, max_epochs=2)
    sdir = tmp_path / "results" / "t"
    proc = subprocess.Popen(
        cli_args("sweep", space, "--results", tmp_path / "results", "--quiet"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not (sdir / "tune" / "tuner.pkl").exists():
            assert proc.poll() is None and time.time() < deadline, "the sweep never started its Tune run"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1)
    assert not glob.glob(str(sdir / "tune" / "experiment_state-*"))  # the kill came before Tune's first state

    r = fer_tune(env, "extend", sdir, "--num-samples", 1)
    assert r.returncode == 2 and "is unfinished; fer-tune resume" in r.stderr, r.stderr
    r = fer_tune(env, "resume", sdir, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "the run starts over" in r.stderr, r.stderr
    _all_finished_once(sdir, n)
    r = fer_tune(env, "resume", sdir, "--quiet")
    assert r.returncode == 0 and "nothing to resume" in r.stderr


def _forget_the_last_trials(sdir, k):
    """Turn a finished study into what a SIGKILL can leave: Tune's last saved state names all trials but the last k,
    every one of them finished; the study holds those k as RUNNING (suggested after that state, then cut off)."""
    db = sqlite3.connect(sdir / "optuna.db")
    rows = db.execute(
        "SELECT t.trial_id, a.value_json FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
        "WHERE a.key = 'ray_trial_id' ORDER BY t.number DESC LIMIT ?",
        (k,),
    ).fetchall()
    forgotten = {json.loads(ray_id) for _, ray_id in rows}
    for trial_id, _ in rows:
        db.execute("UPDATE trials SET state = 'RUNNING', datetime_complete = NULL WHERE trial_id = ?", (trial_id,))
        for table in ("trial_values", "trial_intermediate_values"):
            db.execute(f"DELETE FROM {table} WHERE trial_id = ?", (trial_id,))
        db.execute("DELETE FROM trial_user_attributes WHERE trial_id = ? AND key = 'status'", (trial_id,))
    db.commit()
    db.close()
    exp = sdir / "tune"
    (state_file,) = exp.glob("experiment_state-*.json")
    state = json.loads(state_file.read_text())
    state["trial_data"] = [e for e in state["trial_data"] if json.loads(e[0])["trial_id"] not in forgotten]
    state_file.write_text(json.dumps(state))
    for d in exp.glob("study_trial_*"):
        if any(f"_{tid}_" in d.name for tid in forgotten):
            shutil.rmtree(d)
    import ray.tune  # noqa: F401  (Tune's searcher states unpickle Tune's classes)

    (searcher_file,) = exp.glob("searcher-state-*.pkl")
    searcher = pickle.loads(searcher_file.read_bytes())
    for tid in forgotten:
        searcher["_ot_trial_ids"].pop(tid)
        searcher["_completed_trials"].discard(tid)
    searcher_file.write_bytes(pickle.dumps(searcher))
    (gen_file,) = exp.glob("search_gen_state-*.json")
    gen = pickle.loads(gen_file.read_bytes())
    gen["counter"] -= k
    gen_file.write_bytes(pickle.dumps(gen))
    return forgotten


def test_trials_suggested_after_tunes_last_state_are_taken_up_by_the_resume(tmp_path, env, small_study):
    n = 3
    sdir = tmp_path / "results" / "t"  # a copy of the small study (finished), elsewhere
    shutil.copytree(small_study, sdir, ignore=shutil.ignore_patterns("final*", "pbt", ".lock", "report.html"))
    before = {t.number: t.params for t in study_trials(sdir)}
    forgotten = _forget_the_last_trials(sdir, 2)

    r = fer_tune(env, "status", sdir, "--json")
    assert json.loads(r.stdout)["finished"] == n - 2
    r = fer_tune(env, "resume", sdir, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing to resume" not in r.stderr and "resuming study" in r.stderr
    trials = _all_finished_once(sdir, n)
    # the two RUNNING trials finished under new Tune trials, with the parameters the searcher had given them
    assert {t.number: t.params for t in trials} == before
    assert not forgotten & {t.user_attrs["ray_trial_id"] for t in trials}
    assert all(t.intermediate_values for t in trials)
    session = json.loads((sdir / "study.json").read_text())["runs"][0]["sessions"][-1]
    assert session["trials_continued"] == 2 and session["outcome"] == "finished"
    assert session["trials_finished"] == n


def _session(exp, stamp, trials, state_bytes=None):
    """Tune's files of one saved driver session (experiment state and searcher state) in `exp`."""
    state = {"trial_data": [[json.dumps({"trial_id": t, "status": s}), ""] for t, s in trials.items()]}
    (exp / f"experiment_state-{stamp}.json").write_bytes(
        json.dumps(state).encode() if state_bytes is None else state_bytes
    )
    (exp / f"searcher-state-{stamp}.pkl").write_bytes(pickle.dumps({"trials": sorted(trials)}))


def test_a_state_cut_off_mid_write_is_set_aside_and_the_one_before_it_is_read(tmp_path, caplog):
    exp = tmp_path / "tune"
    exp.mkdir()
    (exp / layout.TUNER_FILE).write_bytes(pickle.dumps({"tuner": 1}))
    _session(exp, "2026-12-01_10-00-00", {"a": "TERMINATED", "b": "RUNNING"})
    whole = (exp / "experiment_state-2026-12-02_10-00-00.json", b"")  # a kill between Tune's truncate and write
    _session(exp, "2026-12-02_10-00-00", {"a": "TERMINATED", "b": "TERMINATED", "c": "RUNNING"}, state_bytes=whole[1])
    # status reads the newest whole state without touching anything
    assert layout.experiment_trial_states(exp) == {"a": "TERMINATED", "b": "RUNNING"}
    assert whole[0].exists()
    assert layout.restorable(exp)
    assert sorted(p.name for p in exp.glob("*.damaged")) == [
        "experiment_state-2026-12-02_10-00-00.json.damaged",
        "searcher-state-2026-12-02_10-00-00.pkl.damaged",
    ]
    assert "continuing from the state saved before it" in caplog.text
    # a searcher state cut off too (its pickle lacks its end): that session goes as well, and none is left
    older = exp / "searcher-state-2026-12-01_10-00-00.pkl"
    older.write_bytes(older.read_bytes()[:-3])
    assert layout.settle_state(exp) == ["experiment_state-2026-12-01_10-00-00.json", older.name]
    assert not layout.has_tune_state(exp) and layout.experiment_trial_states(exp) == {}
    (exp / layout.TUNER_FILE).write_bytes(pickle.dumps({"tuner": 1})[:-1])
    _session(exp, "2026-12-03_10-00-00", {"a": "RUNNING"})
    assert not layout.has_tune_state(exp)  # tuner.pkl cut off


def test_a_stage_with_no_whole_state_starts_over_in_an_empty_directory(tmp_path, caplog, monkeypatch):
    from fer_tune.tune.runtime.stage import stage_tuner

    monkeypatch.setenv("TUNE_MAX_PENDING_TRIALS_PG", "1")  # what a study run before it in this process set

    exp = tmp_path / "tune"
    (exp / "member_trial_0001").mkdir(parents=True)
    (exp / layout.TUNER_FILE).write_bytes(pickle.dumps({"tuner": 1}))
    _session(exp, "2026-12-01_10-00-00", {"a": "RUNNING"}, state_bytes=b'{"trial_data": [["{\\"tri')
    rec = {"ray_storage": str(tmp_path), "resources": {"cpu": 1, "gpu": 0}}
    tuner, where = stage_tuner(rec, None, lambda: "new tuner", 3)
    assert (tuner, where) == ("new tuner", str(exp)) and not exp.exists()
    (aside,) = tmp_path.glob("tune.unreadable-*")
    assert (aside / "member_trial_0001").is_dir() and "the stage starts over" in caplog.text
    assert os.environ["TUNE_MAX_PENDING_TRIALS_PG"] == "3"  # every member made at the start


def test_the_driver_replaces_tunes_state_files_whole(tmp_path, monkeypatch):
    """Tune copies its staged state into the storage in place: a kill or a full disk mid-copy left a cut-off file.
    The driver's copy (installed by every Ray session) goes through a temporary file renamed over the target."""
    import errno

    import pyarrow.fs

    from fer_tune.tune.runtime import internals
    from fer_tune.tune.runtime.session import tune_env

    module, name = internals.storage_upload()
    monkeypatch.setattr(module, name, getattr(module, name))
    tune_env("quiet")
    upload = getattr(module, name)
    assert upload.whole_files
    assert pickle.loads(pickle.dumps(upload)) is upload  # pickled by Ray's name (Tune's states hold it)
    staged, storage = tmp_path / "staged", tmp_path / "storage"
    for root, text in ((staged, "new"), (storage, "old")):
        (root / "trial").mkdir(parents=True)
        (root / "experiment_state-x.json").write_text(text * 1000)
        (root / "trial" / "result.json").write_text(text)

    real = layout.shutil.copyfile

    def disk_full(src, dst):
        real(src, dst)
        with open(dst, "r+b") as fh:
            fh.truncate(100)  # a part written, then no space left
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(layout.shutil, "copyfile", disk_full)
    with pytest.raises(OSError):
        upload(local_path=str(staged), fs=pyarrow.fs.LocalFileSystem(), fs_path=str(storage))
    assert (storage / "experiment_state-x.json").read_text() == "old" * 1000
    assert sorted(p.name for p in storage.rglob("*")) == ["experiment_state-x.json", "result.json", "trial"]
    monkeypatch.setattr(layout.shutil, "copyfile", real)
    # Tune rewrites its staged state in place: a copy that reads it half-written is not put in place
    (staged / "experiment_state-x.json").write_text('{"trial_data": [["{')
    (storage / "experiment_state-x.json").write_text('{"trial_data": []}')
    upload(local_path=str(staged), fs=pyarrow.fs.LocalFileSystem(), fs_path=str(storage))
    assert (storage / "experiment_state-x.json").read_text() == '{"trial_data": []}'
    assert not list(storage.glob(".*.part"))
    (staged / "experiment_state-x.json").write_text('{"trial_data": ["new"]}')
    upload(local_path=str(staged), fs=pyarrow.fs.LocalFileSystem(), fs_path=str(storage))
    assert (storage / "experiment_state-x.json").read_text() == '{"trial_data": ["new"]}'
    assert (storage / "trial" / "result.json").read_text() == "new"


def test_the_driver_copies_only_the_files_that_changed_since_their_last_copy(tmp_path, monkeypatch):
    """Tune copies its whole staging directory at every sync, every trial's logger files included: thousands of
    files at a big study's end, each written anew and renamed over its target, a growing share of the driver's time.
    A file still since well before its last copy is left alone until it changes or its copy goes."""
    import pyarrow.fs

    from fer_tune.tune.runtime import internals
    from fer_tune.tune.runtime.session import tune_env

    module, name = internals.storage_upload()
    monkeypatch.setattr(module, name, getattr(module, name))
    tune_env("quiet")
    upload = getattr(module, name)
    staged, storage = tmp_path / "staged", tmp_path / "storage"
    old = time.time() - 60
    for trial in ("done", "running"):
        (staged / trial).mkdir(parents=True)
        (staged / trial / "result.json").write_text(f"{trial} epoch 1\n")
    os.utime(staged / "done" / "result.json", (old, old))  # a trial that ended a minute ago
    (staged / "experiment_state-x.json").write_text('{"trial_data": []}')
    copied = []
    real = layout.shutil.copyfile

    def counted(src, dst):
        copied.append(Path(src).relative_to(staged).as_posix())
        return real(src, dst)

    monkeypatch.setattr(layout.shutil, "copyfile", counted)

    def sync() -> list:
        copied.clear()
        upload(local_path=str(staged), fs=pyarrow.fs.LocalFileSystem(), fs_path=str(storage))
        return sorted(copied)

    everything = ["done/result.json", "experiment_state-x.json", "running/result.json"]
    assert sync() == everything
    inode = (storage / "done" / "result.json").stat().st_ino
    assert sync() == ["experiment_state-x.json", "running/result.json"]  # changed within the last seconds: copied
    assert (storage / "done" / "result.json").stat().st_ino == inode
    with open(staged / "done" / "result.json", "a") as fh:
        fh.write("done epoch 2\n")  # it changed after all
    assert "done/result.json" in sync()
    assert (storage / "done" / "result.json").read_text() == "done epoch 1\ndone epoch 2\n"
    os.utime(staged / "done" / "result.json", (old, old))
    assert "done/result.json" in sync()  # a new mtime: copied, and still for long enough to be left next time
    assert "done/result.json" not in sync()
    (storage / "done" / "result.json").unlink()  # its copy went
    assert "done/result.json" in sync()
    assert (storage / "done" / "result.json").read_text() == "done epoch 1\ndone epoch 2\n"


def test_to_another_storage_the_driver_uploads_only_the_changed_files(tmp_path, monkeypatch):
    """To S3 or GCS, Tune's copy of its whole staging directory at every sync is a request per file: tens of
    thousands at a big study's end, again and again. Only the files that changed go, one by one, or through Tune's
    copy of the directory when many changed (a new driver's first sync)."""
    import pyarrow.fs

    from fer_tune.tune.runtime import internals

    module, name = internals.storage_upload()
    tunes = getattr(module, name)
    tunes = getattr(tunes, "__wrapped__", tunes)  # Tune's own copy, under the driver's if a session installed it
    staged = tmp_path / "staged"
    calls = []

    def counted(local_path, fs, fs_path, exclude=None):
        calls.append(posixpath.relpath(fs_path, "study/tune"))  # what it uploads, by its target
        return tunes(local_path=local_path, fs=fs, fs_path=fs_path, exclude=exclude)

    monkeypatch.setattr(module, name, counted)
    layout.whole_state_uploads()
    upload = getattr(module, name)
    assert upload.whole_files and upload.__wrapped__ is counted
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    fs = pyarrow.fs.SubTreeFileSystem(str(bucket), pyarrow.fs.LocalFileSystem())  # a storage other than a local one
    old = time.time() - 60
    for trial in ("done", "running"):
        (staged / trial).mkdir(parents=True)
        (staged / trial / "result.json").write_text(f"{trial} epoch 1\n")
    os.utime(staged / "done" / "result.json", (old, old))
    (staged / "experiment_state-x.json").write_text('{"trial_data": []}')

    def sync() -> list:
        calls.clear()
        upload(local_path=str(staged), fs=fs, fs_path="study/tune")
        return sorted(calls)

    assert sync() == ["done/result.json", "experiment_state-x.json", "running/result.json"]
    assert (bucket / "study" / "tune" / "done" / "result.json").read_text() == "done epoch 1\n"
    assert sync() == ["experiment_state-x.json", "running/result.json"]
    (staged / "done" / "result.json").write_text("done epoch 1\ndone epoch 2\n")
    assert sync() == ["done/result.json", "experiment_state-x.json", "running/result.json"]
    assert (bucket / "study" / "tune" / "done" / "result.json").read_text() == "done epoch 1\ndone epoch 2\n"
    # Tune rewrites its staged state in place: a copy that reads it half-written is not uploaded
    (staged / "experiment_state-x.json").write_text('{"trial_data": [["{')
    assert sync() == ["done/result.json", "running/result.json"]  # both changed within the last seconds
    assert (bucket / "study" / "tune" / "experiment_state-x.json").read_text() == '{"trial_data": []}'
    (staged / "experiment_state-x.json").write_text('{"trial_data": ["new"]}')
    monkeypatch.setattr(layout, "BULK_FILES", 1)
    # more changed files than BULK_FILES: Tune's copy of the directory, then the state read whole
    assert sync() == [".", "experiment_state-x.json"]
    assert (bucket / "study" / "tune" / "experiment_state-x.json").read_text() == '{"trial_data": ["new"]}'


def test_an_interrupted_study_moved_elsewhere_is_resumed_where_it_is(tmp_path, env):
    """A study stopped with trials yet to begin (a job's time limit), then moved or copied (`mv`, `ray rsync-down`):
    Tune's saved searcher names the old place, yet the resume makes the trials it had not begun in the new one
    and never writes to the old."""
    space = write_space(tmp_path, num_samples=4, max_epochs=2)
    marker = tmp_path / "paused"
    proc = subprocess.Popen(
        cli_args("sweep", space, "--results", tmp_path / "A", "--max-concurrent", "1", "--quiet"),
        env=pausing(env, marker, results=1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    kill_at_pause(proc, marker)
    begun = layout.experiment_trial_states(tmp_path / "A" / "t" / "tune")
    assert 1 <= len(begun) < 4, begun  # trials yet to begin
    (tmp_path / "A").rename(tmp_path / "B")
    sdir = tmp_path / "B" / "t"
    r = fer_tune(env, "resume", sdir, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    _all_finished_once(sdir, 4)
    assert not (tmp_path / "A").exists()  # nothing written where the study was
    states = layout.experiment_trial_states(sdir / "tune")
    assert len(states) == 4 and set(states.values()) == {"TERMINATED"}
    assert len([d for d in (sdir / "tune").iterdir() if (d / "result.json").is_file()]) == 4


def test_a_full_disk_stops_a_command_in_one_line_and_ray_log_stops_quietly(tmp_path, monkeypatch, capsys):
    """What a sweep on a full scratch disk met (a trial's checkpoint, then optuna.db, then ray.log): 2,371 lines of
    tracebacks. Now one line, exit 130 like an interrupted study; `fer-tune resume` continues it later."""
    import errno
    import sqlite3 as sql

    import fer_tune.cli
    from fer_tune.cli import disk_full, main
    from fer_tune.cli import status as status_cli
    from fer_tune.tune.runtime.session import _LogFile

    def full_disk(args):
        try:
            raise sql.OperationalError("database or disk is full")
        except sql.OperationalError as exc:
            raise RuntimeError("An exception is raised during the commit.") from exc

    monkeypatch.setattr(status_cli, "cmd_status", full_disk)
    assert main(["status", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on device" in err and "fer-tune resume" in err, err
    nospace = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.json"))
    assert str(tmp_path / "x.json") in disk_full(nospace) and "MiB free" in disk_full(nospace)
    assert disk_full(ValueError("other")) is None and fer_tune.cli.disk_full(OSError(errno.EACCES, "no")) is None

    if not os.path.exists("/dev/full"):
        return
    ray_log = _LogFile("/dev/full")  # every write: ENOSPC
    import logging

    for i in range(3):
        ray_log.handle(logging.LogRecord("ray", logging.WARNING, __file__, 1, f"message {i}", None, None))
    ray_log.close()
    assert ray_log.broken and "Logging error" not in capsys.readouterr().err


def test_a_trial_that_failed_on_a_full_disk_stops_the_run_instead_of_being_retried(tmp_path):
    """Tune retries a failed trial (twice), and every retry of a checkpoint on a full disk fails the same way: the
    run stops at the first such failure, with the error the command turns into its one line."""
    import errno
    from types import SimpleNamespace

    from fer_tune.cli import disk_full
    from fer_tune.tune.runtime.progress import FullDiskStops

    def trial(text):
        (tmp_path / "error.txt").write_text(text)
        return SimpleNamespace(error_file=str(tmp_path / "error.txt"))

    pyarrow = "OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"
    with pytest.raises(OSError) as raised:
        FullDiskStops().on_trial_recover(1, [], trial(f"Failure # 1 (occurred at 2026-12-07)\n{pyarrow}\n"))
    assert raised.value.errno == errno.ENOSPC and "no space left on device" in disk_full(raised.value)
    with pytest.raises(OSError) as raised:
        FullDiskStops().on_trial_error(1, [], trial("Failure # 1\nOSError: [Errno 122] Disk quota exceeded\n"))
    assert raised.value.errno == errno.EDQUOT
    # Python's error names the file (a node's full /tmp, say): the command's line names it too
    local = "OSError: [Errno 28] No space left on device: '/tmp/tmpq1x/state.pt'"
    with pytest.raises(OSError) as raised:
        FullDiskStops().on_trial_recover(1, [], trial(f"Failure # 1\n{local}\n"))
    assert raised.value.filename == "/tmp/tmpq1x/state.pt" and "writing /tmp/tmpq1x/state.pt" in disk_full(raised.value)
    # a failure on the full disk, then one of another kind: the latest counts
    earlier = f"Failure # 1\n{pyarrow}\nFailure # 2\nRuntimeError: CUDA error: an illegal memory access\n"
    FullDiskStops().on_trial_recover(1, [], trial(earlier))
    FullDiskStops().on_trial_recover(1, [], SimpleNamespace(error_file=None))
    FullDiskStops().on_trial_recover(1, [], SimpleNamespace(error_file=str(tmp_path / "gone.txt")))


def test_tunes_snapshot_period_grows_with_the_time_the_driver_spends_writing_it(monkeypatch, tmp_path):
    """At least every 3 s while a snapshot is cheap; at most 5 % of the driver's time once the state is big; the
    wait for the storage's copy (seconds on S3, the driver idle) does not count."""
    from types import SimpleNamespace

    from fer_tune.tune.runtime import internals as ri
    from fer_tune.tune.runtime.session import bounded_snapshots, tune_env

    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S", raising=False)
    tune_env("quiet")
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "auto"
    bounded_snapshots()  # idempotent
    copy_takes = []
    syncer = SimpleNamespace(sync_up=lambda *a, **k: True, wait=lambda: time.sleep(copy_takes[-1]))
    storage = SimpleNamespace(experiment_driver_staging_path=str(tmp_path), experiment_fs_path="x", syncer=syncer)
    manager = ri.snapshot_manager()
    snap = manager(storage=storage, checkpoint_period="auto")
    period = lambda: getattr(snap, ri.SNAPSHOT_ATTRS[1])  # noqa: E731
    assert period() == 3.0
    for writing, copying, expected in ((0.01, 0.0, 3.0), (0.3, 0.0, 5.7), (0.01, 0.5, 3.0)):
        copy_takes.append(copying)
        getattr(snap, ri.SNAPSHOT_SYNC)(lambda w=writing: time.sleep(w), force=True, wait=True)
        assert period() == pytest.approx(expected, rel=0.3), (writing, copying, period())
    fixed = manager(storage=storage, checkpoint_period="0")  # a period the user (or a test) set stands
    getattr(fixed, ri.SNAPSHOT_SYNC)(lambda: time.sleep(0.3), force=True)
    assert getattr(fixed, ri.SNAPSHOT_ATTRS[1]) == 0.0


def test_free_space_below_what_the_checkpoints_need_is_said_up_front(tmp_path, caplog):
    from fer_tune.tune.runtime.preflight import check_free_space

    free = shutil.disk_usage(tmp_path).free
    with caplog.at_level("WARNING", logger="fer_tune"):
        check_free_space([str(tmp_path), str(tmp_path / "not" / "yet"), "s3://bucket/x"], free // 2, "a few")
        assert not caplog.records
        check_free_space([str(tmp_path / "study"), str(tmp_path / "tune")], free * 2, "40 checkpoints of 9 MiB")
    (line,) = [r.getMessage() for r in caplog.records]  # one filesystem, one warning
    assert "free, and the checkpoints will need about" in line and "40 checkpoints of 9 MiB" in line, line


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_sweep_that_fills_its_disk_stops_in_one_line_and_resumes_once_space_is_freed(tmp_path, env):
    """A results filesystem of 6 MiB, and every trial keeping its checkpoints (about 1 MiB each): the sweep is
    warned up front, stops in one line when the disk is full (exit 130, no traceback), and `fer-tune resume`
    finishes the study once the filesystem is made larger."""
    disk = tmp_path / "scratch"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], check=True)
    try:
        space = write_space(tmp_path, num_samples=4, max_epochs=3, keep_checkpoints="all")
        r = subprocess.run(
            cli_args("sweep", space, "--results", disk), env=env, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 130, r.stderr[-3000:]
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "free, and the checkpoints will need about" in r.stderr, r.stderr[-3000:]
        assert "fer-tune: error: no space left on device" in r.stderr and "fer-tune resume" in r.stderr
        # the first trial whose checkpoint met the full disk stopped the run: none was started again
        assert "Tune starts it again" not in r.stderr, r.stderr
        said = [x for x in r.stderr.strip().splitlines() if not x.startswith(("study ", "warm start", "trial "))]
        assert len(said) <= 6, r.stderr
        subprocess.run(["mount", "-o", "remount,size=600m", str(disk)], check=True)
        r = subprocess.run(
            cli_args("resume", disk / "t", "--quiet"), env=env, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stderr[-3000:]
        _all_finished_once(disk / "t", 4)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
