"""`fer-tune demo --quick` end to end: sweep -> final stage -> report, as README's main command runs it."""

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile


def test_demo_quick_end_to_end(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "FER_TUNE_CACHE": str(tmp_path / "c")}
    out = tmp_path / "demo"
    try:
        r = subprocess.run([sys.executable, "-m", "fer_tune.cli", "demo", "--out", str(out), "--quick",
                            "--num-cpus", "2"], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        for step in ("[1/3] sweep", "[2/3] final stage", "[3/3] report", "open the report", "optuna-dashboard"):
            assert step in r.stdout
        with open(out / "trials.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 4 and {x["param_optimizer"] for x in rows} <= {"sgd_nesterov", "adam", "adamw"}
        m = json.loads((out / "final" / "metrics.json").read_text())
        assert m["status"] == "complete"
        assert m["aggregate"]["finetuned"]["top1"]["mean"] > 100 / 7 + 3  # it learned: above chance
        html = (out / "report.html").read_text()
        assert "demo" in html and "Final stage" in html
        # again: everything is there, nothing is re-run
        r = subprocess.run([sys.executable, "-m", "fer_tune.cli", "demo", "--out", str(out), "--quick",
                            "--num-cpus", "2"], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "the study is complete" in r.stdout and "final stage is complete" in r.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
