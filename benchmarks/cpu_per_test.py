"""CPU-seconds per test: which tests the suite's time goes to, Ray's processes and servers included.

python benchmarks/cpu_per_test.py [--top 30] [--out FILE.jsonl] [-- PYTEST ARGS]
    runs the tests one at a time (pytest without xdist; by default the whole suite, `python -m pytest -q`), and for
    each test the machine's busy CPU-seconds (/proc/stat) and wall seconds from its setup to its teardown: every
    process it started counts, its trial workers, Ray's daemons, PostgreSQL, SLURM. Run it on an otherwise idle
    machine. Prints the tests that used the most CPU and each file's total; --out keeps one JSON line per test.
    The tests run one after the other, so this takes the suite's CPU time in wall time (about 25 minutes here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from cpu_by_process import busy_cpu_seconds  # benchmarks/, on sys.path as the script's directory

ROOT = Path(__file__).resolve().parents[1]
OUT_ENV = "FER_TUNE_CPU_PER_TEST"  # where the plugin writes its JSON lines


# --- the pytest plugin (`-p cpu_per_test`, this module on PYTHONPATH) -----------------------------------------
_started: dict[str, tuple[float, float]] = {}


def pytest_runtest_protocol(item, nextitem):  # noqa: ARG001 (pytest's hook signature)
    _started[item.nodeid] = (busy_cpu_seconds(), time.monotonic())


def pytest_runtest_logfinish(nodeid, location):  # noqa: ARG001
    cpu, t0 = _started.pop(nodeid)
    row = {"id": nodeid, "cpu": round(busy_cpu_seconds() - cpu, 2), "wall": round(time.monotonic() - t0, 2)}
    with open(os.environ[OUT_ENV], "a") as fh:
        fh.write(json.dumps(row) + "\n")


# --- the command ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--top", type=int, default=30, help="how many of the costliest tests to list")
    ap.add_argument("--out", default=None, help="keep the per-test JSON lines in this file")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER, help="-- then pytest's arguments (default: -q)")
    a = ap.parse_args()
    args = a.pytest_args[1:] if a.pytest_args[:1] == ["--"] else a.pytest_args
    out = Path(a.out or tempfile.mkstemp(prefix="cpu-per-test-", suffix=".jsonl")[1])
    out.write_text("")
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(filter(None, [here, str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, OUT_ENV: str(out), "PYTHONPATH": path}
    t0, cpu0 = time.monotonic(), busy_cpu_seconds()
    cmd = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "cpu_per_test", *(args or ["-q"])]
    rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
    wall, cpu = time.monotonic() - t0, busy_cpu_seconds() - cpu0
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if not rows:
        sys.exit(f"no test ran (pytest exited {rc})")
    in_tests = sum(r["cpu"] for r in rows)
    print(
        f"\n{len(rows)} tests, pytest exit {rc}: {wall:.0f} s wall, {cpu:.0f} CPU-s on the machine, {in_tests:.0f} of"
    )
    print("them inside the tests")
    print(f"the {min(a.top, len(rows))} tests that used the most CPU (CPU-s, wall s):")
    for r in sorted(rows, key=lambda r: -r["cpu"])[: a.top]:
        print(f"  {r['cpu']:7.1f} {r['wall']:7.1f}  {r['id']}")
    files, walls = Counter(), Counter()
    for r in rows:
        name = r["id"].split("::")[0]
        files[name] += r["cpu"]
        walls[name] += r["wall"]
    print("by file (CPU-s, wall s):")
    for name, c in files.most_common():
        if c >= 1:
            print(f"  {c:7.1f} {walls[name]:7.1f}  {name}")
    print(f"per-test lines: {out}")


if __name__ == "__main__":
    main()
