"""A study's bookkeeping as it grows: many tiny trials, the driver's CPU, the trial rate, the disk per trial.

    python benchmarks/bench_scale.py --arm before --trials 1000 --out /tmp/scale   # the earlier settings
    python benchmarks/bench_scale.py --arm after --trials 1000 --out /tmp/scale    # fer-tune's defaults
    python benchmarks/bench_scale.py --combine --out /tmp/scale                    # one table of every arm run

Each arm runs `fer-tune sweep` (a subprocess, its own local Ray on this machine's cores) on a study of tiny trials:
width 0.0625 on synthetic:400, 2 epochs, ASHA (grace 1), TPE over lr, dropout and the optimizer, 1 CPU per trial.
The arms differ only in what this benchmark measures:

- before: Tune's state snapshotted every 3 s whatever its size (TUNE_GLOBAL_CHECKPOINT_S=3) and every trial's
  checkpoints kept (`keep_checkpoints: all`): how fer-tune ran studies until now;
- after: fer-tune's defaults (a snapshot period of max(3 s, 19 x the time a snapshot takes); the checkpoints of
  finished trials that cannot matter again emptied, the best of the 4 best completed trials kept).

While the sweep runs, the driver process's CPU time (its own, not Ray's daemons' or the trials') and the size of
Tune's newest experiment state are sampled every 2 s; at the end: wall time, trials/s overall and per tenth of the
study (from Optuna's completion times), the driver's CPU share overall and per tenth of the wall time with the
state's size then, the study directory's bytes and bytes per finished trial.
Each arm writes OUT/ARM-N.json; --combine prints them side by side.

With --storage s3, the study's Ray storage is an S3 bucket served by a local moto server (pip install
'moto[server]'), and the JSON gets the number of PUT requests the study made to it (the driver's copies of Tune's
state and the trials' checkpoints) and that per trial.

With --profile SECONDS (py-spy installed), the driver is sampled with `py-spy record` for SECONDS twice, once the
study has started 10 % and once it has started 85 % of its trials; the JSON gets, per window, the share of the
driver's busy samples spent in each of the functions that use the most (inclusive, and own time), so that what
grows with the study's size stands out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def space(trials: int, arm: str) -> dict:
    return {
        "name": "scale",
        "sampler": "tpe",
        "seed": 0,
        "num_samples": trials,
        "max_epochs": 2,
        "early_stopping": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "keep_checkpoints": "all" if arm == "before" else 4,
        "resources": {"cpu": 1, "gpu": 0},
        "data": {"path": "synthetic:400", "protocol": "paper"},
        "fixed": {"width": 0.0625, "train_crops": "one", "test_crops": "center", "batch_size": 32, "threads": 1},
        "space": {
            "optimizer": {"type": "categorical", "choices": ["sgd_nesterov", "adam"]},
            "lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True},
            "dropout": {"type": "float", "low": 0.0, "high": 0.5},
        },
    }


def cpu_seconds(pid: int, stat: str = "") -> float | None:
    """The process's own CPU time (user + system), from /proc/PID/stat (or the `stat` file given)."""
    try:
        fields = Path(stat or f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main_thread_cpu(pid: int) -> float | None:
    """The CPU seconds of the process's main thread (Tune's loop: the searcher, the scheduler, the snapshots); the
    rest of the process's time is its other threads', those that ended included (Tune's copies to the storage run
    in a thread of their own each)."""
    return cpu_seconds(pid, f"/proc/{pid}/task/{pid}/stat")


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"scale-{args.arm}-", dir=args.workdir))
    (work / "scale.yaml").write_text(yaml.safe_dump(space(args.trials, args.arm), sort_keys=False))
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("TUNE_GLOBAL_CHECKPOINT_S", None)
    if args.arm == "before":
        env["TUNE_GLOBAL_CHECKPOINT_S"] = "3"
    cmd = [sys.executable, "-m", "fer_tune.cli", "sweep", str(work / "scale.yaml"), "--results", str(work)]
    cmd += ["--quiet", "--num-cpus", str(args.num_cpus)]
    moto = None
    if args.storage == "s3":
        moto, s3_env = s3_server(work)
        env.update(s3_env)
        cmd += ["--storage", "s3://bench/studies"]
    t0 = time.time()
    log = open(work / "sweep.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    samples = []  # (seconds since launch, driver CPU seconds, bytes of Tune's newest experiment state, main thread's CPU)
    windows = [0.10, 0.85] if args.profile else []  # fractions of the trials started at which a window opens
    spies, profiles = [], {}
    while proc.poll() is None:
        cpu = cpu_seconds(proc.pid)
        if cpu is not None:
            samples.append(
                (time.time() - t0, cpu, state_bytes(work / "scale" / "tune"), main_thread_cpu(proc.pid) or 0.0)
            )
        if windows and trials_started(work / "scale" / "tune") >= windows[0] * args.trials:
            at = windows.pop(0)
            raw = out / f"profile-{args.arm}-{args.trials}-{at:.2f}.txt"
            spy = ["py-spy", "record", "--pid", str(proc.pid), "--duration", str(args.profile), "--format", "raw"]
            spy += ["--gil"]  # samples of the thread holding the GIL: Python at work, not a wait on the disk
            spies.append((at, raw, subprocess.Popen([*spy, "--rate", "50", "--nonblocking", "--output", str(raw)])))
        time.sleep(2)
    for at, raw, spy in spies:
        spy.wait()
        profiles[f"{at:.0%} of the trials started"] = hot_functions(raw) if raw.exists() else "py-spy wrote nothing"
    wall = time.time() - t0
    log.close()
    puts = None
    if moto is not None:
        moto.terminate()
        moto.wait()
        puts = sum(line.split('"')[1].startswith("PUT ") for line in (work / "moto.log").open() if line.count('"') >= 2)
    if proc.returncode:
        sys.exit(f"sweep failed ({proc.returncode}); see {work / 'sweep.log'}")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sdir = work / "scale"
    trials = optuna.load_study(study_name="scale", storage=f"sqlite:///{sdir / 'optuna.db'}").trials
    done = sorted(t.datetime_complete.timestamp() for t in trials if t.datetime_complete)
    tenths = []
    n = len(done)
    for i in range(10):  # trials/s over each tenth of the study, by completion order
        a, b = done[i * n // 10], done[min(n - 1, (i + 1) * n // 10 - 1)]
        k = (i + 1) * n // 10 - i * n // 10
        tenths.append(round(k / max(b - a, 1e-9), 2))
    states = sorted((sdir / "tune").glob("experiment_state-*.json"))
    cpu = samples[-1][1] if samples else 0.0
    tenths_of_wall = _by_tenth(samples) if len(samples) >= 20 else []
    result = {
        "arm": args.arm,
        "trials": n,
        "states": {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")},
        "wall_s": round(wall, 1),
        "trials_per_s": round(n / (done[-1] - done[0]), 2) if n > 1 else None,
        "trials_per_s_by_tenth": tenths,
        "driver_cpu_s": round(cpu, 1),
        "driver_cpu_share": round(cpu / wall, 3),
        "driver_cpu_last_tenth": tenths_of_wall[-1]["driver_cpu_share"] if tenths_of_wall else None,
        "by_tenth_of_wall_time": tenths_of_wall,
        "experiment_state_bytes": states[-1].stat().st_size if states else 0,
        "study_bytes": du(sdir),
        "bytes_per_trial": du(sdir) // max(n, 1),
        "checkpoint_bytes": sum(du(p) for p in (sdir / "tune").glob("*/checkpoint_*")),
        "driver_profile": profiles or None,
        "storage": args.storage,
        "storage_puts": puts,
        "storage_puts_per_trial": round(puts / max(n, 1), 1) if puts is not None else None,
        "host_cpus": os.cpu_count(),
        "code": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    k = 1
    while (out / f"{args.arm}-{args.trials}-{k}.json").exists():
        k += 1
    (out / f"{args.arm}-{args.trials}-{k}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def state_bytes(tune_dir: Path) -> int:
    """The size of Tune's newest experiment state file (0 before the first)."""
    try:
        return max((p.stat().st_size for p in tune_dir.glob("experiment_state-*.json")), default=0)
    except OSError:
        return 0


def s3_server(work: Path) -> tuple[subprocess.Popen, dict]:
    """A moto S3 server on 127.0.0.1 logging every request to WORK/moto.log, with the bucket "bench"; the
    environment that points boto3 and pyarrow at it."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(work / "moto.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(urllib.request.Request(f"{url}/bench", method="PUT"), timeout=2)
            break
        except OSError:
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return server, env


def trials_started(tune_dir: Path) -> int:
    """How many trials Tune has started: its trial directories."""
    try:
        return sum(1 for e in os.scandir(tune_dir) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return 0


def hot_functions(raw: Path, top: int = 15) -> dict:
    """From py-spy's raw output (one line per stack: frames joined by ';', then its sample count): the number of
    busy samples, and the functions with the largest share of them, inclusive (on the stack; without the frames
    that nearly every sample passes through, the program's entry and Tune's loop) and own (on top)."""
    total, inclusive, own = 0, {}, {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in stack.split(";")]  # without line numbers
        total += n
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n

    def shares(counts: dict, below: float = 1.0) -> list:
        ranked = [(f, c / total) for f, c in sorted(counts.items(), key=lambda kv: -kv[1]) if c / total < below]
        return [[f, round(share, 3)] for f, share in ranked[:top]]

    if not total:
        return {"busy_samples": 0}
    return {"busy_samples": total, "inclusive": shares(inclusive, 0.6), "own": shares(own)}


def _by_tenth(samples: list[tuple[float, float, int, float]]) -> list[dict]:
    """Per tenth of the run's wall time: the driver's CPU share over it (all, and its main thread's) and Tune's
    state size at its end."""
    out = []
    n = len(samples)
    for i in range(10):
        a, b = samples[i * n // 10], samples[min(n - 1, (i + 1) * n // 10)]
        out.append(
            {
                "until_s": round(b[0], 1),
                "driver_cpu_share": round((b[1] - a[1]) / max(b[0] - a[0], 1e-9), 3),
                "main_thread_share": round((b[3] - a[3]) / max(b[0] - a[0], 1e-9), 3),
                "state_mb": round(b[2] / 2**20, 1),
            }
        )
    return out


def combine(args) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.out).glob("*.json"))]
    keys = [
        ("arm", "arm"),
        ("trials", "trials"),
        ("wall_s", "wall s"),
        ("trials_per_s", "trials/s"),
        ("driver_cpu_share", "driver CPU share"),
        ("driver_cpu_last_tenth", "driver CPU, last tenth"),
        ("experiment_state_bytes", "Tune state bytes"),
        ("bytes_per_trial", "bytes / trial"),
        ("checkpoint_bytes", "checkpoint bytes"),
        ("storage_puts_per_trial", "S3 PUTs / trial"),
    ]
    print("| " + " | ".join(h for _, h in keys) + " | trials/s by tenth |")
    print("|" + "---|" * (len(keys) + 1))
    for r in rows:
        print("| " + " | ".join(str(r.get(k)) for k, _ in keys) + f" | {r['trials_per_s_by_tenth']} |")
    for r in rows:
        for window, prof in (r.get("driver_profile") or {}).items():
            print(f"{r['arm']} {r['trials']}, driver profile at {window} ({prof.get('busy_samples')} busy samples):")
            for name, share in prof.get("inclusive", []):
                print(f"  {share:6.1%}  {name}")
            print("  on top (own time):")
            for name, share in prof.get("own", [])[:8]:
                print(f"  {share:6.1%}  {name}")
    for r in rows:
        if r.get("by_tenth_of_wall_time"):
            print(
                f"{r['arm']} {r['trials']}: driver CPU share by tenth of the wall time (Tune state MB at its end): "
                + ", ".join(f"{x['driver_cpu_share']:.2f} ({x['state_mb']:g})" for x in r["by_tenth_of_wall_time"])
            )
            tenths = r["by_tenth_of_wall_time"]
            if all("main_thread_share" in x for x in tenths):
                print("  its main thread: " + ", ".join(f"{x['main_thread_share']:.2f}" for x in tenths))
                others = [x["driver_cpu_share"] - x["main_thread_share"] for x in tenths]
                print("  its other threads: " + ", ".join(f"{x:.2f}" for x in others))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=("before", "after"))
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--out", default="/tmp/bench_scale")
    p.add_argument("--workdir", default=None, help="where the study is written (default: the system's temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the study directory")
    p.add_argument("--combine", action="store_true")
    p.add_argument("--storage", choices=("local", "s3"), default="local", help="the study's Ray storage")
    p.add_argument("--profile", type=int, default=0, metavar="SECONDS", help="sample the driver with py-spy")
    args = p.parse_args()
    if args.combine:
        combine(args)
    elif args.arm:
        run(args)
    else:
        p.error("give --arm before|after, or --combine")


if __name__ == "__main__":
    main()
