"""`fer-tune space check` (a space compiled without running a trial) and `fer-tune dashboard` (optuna-dashboard over
a study's storage, loaded in a real browser)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import yaml

from fer_tune.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_space_check_prints_the_compiled_space_and_its_budget(capsys):
    code, out, err = run(capsys, "space", "check", "fer2013_cpu", "--num-cpus", "4")
    assert code == 0, err
    assert "a valid space, study fer2013_cpu" in out
    assert re.search(
        r"^  lr_sgd +float +0.003 .. 0.1 \(log\)  when optimizer in \[sgd_nesterov, sgd\]  \(sets lr\)$", out, re.M
    )
    assert "64 sampled trial configs are valid training configs" in out
    # 16 trials of 8 epochs; ASHA rungs at 2 and 4 keep half: 2 + 2/2 + 4/4 = 4 epochs per trial
    assert "at most 128 trial-epochs; ASHA expects about 64 (its rungs at epoch 2, 4 keep 1/2" in out
    assert "1 CPU, 0 GPU; on this machine (4 CPU, " in out and "4 trial(s) at once" in out
    assert "the space needs --data PATH" in out and "\nwarm start: trial 0 is the paper's recipe\n" in out
    code, out, _ = run(capsys, "space", "check", "fer2013_cpu", "--json", "--num-cpus", "4")
    r = json.loads(out)
    assert r["epoch_budget"] == {"worst": 128, "rungs": [2, 4], "expected": 64.0}
    assert r["capacity"]["at_once"] == 4 and r["data"] is None and r["data_required"] is True
    assert r["parameters"]["dropout"]["low"] == 0.0  # a zero bound is kept
    code, out, _ = run(capsys, "space", "check", "optimizer")
    assert code == 0 and "warm start: no trial of the paper's recipe (a grid study runs its grid)" in out


def test_space_check_counts_trials_at_once_and_reads_the_data(capsys, tmp_path):
    code, out, err = run(capsys, "space", "check", "joint", "--num-cpus", "64")
    assert code == 0 and "4 CPU, 0.25 GPU" in out and "none fits" in out
    code, out, err = run(capsys, "space", "check", "smoke", "--data", "synthetic:300", "--json")
    r = json.loads(out)
    assert code == 0 and sum(r["data"]["sizes"].values()) == 300 and r["grid_size"] is None
    code, out, _ = run(capsys, "space", "check", "optimizer", "--json")
    assert json.loads(out)["grid_size"] == 14
    code, _, err = run(capsys, "space", "check", "fer2013_cpu", "--data", "synthetic")
    assert code == 2 and "real faces" in err


def test_space_check_refuses_a_bad_space_in_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: {lr: {type: flaot}}\n")
    code, _, err = run(capsys, "space", "check", bad)
    assert code == 2 and "type must be one of" in err and err.count("\n") == 1
    # valid on its own, invalid in combination: a trial with sgd_nesterov and momentum 0
    combo = tmp_path / "combo.yaml"
    combo.write_text(
        yaml.safe_dump(
            {
                "space": {
                    "optimizer": {"type": "categorical", "choices": ["sgd_nesterov"]},
                    "momentum": {"type": "categorical", "choices": [0.0, 0.9]},
                }
            }
        )
    )
    code, _, err = run(capsys, "space", "check", combo)
    assert code == 2 and "sgd_nesterov needs momentum > 0" in err and "Traceback" not in err
    code, _, err = run(capsys, "space")
    assert code == 2
    # the space's own data path names the file and the key; one given with --data is said as given
    data = tmp_path / "data.yaml"
    data.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(tmp_path / "gone.csv")},
                "space": {"lr": {"type": "float", "low": 0.001, "high": 0.1}},
            }
        )
    )
    code, _, err = run(capsys, "space", "check", data)
    assert code == 2 and err.startswith(f"fer-tune: error: {data}: data.path: data path {tmp_path}/gone.csv does not")
    code, _, err = run(capsys, "space", "check", data, "--data", tmp_path / "also-gone.csv")
    assert code == 2 and err.startswith(f"fer-tune: error: data path {tmp_path}/also-gone.csv does not exist"), err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _study_dir(tmp_path, storage_ref: str, url: str):
    """A study directory as the dashboard reads it: study.json naming an Optuna storage with 5 trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="dash", storage=url, direction="maximize")
    for i in range(5):
        t = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
        study.tell(t, 30.0 + 3 * i if i != 3 else 60.0)
    sdir = tmp_path / "results" / "dash"
    sdir.mkdir(parents=True)
    (sdir / "study.json").write_text(
        json.dumps({"name": "dash", "spec": {}, "runs": [], "optuna_study": "dash", "storage": storage_ref})
    )
    return sdir


@pytest.mark.slow
def test_dashboard_serves_the_study_in_a_real_browser(tmp_path):
    pytest.importorskip("optuna_dashboard")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("FER_TUNE_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed")
    url = f"sqlite:///{tmp_path / 'secret-place.db'}"
    sdir = _study_dir(tmp_path, "env:FER_TUNE_TEST_DB", url)
    port = _free_port()
    env = {**os.environ, "FER_TUNE_TEST_DB": url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fer_tune.cli", "dashboard", str(sdir), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.3)
        page = f"http://127.0.0.1:{port}/dashboard/studies/1"
        r = subprocess.run(
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--no-first-run",
                "--virtual-time-budget=15000",
                "--dump-dom",
                page,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        text = re.sub(
            r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script).*?</\1>", "", r.stdout, flags=re.S))
        )
        assert "dash (id=1)" in text, text[:2000]
        assert "Best Trial (number=3)" in text and "60" in text  # the study's best trial, from its storage
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"optuna-dashboard for dash: {page} (Ctrl-C stops it)" in err
    assert "secret-place" not in out + err  # an env:VAR storage's URL is never printed
    assert "GET /" not in err  # no access log per request


def test_dashboard_errors_are_one_line(tmp_path, capsys):
    pytest.importorskip("optuna_dashboard")
    sdir = _study_dir(tmp_path, f"sqlite:///{tmp_path / 'o.db'}", f"sqlite:///{tmp_path / 'o.db'}")
    code, _, err = run(capsys, "dashboard", sdir, "--port", "70000")
    assert code == 2 and "a port is 0..65535" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, _, err = run(capsys, "dashboard", sdir, "--port", busy.getsockname()[1])
    assert code == 2 and "cannot listen on 127.0.0.1:" in err and "pass another --port" in err
    rec = json.loads((sdir / "study.json").read_text())
    (sdir / "study.json").write_text(json.dumps({**rec, "storage": "env:FER_TUNE_UNSET_VAR"}))
    code, _, err = run(capsys, "dashboard", sdir)
    assert code == 2 and "FER_TUNE_UNSET_VAR is not set" in err
