"""The study engine with real Ray, run as the user runs it: `fer-tune sweep / resume / extend / status` in
subprocesses (each starts and stops its own local Ray under a private RAY_TMPDIR)."""

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SESSION_RAY_CPUS, SPACE, fer_tune, pausing, processes, read_csv, study_trials, write_space

from fer_tune.tune.runtime.checkpoints import checkpointed_results


def test_sweep_with_a_crash_then_extend(tmp_path, env):
    # no ASHA rung before epoch 2: the trial that is to crash at epoch 2 cannot be stopped before it gets there
    space = write_space(tmp_path, early_stopping={"type": "asha", "grace_period": 2, "reduction_factor": 2})
    results = tmp_path / "results"
    sdir = results / "t"
    marker = tmp_path / "crashed"
    r = fer_tune({**env, "FER_TUNE_CRASH_ONCE": f"{marker}:2"}, "sweep", space, "--results", results, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "best: trial" in r.stdout
    assert " started: " not in r.stderr  # --quiet: no per-trial lines

    trials = study_trials(sdir)
    assert len(trials) == 6 and all(t.state.is_finished() for t in trials)
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert all(t.intermediate_values for t in pruned)  # with its per-epoch values

    rows = read_csv(sdir)
    assert len(rows) == 6 and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    # a trial ASHA stopped early is PRUNED in Optuna, one that ran all its epochs COMPLETE (how many ASHA stops
    # depends on the order trials reach a rung, and tiny models on synthetic faces often tie there)
    assert all((r["state"] == "PRUNED") == (int(r["epochs"]) < SPACE["max_epochs"]) for r in rows), rows
    # (that both CPUs' trials start together is measured by benchmarks/bench_study.py overhead)
    crashed = marker.read_text()
    row = next(r for r in rows if r["ray_trial_id"] == crashed)
    assert int(row["restarts"]) == 1 and row["state"] in ("COMPLETE", "PRUNED")
    assert all(float(r["device_seconds"]) > 0 for r in rows)
    assert {"val_acc@2", "param_lr", "best_val_acc", "node"} <= set(rows[0]) and "val_acc@1" not in rows[0]
    for name in ("study.json", "space.yaml", "optuna.db", "tune/tuner.pkl"):
        assert (sdir / name).exists(), name

    # the same study name again is refused
    r = fer_tune(env, "sweep", space, "--results", results)
    assert r.returncode == 2 and "already holds a study" in r.stderr

    # nothing to resume in a finished study
    r = fer_tune(env, "resume", sdir, "--quiet")
    assert r.returncode == 0 and "nothing to resume" in r.stderr  # what happened: stderr; the summary: stdout
    assert "best: trial" in r.stdout

    # extend: 2 more trials, told to the same Optuna study (which sees all 6 earlier ones)
    r = fer_tune(env, "extend", sdir, "--num-samples", 2, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    trials = study_trials(sdir)
    assert len(trials) == 8 and all(t.state.is_finished() for t in trials)
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == 8
    assert len(read_csv(sdir)) == 8 and (sdir / "extend-1").is_dir()
    # study.json records every run's sessions: when, with which code, how each ended
    runs = json.loads((sdir / "study.json").read_text())["runs"]
    assert [r["dir"] for r in runs] == ["tune", "extend-1"]
    for r in runs:
        (session,) = r["sessions"]
        assert session["kind"] == "start" and session["outcome"] == "finished" and session["code"]["sha"]
        assert session["trials_finished"] == r["num_samples"] and session["wall_seconds"] > 0

    r = fer_tune(env, "status", sdir, "--json")
    s = json.loads(r.stdout)
    assert r.returncode == 0 and s["trials"] == 8 and s["num_samples"] == 8 and s["finished"] == 8
    assert s["device_hours"] > 0 and s["best"]["best_val_acc"] == max(float(x["best_val_acc"]) for x in s["rows"])
    r = fer_tune(env, "status", sdir)
    assert r.returncode == 0 and "8/8 trials finished" in r.stdout

    # an edited space file: resume/extend refuse with the difference, unless --force
    space.write_text(space.read_text().replace("max_epochs: 4", "max_epochs: 5"))
    r = fer_tune(env, "extend", sdir, "--num-samples", 1)
    assert r.returncode == 2 and "was edited since the study started" in r.stderr and "--force" in r.stderr


def test_the_study_driver_never_imports_torch(tmp_path):
    """The driver's start is on the critical path of every study: its own code and Tune's TensorBoard logger
    (tensorboardX imports torch if it can) must leave torch to the trials (about 2.5 s of CPU)."""
    code = (
        "import sys\n"
        "from fer_tune import cli, data, report\n"
        "from fer_tune.cli import study as cli_study\n"
        "from fer_tune.tune.study import driver, record, searcher, spaces\n"
        "spec = spaces.load_space('search_spaces/joint.yaml')\n"
        "spec.base_config(); spec.define_by_run(); record.versions(); searcher.NumpyTBXLoggerCallback()\n"
        "data.load('synthetic:100', 'paper')\n"
        "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')][:5]\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        env={**os.environ, "FER_TUNE_CACHE": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr


@contextlib.contextmanager
def local_ray(env: dict):
    """A process with fer-tune's local Ray (ray_session, 1 CPU) running while the block runs."""
    code = (
        "import sys\n"
        "from fer_tune.tune.runtime.session import ray_session\n"
        "with ray_session(None, num_cpus=1):\n"
        "    print('up', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "up"
        yield
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0


def test_a_local_ray_starts_no_idle_workers_unless_the_user_asks(env):
    """Ray prestarts idle Python workers for the first driver; Tune's trials never use them (they are actors with
    workers of their own), so fer-tune's local Ray goes without. A user's RAY_prestart_worker_first_driver stands."""
    from fer_tune.tune.runtime.internals import PRESTART_ENV

    def idle() -> int:  # this Ray's processes have its RAY_TMPDIR
        return sum(c.startswith("ray::IDLE") and e.get("RAY_TMPDIR") == env["RAY_TMPDIR"] for _, c, e in processes())

    with local_ray(env):
        time.sleep(3)  # Ray's prestarted workers are up about 1 s after the driver connects
        fer_tune_idle = idle()
    with local_ray({**env, PRESTART_ENV: "1"}):
        deadline = time.time() + 15
        while not idle() and time.time() < deadline:
            time.sleep(0.2)
        user_idle = idle()
    assert fer_tune_idle == 0 and user_idle >= 1, (fer_tune_idle, user_idle)


def children(pid: int) -> list[int]:
    """The PIDs of the processes whose parent is `pid`."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def test_multi_node_cluster_survives_losing_a_node(tmp_path, env, monkeypatch):
    """A head and two GPU worker nodes (fake GPUs; trials fall back to CPU). Trials need half a GPU, so they
    run on the workers only; one worker is killed mid-study and its trial finishes on the other one from its
    checkpoint. All nodes share this machine's filesystem, as a cluster shares NFS."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_TMPDIR", env["RAY_TMPDIR"])
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    space = write_space(
        tmp_path,
        num_samples=4,
        max_epochs=4,
        data={"path": "synthetic:3000"},
        fixed={**SPACE["fixed"], "width": 0.125},
        early_stopping={"type": "none"},
        resources={"cpu": 1, "gpu": 0.5},
    )
    sdir = tmp_path / "results" / "t"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, num_gpus=1)
        doomed = cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fer_tune.cli",
                "sweep",
                str(space),
                "--results",
                str(tmp_path / "results"),
                "--address",
                cluster.address,
                "--quiet",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        doomed_id = doomed.node_id[:12]
        (raylet,) = doomed.all_processes["raylet"]
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            # a trial's third epoch on the doomed node, seen in the copy of its result that the trial writes into
            # its checkpoint in the storage at once (result.json is the driver's, copied there every few seconds:
            # under load it showed a trial's epochs only once it had finished). By then Tune has taken the
            # earlier epochs' checkpoints (it takes one a turn of its loop after the result it came with).
            third = [r for d in sdir.glob("tune/*/") for r in checkpointed_results(str(d), lambda e: e == 3)]
            if any(r.get("node_id") == doomed_id for r in third):
                # the node's workers are frozen at once, the node is lost, then they are ended: a worker that
                # outlived its raylet by a second or two could otherwise finish its trial there
                workers = children(raylet.process.pid)
                for pid in workers:
                    os.kill(pid, signal.SIGSTOP)
                cluster.remove_node(doomed, allow_graceful=False)
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)
        else:
            pytest.fail("no trial reached its third epoch on the second worker")
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    finally:
        cluster.shutdown()
    trials = study_trials(sdir)
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    rows = read_csv(sdir)
    moved = [r for r in rows if int(r["nodes"]) == 2]
    assert moved and all(int(r["restarts"]) >= 1 and r["epochs"] == "4" for r in moved)
    starts = [
        json.loads(line)["start_epoch"]
        for f in sdir.glob("tune/*/result.json")
        for line in f.read_text().splitlines()
        if line.strip()
    ]
    assert max(starts) >= 1  # continued from its checkpoint on the other node


def test_asha_rungs_are_rebuilt_from_earlier_results(tmp_path):
    """After a restore, ASHA knows what trials reported before the interruption (Ray does not save rungs)."""
    from fer_tune.tune.study.searcher import make_scheduler
    from fer_tune.tune.study.spaces import parse_space

    spec = parse_space(
        {**SPACE, "max_epochs": 8, "early_stopping": {"type": "asha", "grace_period": 1, "reduction_factor": 2}},
        source="t.yaml",
    )
    exp = tmp_path / "tune"
    for tid, accs in {"a": [10, 20, 30, 40], "b": [15, 25], "c": [5]}.items():
        (exp / f"trial_{tid}").mkdir(parents=True)
        lines = [
            json.dumps({"trial_id": tid, "epoch": e + 1, "training_iteration": e + 1, "val_acc": v})
            for e, v in enumerate(accs)
        ]
        (exp / f"trial_{tid}" / "result.json").write_text("\n".join(lines) + "\n")
    asha = make_scheduler(spec, [str(exp)])
    assert asha.seed_rungs() == 6
    rungs = {milestone: recorded for milestone, recorded in asha._brackets[0]._rungs}
    assert rungs[1] == {"a": 10, "b": 15, "c": 5}
    assert rungs[2] == {"a": 20, "b": 25}
    assert rungs[4] == {"a": 40}
    # a new trial at rung 1 is now judged against the earlier ones: 6 is below the median cutoff of 10
    cutoff = asha._brackets[0].cutoff(rungs[1])
    assert cutoff == 10


# ---------------------------------------------------------------------------------------------------------
# a study never waits for resources that cannot come
# ---------------------------------------------------------------------------------------------------------
def test_a_trial_too_big_for_the_local_ray_is_refused_before_it_starts(tmp_path, env):
    space = write_space(tmp_path)
    env = {**env, "CUDA_VISIBLE_DEVICES": ""}  # no GPU for Ray to find, on any machine
    for flags, asked in ((["--gpus-per-trial", "0.25"], "1 CPU and 0.25 GPU"), (["--cpus-per-trial", "3"], "3 CPU")):
        t0 = time.time()
        r = fer_tune(env, "sweep", space, "--results", tmp_path / "results", "--quiet", *flags)
        assert r.returncode == 2, r.stdout + r.stderr
        line = r.stderr.strip()
        assert line.count("\n") == 0 and "Traceback" not in line, line
        assert (
            f"each trial asks for {asked}, but the local Ray on this machine has {SESSION_RAY_CPUS} CPU and 0 GPU"
            in line
        )
        assert "--cpus-per-trial N and --gpus-per-trial F" in line and "--address" in line
        assert time.time() - t0 < 60
    assert not (tmp_path / "results" / "t").exists()  # refused before anything was written


def test_a_cluster_waits_for_a_node_and_says_so_once(monkeypatch, caplog):
    from fer_tune.common import FerTuneError
    from fer_tune.tune.runtime import preflight

    nodes = [{"Resources": {"CPU": 8.0}}, {"Resources": {"CPU": 4.0, "GPU": 0.0}}]
    monkeypatch.setattr(preflight, "alive_nodes", lambda: nodes)
    caplog.set_level(logging.INFO, logger="fer_tune")
    preflight.check_trials_fit({"cpu": 4, "gpu": 0}, None, "fix")  # fits: silent
    assert caplog.text == ""
    preflight.check_trials_fit({"cpu": 4, "gpu": 1}, "auto", "fix")  # a cluster may grow: wait, say it once
    err = "".join(r.getMessage() + "\n" for r in caplog.records)  # the lines fer-tune's commands print on stderr
    assert err.count("\n") == 1 and "no node of the Ray cluster can hold a trial yet (4 CPU and 1 GPU each" in err
    assert "waiting for the cluster to add one" in err
    with pytest.raises(FerTuneError, match=r"each run asks for 4 CPU and 1 GPU, but the local Ray .* fix$"):
        preflight.check_trials_fit({"cpu": 4, "gpu": 1}, None, "fix", what="run")


def test_sigterm_to_the_process_group_stops_a_sweep_like_ctrl_c_and_one_driver_runs_a_study(tmp_path, env):
    space = write_space(tmp_path, num_samples=4, max_epochs=4, early_stopping={"type": "none"})
    results = tmp_path / "results"
    sdir = results / "t"
    marker = tmp_path / "paused"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fer_tune.cli", "sweep", str(space), "--results", str(results), "--num-cpus", "2"],
        env=pausing(env, marker, results=1),  # the sweep waits after its first epoch until the signal comes
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "the sweep ended before it paused"
            time.sleep(0.2)
        # a second driver of the same study is refused at once, naming the one that runs it
        t0 = time.time()
        r = fer_tune(env, "resume", sdir, "--quiet")
        assert r.returncode == 2 and time.time() - t0 < 30, r.stdout + r.stderr
        err = r.stderr.strip()
        assert err.count("\n") == 0 and f"the study is being run by `fer-tune sweep {space}" in err, err
        assert f"(PID {proc.pid} on " in err and "since " in err
        r = fer_tune(env, "extend", sdir, "--num-samples", 1)
        assert r.returncode == 2 and "is being run by" in r.stderr
        r = fer_tune(env, "final", sdir, "--epochs", 1, "--finetune-epochs", 1)
        assert r.returncode == 2 and "its best trial is not settled yet" in r.stderr, r.stderr
        assert not (sdir / "final").exists()
        # readers never need the lock, and say who runs the study
        r = fer_tune(env, "status", sdir)
        assert r.returncode == 0 and "the study is being run now by `fer-tune sweep" in r.stdout, r.stdout
        r = fer_tune(env, "report", sdir)
        assert r.returncode == 0 and 'id="running-study"' in (sdir / "report.html").read_text()
        assert proc.poll() is None
        # SIGTERM to the whole process group (a batch system, `kill -TERM -PGID`)
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143 and took < 60, (proc.returncode, took, out, err)
    assert f"study interrupted; continue it with:\n    fer-tune resume {sdir}" in err  # progress: stderr
    assert "SIGTERM received: stopping the trials" in err
    assert "*** SIGTERM received" not in err + out and "PC: @" not in err + out and "Traceback" not in err
    rows = read_csv(sdir)
    assert len(rows) >= 1 and (sdir / "report.html").exists()
    assert json.loads((sdir / "study.json").read_text())["runs"][0]["wall_seconds"] > 0
    # nothing runs it now: its unfinished trials are interrupted, not running
    unfinished = [row for row in rows if row["state"] == "RUNNING"]
    assert unfinished and all(row["status"] == "interrupted" for row in unfinished), rows
    r = fer_tune(env, "status", sdir)
    assert r.returncode == 0 and "interrupted" in r.stdout and " running " not in r.stdout
    assert "being run now" not in r.stdout
    assert (sdir / ".lock").read_text() == ""  # released
    # Tune saved its state: the study resumes and finishes, every trial with all its epochs
    r = fer_tune(env, "resume", sdir, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "took over the lock" not in r.stderr
    trials = study_trials(sdir)
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    assert all(row["epochs"] == "4" for row in read_csv(sdir))


def test_chaos_three_sigkills_then_a_resume_lose_nothing(tmp_path, env):
    """SIGKILL of the driver's process group at seeded points (after 1 to 3 of its epochs and Tune's next saved
    state), three times (twice during a resume), the last one as if it came while Tune wrote its state (the file
    cut off, as a kill mid-copy or a full disk leaves it): the last resume continues from the state before it and
    ends with exactly num_samples finished trials, no duplicate parameters, no RUNNING leftovers, and every finished
    trial's per-epoch history complete; trials continue from their checkpoints, and the study's record keeps each
    command's session (the killed ones without an end)."""
    import random

    rng = random.Random(int(os.environ.get("FER_TUNE_CHAOS_SEED", "0")))
    n, epochs = 5, 5
    space = write_space(
        tmp_path,
        num_samples=n,
        max_epochs=epochs,
        early_stopping={"type": "asha", "grace_period": 2, "reduction_factor": 2},
    )
    results = tmp_path / "results"
    sdir = results / "t"
    sweep = [
        sys.executable,
        "-m",
        "fer_tune.cli",
        "sweep",
        str(space),
        "--results",
        str(results),
        "--quiet",
        "--num-cpus",
        "2",
    ]
    resume = [sys.executable, "-m", "fer_tune.cli", "resume", str(sdir), "--quiet", "--num-cpus", "2"]
    kills = []
    for k, cmd in enumerate((sweep, resume, resume)):
        marker = tmp_path / f"paused-{k}"
        proc = subprocess.Popen(
            cmd,
            env=pausing(env, marker, results=rng.randint(1, 3)),  # after 1 to 3 of this command's epochs
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 180
            while time.time() < deadline and proc.poll() is None and not marker.exists():
                time.sleep(0.2)
            ended = proc.poll() is not None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended, and its Ray with it
                pass
            out = proc.communicate()[0]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        kills.append("ended first" if ended else "killed")
        assert "Traceback" not in out, out
        time.sleep(1)  # Ray's daemons end with their driver
    assert kills.count("killed") >= 2, kills  # the kills landed while the study ran
    states = sorted((sdir / "tune").glob("experiment_state-*.json"))
    assert len(states) >= 2 and kills[-1] == "killed", (states, kills)
    states[-1].write_bytes(states[-1].read_bytes()[: states[-1].stat().st_size // 2])
    r = fer_tune(env, "resume", sdir, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "continuing from the state saved before it" in r.stderr, r.stderr
    assert "Error handling checkpoint" not in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr
    trials = study_trials(sdir)
    assert len(trials) == n and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials), [
        t.state.name for t in trials
    ]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == n
    from fer_tune.tune.study.outputs import read_results

    results_by_trial = read_results([sdir / "tune"])
    rows = {int(row["number"]): row for row in read_csv(sdir)}
    for t in trials:
        got = [int(x["epoch"]) for x in results_by_trial[t.user_attrs["ray_trial_id"]]]
        steps = sorted(int(k) for k in t.intermediate_values)
        want = epochs if t.state.name == "COMPLETE" else max(steps)
        assert steps == list(range(1, want + 1)), (t.number, steps)
        # every epoch up to the study's decision (a trial that restarted may have run one more before it was stopped)
        assert got[:want] == list(range(1, want + 1)) and len(got) <= want + 1, (t.number, got)
        assert int(rows[t.number]["epochs"]) == want, (t.number, rows[t.number])
    # trials that were running continued from their checkpoints (start_epoch > 0), not from scratch
    starts = [
        json.loads(line).get("start_epoch", 0)
        for f in sdir.glob("tune/*/result.json")
        for line in f.read_text().splitlines()
        if line.strip()
    ]
    assert max(starts) > 0
    # a killed command's session has no end; the last resume took up the unfinished trials and finished
    sessions = json.loads((sdir / "study.json").read_text())["runs"][0]["sessions"]
    assert [s["kind"] for s in sessions] == ["start", "resume", "resume", "resume"], sessions
    assert [("outcome" in s) for s in sessions[:3]] == [k == "ended first" for k in kills], (sessions, kills)
    last = sessions[-1]
    assert last["outcome"] == "finished" and last["trials_finished"] == n and 1 <= last["trials_continued"] <= n
    from fer_tune.report.study import sessions_text

    text = sessions_text(sessions)
    assert "ended without a record (the driver was killed)" in text and "finished after 0:" in text
    assert f"resumed {last['started']} ({last['trials_continued']} unfinished trial(s) taken up)" in text
