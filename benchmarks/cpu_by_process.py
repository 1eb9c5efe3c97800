"""CPU-seconds by kind of process while a command runs: where a study's (or the test suite's) CPU goes.

python benchmarks/cpu_by_process.py -- COMMAND [ARGS...]
    runs COMMAND and samples every process on the machine every 0.2 s (/proc/PID/stat: user + system time), then
    prints the CPU-seconds each kind of process used meanwhile (Ray's trial workers, its idle workers, its daemons,
    fer-tune's drivers, the rest by command line), with how many processes of each kind there were. A process's
    last 0.2 s before it ends are not counted; run it on an otherwise idle machine.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

KINDS = (  # (kind, a substring of its command line), the first match wins
    ("Ray: idle worker", "ray::IDLE"),
    ("Ray: Tune trial worker", "ray::ImplicitFunc"),
    ("Ray: dashboard agent", "ray::DashboardAgent"),
    ("Ray: runtime-env agent", "ray::RuntimeEnvAgent"),
    ("Ray: GCS", "gcs_server"),
    ("Ray: raylet", "raylet"),
    ("Ray: log monitor", "log_monitor"),
    ("Ray: monitor", "monitor.py"),
    ("Ray: dashboard", "dashboard.py"),
    ("fer-tune command", "fer_tune.cli"),
)


def kind(cmdline: str) -> str:
    for name, part in KINDS:
        if part in cmdline:
            return name
    actor = re.match(r"ray::[\w.]+", cmdline)
    return actor.group(0) if actor else cmdline[:70]


def snapshot() -> dict[int, tuple[str, int]]:
    """{pid: (command line, CPU ticks so far)} of every process readable now ("" for a process without one)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(pid)] = (cmd, int(fields[11]) + int(fields[12]))  # no command line: a kernel thread or an exiting one
    return out


def busy_cpu_seconds() -> float:
    """CPU-seconds this machine has spent outside idle and iowait since boot (all processes, all cores; /proc/stat's
    first eight fields: guest time is counted in user time already)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        sys.exit(__doc__)
    before = snapshot()
    seen: dict[int, tuple[str, int]] = {}
    t0 = time.monotonic()
    proc = subprocess.Popen(args)
    while proc.poll() is None:
        for pid, (cmd, ticks) in snapshot().items():
            if pid != os.getpid():  # the latest command line (a Ray worker renames itself for its actor), if any
                seen[pid] = (cmd or seen.get(pid, ("(no command line)", 0))[0], ticks)
        time.sleep(0.2)
    wall = time.monotonic() - t0
    hz = os.sysconf("SC_CLK_TCK")
    used: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for pid, (cmd, ticks) in seen.items():
        spent = (ticks - before.get(pid, ("", 0))[1]) / hz
        if spent > 0:
            name = kind(cmd)
            used[name] += spent
            count[name] += 1
    print(f"{' '.join(args)}: exit {proc.returncode}, {wall:.0f} s, {sum(used.values()):.1f} CPU-seconds")
    for name, spent in used.most_common(25):
        print(f"  {spent:8.1f} CPU-s  {count[name]:4d} process(es)  {name}")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
