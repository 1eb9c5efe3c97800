"""Crash durability: a study is SIGKILLed (its whole process group) at random moments, then resumed, many times.

    python benchmarks/stress_kill.py --storage s3 --runs 20          # Ray storage on a local S3 server (moto)
    python benchmarks/stress_kill.py --storage local --runs 20       # Ray storage = the study directory
    python benchmarks/stress_kill.py --storage s3 --runs 10 --kills 2  # a second kill lands during the resume
    python benchmarks/stress_kill.py --storage local --at start --max-delay 4  # kills in the run's first seconds
    git worktree add /tmp/base COMMIT && python benchmarks/stress_kill.py --storage s3 --runs 20 --code /tmp/base

Each run is a fresh study of 4 trials x 5 epochs (ASHA, so some trials are stopped early) on synthetic faces:
`fer-tune sweep` is killed with SIGKILL at a moment drawn uniformly from 0-10 s after its first epoch result (a
run whose sweep finishes first is shown but does not count towards --runs), `--kills 2` (3) kills the first (two)
resumes the same way, and a last `fer-tune resume` must finish the study. `--at start` counts the delay from the
moment the Tune run exists (its tuner.pkl; for a resume, the command's start) instead: kills land before Tune's
first saved state or its first trials. Then it checks what an operator would:

- lost: Optuna trials missing (fewer than num_samples) or not finished (RUNNING / WAITING left over);
- duplicates: two trials with the same parameters;
- incomplete: a trial whose trials.csv row or per-epoch results miss epochs (a completed trial must have all
  epochs 1..max_epochs, a stopped one 1..its last epoch);
- errors: "Error handling checkpoint" tracebacks, trials that errored, segfaults (Python's faulthandler is on,
  so a segfault leaves a trace in the run's log).

Prints one line per run and the totals; writes them to OUT/summary.json, every command's output to OUT/run-N/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPACE = {
    "name": "k",
    "sampler": "tpe",
    "seed": 0,
    "num_samples": 4,
    "max_epochs": 5,
    "early_stopping": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
    "resources": {"cpu": 1, "gpu": 0},
    "data": {"path": "synthetic:1500", "protocol": "paper"},
    "fixed": {"width": 0.0625, "train_crops": "one", "test_crops": "center", "batch_size": 32, "threads": 1},
    "space": {
        "optimizer": {"type": "categorical", "choices": ["sgd_nesterov", "adam"]},
        "lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    },
}


def s3_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="stress")
    return server, env


def first_result(exp: str) -> bool:
    from fer_tune.tune.runtime import storage as st

    return any(st.read_text(st.join(exp, d, "result.json")) for d in st.listdir(exp) if "trial_" in d)


def run_started(exp: str) -> bool:
    from fer_tune.tune.runtime import storage as st

    return st.exists(st.join(exp, "tuner.pkl"))


def run_killed(cmd: list[str], env: dict, log: Path, exp: str, delay: float, at: str) -> tuple[str, float]:
    """Run cmd; SIGKILL its process group `delay` s after the first epoch result exists (`at` "first-result") or
    the Tune run does ("start"). Returns what happened ("killed" or "finished rc=N") and the seconds from that
    moment to the kill."""
    ready = first_result if at == "first-result" else run_started
    with log.open("w") as fh:
        proc = subprocess.Popen(
            cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=env["PYTHONPATH"]
        )
        t_first = None
        while proc.poll() is None:
            if t_first is None and ready(exp):
                t_first = time.time()
            if t_first is not None and time.time() - t_first >= delay:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                time.sleep(1.5)  # Ray's daemons end with the driver
                return "killed", time.time() - t_first - 1.5
            time.sleep(0.1 if at == "first-result" else 0.02)
    return f"finished rc={proc.returncode}", 0.0


def check(sdir: Path, spec: dict, logs: list[Path]) -> dict:
    import optuna

    from fer_tune.tune.study.outputs import study_results
    from fer_tune.tune.study.record import read_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    record = read_study(sdir)
    storage = f"sqlite:///{sdir / 'optuna.db'}"
    trials = optuna.load_study(study_name=record["optuna_study"], storage=storage).trials
    results, restarts = study_results(sdir, record)
    with (sdir / "trials.csv").open() as fh:
        rows = {int(r["number"]): r for r in csv.DictReader(fh)}
    problems = []
    lost = max(0, spec["num_samples"] - len(trials)) + sum(not t.state.is_finished() for t in trials)
    if lost:
        problems.append(f"lost: {len(trials)} trials, states {[t.state.name for t in trials]}")
    params = [tuple(sorted(t.params.items())) for t in trials]
    duplicates = len(params) - len(set(params))
    if duplicates:
        problems.append(f"duplicates: {duplicates}")
    incomplete = 0
    for t in trials:
        epochs = [int(r["epoch"]) for r in results.get(t.user_attrs.get("ray_trial_id", ""), [])]
        row = rows.get(t.number)
        want = spec["max_epochs"] if t.state.name == "COMPLETE" else (max(epochs) if epochs else 0)
        if epochs != list(range(1, want + 1)) or row is None or int(row["epochs"]) != want or not want:
            incomplete += 1
            problems.append(
                f"incomplete: trial {t.number} {t.state.name} epochs {epochs} (trials.csv: {row and row['epochs']})"
            )
    failed = sum(t.state.name == "FAIL" for t in trials)
    if failed:
        problems.append(f"failed trials: {failed}")
    text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
    ckpt_errors = text.count("Error handling checkpoint")
    segfaults = text.count("Segmentation fault") + text.count("SIGSEGV")
    if ckpt_errors:
        problems.append(f"'Error handling checkpoint' x{ckpt_errors}")
    if segfaults:
        problems.append(f"segfault x{segfaults}")
    return {
        "trials": len(trials),
        "lost": lost,
        "duplicates": duplicates,
        "incomplete": incomplete,
        "failed": failed,
        "checkpoint_errors": ckpt_errors,
        "segfaults": segfaults,
        "restarts": sum(restarts.values()),
        "problems": problems,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", choices=("s3", "local"), default="s3")
    ap.add_argument(
        "--runs",
        type=int,
        default=20,
        help="runs whose sweep is killed before it finishes (one that finishes first does not count; "
        "at most 2x this many runs in all)",
    )
    ap.add_argument("--kills", type=int, choices=(1, 2, 3), default=1, help="2 (3): also kill the first (two) resumes")
    ap.add_argument("--max-delay", type=float, default=10.0, help="kill at U(0, this) s after the moment of --at")
    ap.add_argument(
        "--at",
        choices=("first-result", "start"),
        default="first-result",
        help="count the delay from the first epoch result (default) or from the Tune run's start",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--code",
        default=str(ROOT),
        metavar="DIR",
        help="the fer-tune checkout whose commands run (default this one; e.g. a git worktree of an "
        "older commit, for the baseline); the checks are this checkout's",
    )
    ap.add_argument("--out", default=str(Path.home() / ".cache" / "fer-tune-bench" / "stress_kill"))
    a = ap.parse_args()
    code = Path(a.code).resolve()
    label = "" if code == ROOT else f"-{code.name}"
    at = "" if a.at == "first-result" else f"-{a.at}"
    out = Path(a.out) / f"{a.storage}-k{a.kills}-s{a.seed}{at}{label}"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    server, s3env = s3_server() if a.storage == "s3" else (None, {})
    space = out / "k.yaml"
    space.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    runs = []
    t_all = time.time()
    try:
        for i in range(2 * a.runs):
            if sum(any("killed" in x for x in r["steps"]) for r in runs) >= a.runs:
                break
            d = out / f"run-{i}"
            subprocess.run(["rm", "-rf", str(d)], check=True)
            d.mkdir()
            ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
            env = {
                **os.environ,
                **s3env,
                "RAY_TMPDIR": ray_tmp,
                "RAY_AUTH_MODE": "disabled",
                "PYTHONPATH": str(code),
                "FER_TUNE_CACHE": str(out / "cache"),
                "PYTHONFAULTHANDLER": "1",
                "PYTHONUNBUFFERED": "1",
            }
            prefix = f"s3://stress/{out.name}/run-{i}"
            storage = ["--storage", prefix] if a.storage == "s3" else []
            sdir = d / "results" / "k"
            exp = f"{prefix}/k/tune" if a.storage == "s3" else str(sdir / "tune")
            base = [sys.executable, "-m", "fer_tune.cli"]
            t0 = time.time()
            steps, logs = [], []
            what, at = run_killed(
                [*base, "sweep", str(space), "--results", str(d / "results"), *storage, "--quiet", "--num-cpus", "2"],
                env,
                d / "sweep.log",
                exp,
                rng.uniform(0, a.max_delay),
                a.at,
            )
            steps.append(f"sweep {what}" + (f" at +{at:.1f}s" if what == "killed" else ""))
            logs.append(d / "sweep.log")
            for k in range(1, a.kills):
                what, at = run_killed(
                    [*base, "resume", str(sdir), "--quiet", "--num-cpus", "2"],
                    env,
                    d / f"resume-{k}.log",
                    exp,
                    rng.uniform(0, a.max_delay),
                    a.at,
                )
                steps.append(f"resume {what}" + (f" at +{at:.1f}s" if what == "killed" else ""))
                logs.append(d / f"resume-{k}.log")
            r = subprocess.run(
                [*base, "resume", str(sdir), "--quiet", "--num-cpus", "2"],
                env=env,
                cwd=code,
                capture_output=True,
                text=True,
                timeout=900,
            )
            (d / "resume-last.log").write_text(r.stdout + r.stderr)
            logs.append(d / "resume-last.log")
            steps.append(f"last resume rc={r.returncode}")
            res = (
                check(sdir, SPACE, logs)
                if (sdir / "trials.csv").exists()
                else {"problems": ["no trials.csv"], "lost": SPACE["num_samples"]}
            )
            if r.returncode != 0:
                res["problems"].insert(0, f"last resume exit {r.returncode}")
            res.update(run=i, steps=steps, seconds=round(time.time() - t0, 1))
            runs.append(res)
            print(
                f"run {i:>2}: {'; '.join(steps)}; {res.get('trials', 0)} trials, {res.get('restarts', 0)} restarts; "
                + ("OK" if not res["problems"] else "PROBLEMS: " + " | ".join(res["problems"])),
                flush=True,
            )
            subprocess.run(["rm", "-rf", ray_tmp])
    finally:
        if server is not None:
            server.stop()
    totals = {
        k: sum(r.get(k, 0) for r in runs)
        for k in ("lost", "duplicates", "incomplete", "failed", "checkpoint_errors", "segfaults")
    }
    killed = sum(any("killed" in s for s in r["steps"]) for r in runs)
    summary = {
        "storage": a.storage,
        "kills": a.kills,
        "at": a.at,
        "seed": a.seed,
        "code": str(code),
        "runs": len(runs),
        "killed_runs": killed,
        "runs_with_problems": sum(bool(r["problems"]) for r in runs),
        **totals,
        "wall_seconds": round(time.time() - t_all, 1),
        "per_run": runs,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"\n{code}: {a.storage} storage, {a.kills} kill(s) per run: {len(runs)} runs ({killed} killed before they "
        f"finished), {summary['runs_with_problems']} with problems; lost {totals['lost']}, duplicates "
        f"{totals['duplicates']}, incomplete {totals['incomplete']}, failed {totals['failed']}, 'Error handling "
        f"checkpoint' {totals['checkpoint_errors']}, segfaults {totals['segfaults']}; {summary['wall_seconds']:.0f} s"
        f"\nsummary: {out / 'summary.json'}"
    )
    return 0 if not summary["runs_with_problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
