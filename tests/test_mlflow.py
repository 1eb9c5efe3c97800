"""MLflow tracking (--mlflow) on a local file store and on a real `mlflow server` (started once for the module on a
free loopback port, with its own backend store): one run per trial with its config, its epochs, its tags and its
status; a SIGKILLed driver resumed and a study extended with no run and no metric step twice; the final stage's
metrics and model files; the server going away mid-study and caught up afterwards; the credentials of an env:VAR URI
in no file; bad URIs, an unreachable server, a store that cannot be written, MLflow missing: one line, exit 2."""

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import SPACE, cli_args, fer_tune, kill_at_pause, pausing, read_csv, write_space

from fer_tune.common import FerTuneError

SECRET = "hunter2-mlflow"
ENV_VAR = "FER_TUNE_TEST_MLFLOW"
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend store and proxied artifacts in `root`; start() / stop()
    (stop: the server's own process group, by the PID this object started)."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--workers", "1"]
        cmd += ["--artifacts-destination", str(self.root / "artifacts")]
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        pytest.fail("the MLflow server did not answer within 120 s")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:  # its uvicorn worker, in the session the server leads
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None


@pytest.fixture(autouse=True)
def _mlflow_settings_restored():
    """fer-tune sets MLflow's client settings (MLFLOW_*) in the process that tracks: here, the test's."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[k]
    os.environ.update(saved)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("mlflow")
    s = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    s.start()
    yield s
    s.stop()


def client_of(uri: str):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to read a file store
    return MlflowClient(tracking_uri=uri)


def study_runs(client, name: str = "t") -> dict:
    """{Optuna trial number: [MLflow run, ...]} of a study's experiment."""
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'study'", max_results=1000) if exp else []
    out: dict[int, list] = {}
    for r in runs:
        out.setdefault(int(r.data.tags["optuna_trial"]), []).append(r)
    return out


def assert_runs_match_the_study(client, sdir: Path) -> None:
    """Exactly one run per trial, its params, tags and status those of the trial, every epoch once per metric."""
    rows = read_csv(sdir)
    runs = study_runs(client)
    assert sorted(runs) == sorted(int(r["number"]) for r in rows)
    assert all(len(v) == 1 for v in runs.values()), {n: len(v) for n, v in runs.items()}
    for row in rows:
        (run,) = runs[int(row["number"])]
        tags, params = run.data.tags, run.data.params
        assert run.info.status == STATUS[row["state"]], (row, run.info)
        assert tags["study"] == "t" and tags["ray_trial_id"] == row["ray_trial_id"]
        assert tags["outcome"] == ("pruned" if row["state"] == "PRUNED" else "completed")
        assert params["optimizer"] == row["param_optimizer"]
        assert float(params["lr"]) == pytest.approx(float(row["param_lr"]))
        assert float(params["width"]) == SPACE["fixed"]["width"] and int(params["epochs"]) == 4  # the whole config
        epochs = list(range(1, int(row["epochs"]) + 1))
        for key in run.data.metrics:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == epochs, (row["number"], key, steps)  # every epoch, none twice
        history = client.get_metric_history(run.info.run_id, "val_acc")
        # trials.csv rounds to 4 decimals
        assert max(m.value for m in history) == pytest.approx(float(row["best_val_acc"]), abs=5.01e-5)
        assert {"train_loss", "val_loss", "lr", "device_seconds", "val_recall_happy"} <= set(run.data.metrics)


def files_hold(root: Path, text: str) -> list[str]:
    return [str(f) for f in root.rglob("*") if f.is_file() and text.encode() in f.read_bytes()]


# ---------------------------------------------------------------------------------------------------------
# the URI and the check at start, without Ray
# ---------------------------------------------------------------------------------------------------------
def test_what_is_recorded_for_a_uri(tmp_path, monkeypatch):
    from fer_tune.tune.study.record import mlflow_ref

    monkeypatch.chdir(tmp_path)
    assert mlflow_ref("off") is None
    assert mlflow_ref("mlruns") == (tmp_path / "mlruns").as_uri()  # absolute: resume runs from anywhere
    assert mlflow_ref(f"file://{tmp_path}/a b") == (tmp_path / "a b").as_uri()
    assert mlflow_ref("http://127.0.0.1:5000/") == "http://127.0.0.1:5000"
    assert mlflow_ref("env:" + ENV_VAR) == "env:" + ENV_VAR
    for bad, says in (
        (f"https://ml:{SECRET}@mlflow.internal", "holds a password"),
        ("databricks://profile", "give a directory"),
        ("http://:5000", "names no host"),
        ("env:1X", "names an environment variable"),
    ):
        with pytest.raises(FerTuneError, match=says) as info:
            mlflow_ref(bad)
        assert SECRET not in str(info.value) and "\n" not in str(info.value)


def test_a_store_that_cannot_be_written_or_no_mlflow_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from fer_tune.tune.mlflow.tracking import check

    # off, given on resume, wins over the recorded server (which is not even asked)
    assert check("off", "t", recorded=f"http://127.0.0.1:{free_port()}") is None
    assert check(None, "t", recorded=None) is None
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FerTuneError, match="cannot be written"):
        check(str(tmp_path / "a-file" / "mlruns"), "t")
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(FerTuneError, match=f"the environment variable {ENV_VAR} is not set"):
        check("env:" + ENV_VAR, "t")
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(FerTuneError, match=r"MLflow is not installed .*pip install -e '\.\[mlflow\]'"):
        check(str(tmp_path / "mlruns"), "t")


@pytest.mark.slow  # a fer-tune process
def test_an_unreachable_server_stops_a_sweep_before_it_starts(tmp_path):
    """One line, exit 2, nothing written, and the credentials of the env:VAR URI not shown."""
    pytest.importorskip("mlflow")
    space = write_space(tmp_path)
    env = {**os.environ, ENV_VAR: f"http://ml:{SECRET}@127.0.0.1:{free_port()}"}
    r = subprocess.run(
        cli_args("sweep", space, "--results", tmp_path / "results", "--mlflow", f"env:{ENV_VAR}"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"fer-tune: error: --mlflow env:{ENV_VAR}: the tracking server does not answer")
    assert "--mlflow off" in r.stderr and SECRET not in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()


def test_mlflow_going_away_is_said_once_and_what_it_missed_follows_when_it_is_back(tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    from fer_tune.tune.mlflow import tracking
    from fer_tune.tune.study.record import mlflow_ref

    monkeypatch.setattr(tracking, "RETRY_S", 0.0)  # try again at once
    ml = tracking.Mlflow(mlflow_ref(str(tmp_path / "mlruns")), "t").open()
    real = ml.client

    class Flaky:
        down = False

        def __getattr__(self, name):
            if Flaky.down:
                raise ConnectionError("[Errno 111] Connection refused")
            return getattr(real, name)

    ml.client = Flaky()
    run = ml.create_run("trial 0", {"stage": "study"})
    assert ml.log(run, [("val_acc", 10.0, 1)])
    Flaky.down = True
    with caplog.at_level(logging.WARNING, logger="fer_tune"):
        assert not ml.log(run, [("val_acc", 20.0, 2)])
        assert not ml.log(run, [("val_acc", 20.0, 2), ("val_acc", 30.0, 3)])
        Flaky.down = False
        assert ml.log(run, [("val_acc", 10.0, 1), ("val_acc", 20.0, 2), ("val_acc", 30.0, 3)])
    said = [r.getMessage() for r in caplog.records]
    assert sum("went away" in m for m in said) == 1 and sum("is back" in m for m in said) == 1, said
    assert "Connection refused" in said[0] and ml.came_back
    assert [(m.step, m.value) for m in real.get_metric_history(run.id, "val_acc")] == [(1, 10.0), (2, 20.0), (3, 30.0)]


def test_a_run_made_just_before_mlflow_went_away_gets_its_params_once_it_is_back(tmp_path, monkeypatch):
    """A trial's run was made, then MLflow went away before its params went through: they follow when it answers
    again (the run was kept as it was, without them, for good)."""
    pytest.importorskip("mlflow")
    import types

    import optuna

    from fer_tune.tune.mlflow import tracking
    from fer_tune.tune.mlflow.study import StudyTracking
    from fer_tune.tune.study.record import mlflow_ref
    from fer_tune.tune.study.spaces import load_space

    monkeypatch.setattr(tracking, "RETRY_S", 0.0)  # try again at once
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    t = optuna.create_study(study_name="t", storage=storage).ask()
    params = {
        "optimizer": t.suggest_categorical("optimizer", ["sgd_nesterov", "adam"]),
        "lr": t.suggest_float("lr", 1e-3, 5e-2, log=True),
        "dropout": t.suggest_float("dropout", 0.0, 0.5),
    }
    t.set_user_attr("ray_trial_id", "a_00000")
    record = {"name": "t", "created": "2026-12-08T00:00:00", "optuna_study": "t", "storage": storage, "runs": []}
    st = StudyTracking(
        tmp_path, {**record, "mlflow": mlflow_ref(str(tmp_path / "mlruns"))}, load_space(write_space(tmp_path))
    )
    st.setup()  # connects, finds no run
    real = st.ml.client

    class ParamsLost:
        down = True

        def __getattr__(self, name):
            if ParamsLost.down and name == "log_batch":
                raise ConnectionError("[Errno 111] Connection refused")
            return getattr(real, name)

    st.ml.client = ParamsLost()
    trial = types.SimpleNamespace(trial_id="a_00000")
    st.on_trial_start(0, [], trial)  # the run is made; its params do not go through
    ParamsLost.down = False
    st.on_trial_result(1, [], trial, {"epoch": 1, "val_acc": 20.0, "train_loss": 1.5})
    st.on_experiment_end([])
    (run,) = study_runs(real)[0]
    assert run.data.params["optimizer"] == params["optimizer"] and float(run.data.params["lr"]) == params["lr"]
    assert float(run.data.params["width"]) == SPACE["fixed"]["width"]  # the whole config
    assert [m.value for m in real.get_metric_history(run.info.run_id, "val_acc")] == [20.0]


# ---------------------------------------------------------------------------------------------------------
# studies with Ray, through the CLI
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_file_store_a_killed_driver_resumed_and_the_final_stage(tmp_path, env):
    pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    space = write_space(
        tmp_path,
        num_samples=4,
        early_stopping={"type": "asha", "grace_period": 2, "reduction_factor": 2},
    )
    results = tmp_path / "results"
    sdir = results / "t"
    proc = subprocess.Popen(
        cli_args("sweep", space, "--results", results, "--quiet", "--mlflow", store),
        env=pausing(env, tmp_path / "paused"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    kill_at_pause(proc, tmp_path / "paused", within=180)
    client = client_of(store.as_uri())
    assert any(r.info.status == "RUNNING" for v in study_runs(client).values() for r in v)

    r = fer_tune(env, "resume", sdir, "--quiet")  # to the store study.json recorded
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_runs_match_the_study(client, sdir)

    r = fer_tune(env, "final", sdir, "--epochs", 2, "--finetune-epochs", 1, "--eval-every", 1, "--quiet")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    exp = client.get_experiment_by_name("t")
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'final'")
    assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "complete"
    metrics = run.data.metrics
    assert metrics["test_top1_finetuned"] == pytest.approx(metrics["seed_0/test_top1_finetuned"])
    assert {"test_top2_last", "test_macro_f1_best_val", "seed_0/finetune/val_acc", "device_hours"} <= set(metrics)
    for key, epochs in (("seed_0/val_acc", [1, 2]), ("seed_0/finetune/train_loss", [1])):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == epochs
    assert run.data.params["finetune_epochs"] == "1" and run.data.params["seeds"] == "0"
    exported = sorted(p.name for p in (sdir / "final").glob("model.*"))
    assert {"model.pt", "model.json"} <= set(exported)
    assert sorted(Path(f.path).name for f in client.list_artifacts(run.info.run_id, "model")) == exported
    assert {"metrics.json", "history.csv", "final.json"} <= {f.path for f in client.list_artifacts(run.info.run_id)}
    # a complete stage run again: nothing new, the same single run
    r = fer_tune(env, "final", sdir, "--quiet")
    assert r.returncode == 0 and len(client.search_runs([exp.experiment_id], "tags.stage = 'final'")) == 1


@pytest.mark.slow
def test_a_server_with_credentials_that_goes_away_mid_study_then_an_extend(server, tmp_path, env):
    env = {**env, ENV_VAR: f"http://fertune:{SECRET}@127.0.0.1:{server.port}"}
    space = write_space(tmp_path, num_samples=4, data={"path": "synthetic:2000"})
    results = tmp_path / "results"
    sdir = results / "t"
    proc = subprocess.Popen(
        cli_args("sweep", space, "--results", results, "--mlflow", f"env:{ENV_VAR}"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = client_of(server.url)
    deadline = time.time() + 240
    while not any(r.data.metrics for v in study_runs(client).values() for r in v):  # a trial's first epoch is in
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.5)
    server.stop()  # away until the study has finished without it
    out, err = proc.communicate(timeout=600)
    server.start()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert err.count("went away") == 1 and "is behind the study" in err, err[-3000:]

    r = fer_tune(env, "extend", sdir, "--num-samples", 1, "--quiet")  # catches MLflow up, then one trial more
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "trial run(s) brought up to the study" in r.stderr and len(read_csv(sdir)) == 5
    assert_runs_match_the_study(client, sdir)
    for text in (out, err, r.stdout, r.stderr):
        assert SECRET not in text
    assert files_hold(results, SECRET) == []  # study.json records env:VAR; tuner.pkl, logs, Tune's state: no URL
    assert files_hold(results, f"env:{ENV_VAR}")
