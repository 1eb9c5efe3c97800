"""Studies whose driver was killed at the two moments Tune's saved state says least: before Tune saved any state,
and after the searcher suggested trials that Tune's last saved state does not name yet."""

import glob
import json
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import time

from conftest import cli_args, fer_tune, study_trials, write_space

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


def test_trials_suggested_after_tunes_last_state_are_taken_up_by_the_resume(tmp_path, env):
    n = 4
    space = write_space(tmp_path, num_samples=n, max_epochs=2)
    sdir = tmp_path / "results" / "t"
    r = fer_tune(env, "sweep", space, "--results", tmp_path / "results", "--quiet")
    assert r.returncode == 0, r.stderr
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
