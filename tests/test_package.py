"""fer-tune as a wheel: built from this checkout, installed into a fresh virtual environment (which borrows the
running interpreter's torch, Ray and Optuna rather than downloading them: its site-packages, a virtualenv's
included, not the system's), run from a directory that is not the checkout.
The shipped search spaces and the reference table are package data, so the demo, a shipped space by name and
the report's table of published numbers work without the repository. The demo there is README's first command
end to end (`fer-tune demo --quick`: sweep -> final stage -> report), as a newcomer runs it."""

import csv
import json
import re
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_runs_the_demo_and_reports_with_the_reference_table(tmp_path, env):
    dist = tmp_path / "dist"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = dist.glob("fer_tune-*.whl")
    venv.EnvBuilder(with_pip=False).create(tmp_path / "venv")
    python = tmp_path / "venv" / "bin" / "python"
    clean = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # nothing but the venv decides what is imported
    r = subprocess.run(  # (with PYTHONPATH set, pip finds fer-tune "already installed" and installs nothing)
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # then the running interpreter's packages as plain path entries (pip saw none of them: it installed the wheel, not
    # "already satisfied" by this checkout's editable install), whose .pth files are not run: fer_tune is the wheel's
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    borrowed = [*site.getsitepackages(), site.getusersitepackages()]
    (Path(purelib) / "borrowed.pth").write_text("\n".join(p for p in borrowed if Path(p).is_dir()) + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args, timeout=600):
        return subprocess.run(
            [str(python), *args], cwd=work, env=clean, capture_output=True, text=True, timeout=timeout
        )

    r = run("-c", "import fer_tune, sys; print(fer_tune.__file__)")
    assert r.returncode == 0 and str(tmp_path / "venv") in r.stdout, r.stdout + r.stderr  # the wheel, not the checkout
    r = run("-c", "from fer_tune.tune.study.spaces import load_space; print(load_space('joint').name)")
    assert r.returncode == 0 and r.stdout.strip() == "joint", r.stderr[-2000:]
    out = work / "demo"
    r = run("-m", "fer_tune.cli", "demo", "--out", str(out), "--quick", "--num-cpus=2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    demo_says_and_writes(r, out)
    html = (out / "report.html").read_text()
    table = re.search(r'<table id="reference-table">.*?</table>', html, re.S)
    assert table and "73.28" in table.group(0) and "Khaireddin" in table.group(0)
    # again: everything is there, nothing is re-run
    r = run("-m", "fer_tune.cli", "demo", "--out", str(out), "--quick", "--num-cpus=2")
    assert r.returncode == 0 and "the study is complete" in r.stderr and "final stage is complete" in r.stderr


def demo_says_and_writes(r, out):
    for step in ("[1/3] sweep", "[2/3] final stage", "[3/3] report"):  # progress: stderr
        assert step in r.stderr
    for result in ("best: trial", "test top-1", "open the report", "fer-tune dashboard"):  # results: stdout
        assert result in r.stdout
    # how to get the dashboard, and that the model is no model for real photos
    assert "pip install -e '.[dashboard]'" in r.stdout and "it learnt synthetic faces" in r.stdout
    # the space is the demo's own, named as such (no temporary file that is gone)
    assert json.loads((out / "study.json").read_text())["space_file"].startswith("the demo's own space")
    # progress in fer-tune's words, one line per event; Tune's tables and Ray's notes kept out of the terminal
    assert re.search(r"^trial \d+ started: optimizer=", r.stderr, re.M), r.stderr[-3000:]
    assert re.search(r"^trial \d+ (completed: best val_acc|pruned at epoch)", r.stderr, re.M)
    assert re.search(r"^seed 0 epoch \d+/\d+ \(finetune\): val_acc", r.stderr, re.M)
    assert "== Status ==" not in r.stdout + r.stderr and "Tuner.restore" not in r.stderr
    assert (out / "ray.log").is_file() and (out / "final" / "ray.log").is_file()
    with open(out / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {x["param_optimizer"] for x in rows} <= {"sgd_nesterov", "adam", "adamw"}
    m = json.loads((out / "final" / "metrics.json").read_text())
    assert m["status"] == "complete"
    assert m["aggregate"]["finetuned"]["top1"]["mean"] > 100 / 7 + 3  # it learned: above chance
    html = (out / "report.html").read_text()
    assert "demo" in html and "Final stage" in html
    assert len(html.encode()) < 2_000_000  # plotly.js inside it, packed (the whole plotly.js alone is 4.8 MB)
