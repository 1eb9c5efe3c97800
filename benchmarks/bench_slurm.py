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

    python benchmarks/bench_slurm.py [--trials 8] [--epochs 3]
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
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
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "host": f"{os.cpu_count()} CPUs, 2 SLURM nodes on one host (cred_expire 5 s, sched_interval 2 s)",
        "study": f"{args.trials} trials x {args.epochs} epochs, width 0.0625, synthetic:1000, 1 CPU per trial",
        "submit": {k: round(v, 1) for k, v in phases.items()},
        "usr1 (time limit) -> seconds after the signal": usr1,
        "scontrol requeue (preemption) -> seconds after it": hard,
        "whole job, submit to done (s)": round(t_done - t_submit, 1),
        "sessions": sessions,
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
