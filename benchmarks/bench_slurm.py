"""What a SLURM requeue costs a study: seconds from the signal to the job back in training, by phase.

Starts a private 2-node SLURM cluster on this host (tests/slurmcluster.py; root, slurm-wlm and munge installed),
submits a small study with `fer-tune slurm --nodes 2 --submit`, then
  1. at a trial's first epoch sends USR1 to the batch script, as SLURM does GRACE seconds before the time limit
     (`scancel --batch --signal=USR1`): the driver saves the study, the script requeues the job;
  2. once the next allocation trains again, `scontrol requeue` (what a preemption does: SIGTERM to every process
     of the job at once, Ray's too);
and prints when each line of the job's log appeared, relative to the signal. SLURM's own part (a requeued job
waits cred_expire + 1 s, then the scheduler's next pass) is set short here (5 s, sched_interval=2 s); a cluster
with the defaults (cred_expire 120 s, sched_interval 60 s) adds up to about 2-3 minutes to every requeue.

With --time-limit it instead submits the study with a real, short time limit (--time, SLURM counts it in minutes)
and no signal from outside: SLURM's USR1 GRACE seconds before each limit ends every allocation but the last, and
the chain of allocations finishes the study; it prints each allocation's timeline and the study's trials.

    python benchmarks/bench_slurm.py [--trials 8] [--epochs 3]
    python benchmarks/bench_slurm.py --time-limit [--time 0-00:02:00] [--grace 40] [--trials 12] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from slurmcluster import SlurmCluster, available  # noqa: E402

SPACE = {
    "name": "t",
    "sampler": "tpe",
    "seed": 0,
    "max_epochs": 3,
    "early_stopping": {"type": "none"},
    "resources": {"cpu": 1, "gpu": 0},
    "data": {"path": "synthetic:1000", "protocol": "paper"},
    "fixed": {"width": 0.0625, "train_crops": "one", "test_crops": "center", "batch_size": 32, "threads": 1},
    "space": {
        "optimizer": {"type": "categorical", "choices": ["sgd_nesterov", "adam"]},
        "lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True},
    },
}


class Log:
    """The job's log, read as it grows; when each line appeared."""

    def __init__(self, path: Path):
        self.path, self.lines, self._pos = path, [], 0

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open() as fh:
            fh.seek(self._pos)
            text = fh.read()
            complete = text[: text.rfind("\n") + 1]
            self._pos += len(complete.encode())
        now = time.time()
        self.lines += [(now, line) for line in complete.splitlines()]

    def wait(self, pattern: str, after: float, timeout: float = 300.0) -> float:
        """When the first line matching `pattern` that appeared after `after` appeared."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.poll()
            for t, line in self.lines:
                if t >= after and re.search(pattern, line):
                    return t
            time.sleep(0.1)
        raise TimeoutError(f"no line matching {pattern!r} within {timeout:.0f} s")


def say_lines(path: Path) -> list[tuple[float, str]]:
    """The batch script's own lines of the job's log (`fer-tune slurm [DATE TIME]: ...`), with their time."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        m = re.match(r"fer-tune slurm \[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\]: (.*)", line)
        if m:
            out.append((time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")), m.group(2)))
    return out


def time_limit_arm(cluster: SlurmCluster, env: dict, work: Path, args: argparse.Namespace) -> dict:
    """A study under a real --time: allocations ended by SLURM's USR1 before the limit, requeued until done."""
    import optuna

    t_submit = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "fer_tune.cli", "slurm", "t.yaml", "--results", "results", "--nodes", "2",
         "--cpus-per-node", "1", "--time", args.time, "--grace", str(args.grace), "--submit"],
        env=env, cwd=work, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = re.search(r"submitted job (\d+)", r.stdout).group(1)
    sdir = work / "results" / "t"
    info = cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), args.timeout)
    t_end = time.time()
    lines = say_lines(sdir / f"slurm-{job}.log")
    allocations: list[dict] = []
    for t, text in lines:
        if re.match(r"job \d+, allocation \d+ ", text):
            allocations.append({"start": t})
        elif not allocations:
            continue
        elif text.startswith("the time limit is"):
            allocations[-1]["USR1 (s after the start)"] = round(t - allocations[-1]["start"])
        elif "requeueing job" in text:
            allocations[-1]["requeued (s after the start)"] = round(t - allocations[-1]["start"])
        elif text.startswith("done:"):
            allocations[-1]["done (s after the start)"] = round(t - allocations[-1]["start"])
        elif text.startswith("fer-tune ") and "driver" not in allocations[-1]:
            allocations[-1]["driver"] = text.split()[1]
    for a, b in zip(allocations, allocations[1:]):
        a["next allocation starts (s after the requeue)"] = round(
            b["start"] - a["start"] - a.get("requeued (s after the start)", 0)
        )
    first = allocations[0]["start"] if allocations else t_submit
    for a in allocations:
        a["start"] = round(a["start"] - first)
    record = json.loads((sdir / "study.json").read_text())
    sessions = [
        {
            k: (round(v) if isinstance(v, float) else v)
            for k, v in s.items()
            if k in ("kind", "outcome", "wall_seconds", "trials_finished")
        }
        for run in record["runs"]
        for s in run["sessions"]
    ]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name="t", storage=f"sqlite:///{sdir / 'optuna.db'}").trials
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {
        "job": f"--time {args.time} --grace {args.grace}: {info.get('JobState')}, restarts {info.get('Restarts')}",
        "allocations (s; start: after the first allocation's)": allocations,
        "sessions": sessions,
        "trials": {
            "states": states,
            "distinct configs": len({tuple(sorted(t.params.items())) for t in trials}),
        },
        "whole job, submit to end (s)": round(t_end - t_submit, 1),
    }


def signals_arm(cluster: SlurmCluster, env: dict, work: Path) -> dict:
    """USR1 by hand (as the time limit sends it), then `scontrol requeue` (a preemption): when each phase ended."""
    t_submit = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "fer_tune.cli", "slurm", "t.yaml", "--results", "results", "--nodes", "2",
         "--cpus-per-node", "1", "--time", "30:00", "--grace", "60", "--submit"],
        env=env, cwd=work, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = re.search(r"submitted job (\d+)", r.stdout).group(1)
    log = Log(work / "results" / "t" / f"slurm-{job}.log")
    t_first = log.wait(r" epoch 1/", t_submit)
    phases = {"submit -> first epoch": t_first - t_submit}

    # 1. the time limit's USR1
    t0 = time.time()
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    marks = {
        "driver stopped, study saved, job requeued": log.wait(r"requeueing job", t0),
        "next allocation starts": log.wait(r"allocation 2 ", t0),
        "Ray up on both nodes, storage checked": log.wait(r"Ray is up", t0),
        "driver started (resume)": log.wait(r"\]: fer-tune resume", t0),
        "training again (first epoch reported)": log.wait(r" epoch \d+/", log.wait(r"\]: fer-tune resume", t0)),
    }
    usr1 = {k: round(v - t0, 1) for k, v in marks.items()}

    # 2. scontrol requeue: SIGTERM to every process at once
    t1 = time.time()
    cluster.run("scontrol", "requeue", job)
    marks = {
        "next allocation starts": log.wait(r"allocation 3 ", t1),
        "Ray up on both nodes, storage checked": log.wait(r"Ray is up", t1),
        "driver started (resume)": log.wait(r"\]: fer-tune resume", t1),
        "training again (first epoch reported)": log.wait(r" epoch \d+/", log.wait(r"\]: fer-tune resume", t1)),
    }
    hard = {k: round(v - t1, 1) for k, v in marks.items()}
    cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED"), 900)
    t_done = log.wait(r"done: the study is finished", t1)
    sessions = [
        {k: s.get(k) for k in ("kind", "outcome", "wall_seconds")}
        for run in json.loads((work / "results" / "t" / "study.json").read_text())["runs"]
        for s in run["sessions"]
    ]
    return {
        "submit": {k: round(v, 1) for k, v in phases.items()},
        "usr1 (time limit) -> seconds after the signal": usr1,
        "scontrol requeue (preemption) -> seconds after it": hard,
        "whole job, submit to done (s)": round(t_done - t_submit, 1),
        "sessions": sessions,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=None, help="trials (default 8; 12 with --time-limit)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--time-limit", action="store_true", help="a real --time ends the allocations instead")
    ap.add_argument("--time", default="0-00:02:00", help="with --time-limit: each allocation's limit")
    ap.add_argument("--grace", type=int, default=40, help="with --time-limit: USR1 this long before it")
    ap.add_argument("--timeout", type=float, default=1200, help="with --time-limit: give up after this long")
    args = ap.parse_args()
    args.trials = args.trials or (12 if args.time_limit else 8)
    why = available()
    if why:
        print(f"bench_slurm: {why}", file=sys.stderr)
        return 2
    import yaml

    base = Path.home() / ".cache"  # not /tmp: `fer-tune slurm` refuses a node-local study directory for 2 nodes
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-slurm-", dir=base))
    try:
        with SlurmCluster(work / "slurm") as cluster:
            (work / "t.yaml").write_text(
                yaml.safe_dump({**SPACE, "num_samples": args.trials, "max_epochs": args.epochs})
            )
            env = {
                **cluster.env,
                "PYTHONPATH": str(ROOT),
                "PYTHONUNBUFFERED": "1",
                "FER_TUNE_CACHE": str(work / "cache"),
                "RAY_START_ARGS": "--object-store-memory=150000000",
            }
            measured = time_limit_arm(cluster, env, work, args) if args.time_limit else signals_arm(cluster, env, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "host": f"{os.cpu_count()} CPUs, 2 SLURM nodes on one host (cred_expire 5 s, sched_interval 2 s)",
        "study": f"{args.trials} trials x {args.epochs} epochs, width 0.0625, synthetic:1000, 1 CPU per trial",
        **measured,
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
