"""One fer-tune command's cost under two versions of fer-tune, alternately: this tree and an earlier commit.

python benchmarks/bench_commands.py --base REV [--repeat 5] -- COMMAND [ARGS...]
    runs `python -m fer_tune.cli COMMAND ARGS` with this tree's fer_tune and with REV's (a temporary git worktree),
    one after the other, `--repeat` times, and prints each run's wall time and CPU-seconds: the command's own
    (its process and the children it waited for) and the machine's (/proc/stat; every process, Ray's daemons
    and trial workers included: run it on an idle machine). Then the median of each, side by side. `{new}` in an
    argument stands for a new empty directory each run (e.g. `sweep SPACE.yaml --results {new}`).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cpu_by_process import busy_cpu_seconds  # benchmarks/, on sys.path as the script's directory

ROOT = Path(__file__).resolve().parents[1]


def run(tree: Path, args: list[str]) -> tuple[float, float, float]:
    """(wall s, the command's CPU-s, the machine's CPU-s) of one run of `fer-tune ARGS` with `tree`'s fer_tune."""
    fresh = tempfile.mkdtemp(prefix="bench-")
    args = [x.replace("{new}", fresh) for x in args]
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_AUTH_MODE": "disabled"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, t0 = busy_cpu_seconds(), time.monotonic()
    # -P: not the working directory's fer_tune (python -m puts it first on sys.path), the tree's on PYTHONPATH
    cmd = [sys.executable, "-P", "-m", "fer_tune.cli", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, machine = time.monotonic() - t0, busy_cpu_seconds() - busy
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for d in (env["RAY_TMPDIR"], fresh):
        shutil.rmtree(d, ignore_errors=True)
    if r.returncode:
        sys.exit(f"fer-tune {' '.join(args)} with {tree} exited {r.returncode}:\n{r.stderr[-3000:]}")
    own = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, own, machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the earlier commit to compare with (any git revision)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...] of fer-tune")
    a = ap.parse_args()
    args = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not args:
        ap.error("give the fer-tune command after --")
    base_tree = Path(tempfile.mkdtemp(prefix="fer-tune-base-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base_tree), a.base], check=True)
    arms = {f"this tree ({ROOT.name})": ROOT, f"base ({a.base})": base_tree}
    got: dict[str, list[tuple[float, float, float]]] = {arm: [] for arm in arms}
    try:
        print(f"fer-tune {' '.join(args)}: {a.repeat} runs of each, alternately")
        for i in range(a.repeat):
            for arm, tree in arms.items():
                wall, own, machine = run(tree, args)
                got[arm].append((wall, own, machine))
                print(f"run {i + 1} {arm}: {wall:.2f} s wall, {own:.2f} CPU-s its own, {machine:.2f} CPU-s machine")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    print("median (min-max):")
    for arm, runs in got.items():
        cols = list(zip(*runs))
        parts = [f"{statistics.median(c):.2f} ({min(c):.2f}-{max(c):.2f})" for c in cols]
        print(f"  {arm}: wall {parts[0]} s, its own {parts[1]} CPU-s, machine {parts[2]} CPU-s")


if __name__ == "__main__":
    main()
