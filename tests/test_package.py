"""fer-tune as a wheel: built from this checkout, installed into a fresh virtual environment (which borrows the
running interpreter's torch, Ray and Optuna rather than downloading them: its site-packages, a virtualenv's
included, not the system's), run from a directory that is not the checkout.
The shipped search spaces and the reference table are package data, so the demo, a shipped space by name and
the report's table of published numbers work without the repository."""

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
    r = run("-m", "fer_tune.cli", "demo", "--out", str(work / "demo"), "--quick", "--num-cpus=2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    html = (work / "demo" / "report.html").read_text()
    table = re.search(r'<table id="reference-table">.*?</table>', html, re.S)
    assert table and "73.28" in table.group(0) and "Khaireddin" in table.group(0)
