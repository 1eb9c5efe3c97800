"""Study engine costs, measured with the real `fer-tune sweep` command (a subprocess, its own local Ray).

python benchmarks/bench_study.py overhead [--trials 8] [--epochs 6] [--n 6000]
    8 trials of about 30 s each on 2 CPUs (1 CPU per trial, no early stopping): study wall time against
    the sum of the trials' training time / concurrency, and the delay from launching `fer-tune sweep` to
    the first trial's training start; next to the floor any Ray Tune study of PyTorch trials pays here: a
    bare script that starts Ray, runs 2 trials that only import torch and make an optimizer, and shuts down.
python benchmarks/bench_study.py smoke [--repeat 2]
    the shipped smoke space as a user runs it (`fer-tune sweep search_spaces/smoke.yaml`), launch to exit.
python benchmarks/bench_study.py prestart [--repeat 4]
    a 2-trial, 2-epoch `fer-tune sweep` launch to exit, as fer-tune starts its local Ray (no idle workers prestarted)
    and with Ray's default (RAY_prestart_worker_first_driver=1), alternately: wall time, the first trial's start
    after launch, and the machine's CPU-seconds during the run (from /proc/stat: run it on an idle machine).
python benchmarks/bench_study.py memory [--data ../shared/datasets/fer2013]
    one trial alone, then two concurrent trials, on the full dataset: each trial process's resident memory
    (RSS counts the shared object-store pages; USS is private memory only) next to the dataset's size.
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
from cpu_by_process import busy_cpu_seconds  # benchmarks/, on sys.path as the script's directory

ROOT = Path(__file__).resolve().parents[1]
FIXED = {"width": 0.125, "train_crops": "one", "test_crops": "center", "batch_size": 32, "threads": 1}


def run_sweep(space: dict, workdir: Path, **extra_env: str) -> tuple[float, float, Path]:
    path = workdir / f"{space['name']}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp"), "RAY_AUTH_MODE": "disabled"}
    env.update(extra_env)
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "fer_tune.cli", "sweep", str(path), "--results", str(workdir), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.time() - t0
    if r.returncode:
        sys.exit(f"sweep failed:\n{r.stdout}\n{r.stderr}")
    return t0, wall, workdir / space["name"]


def results(sdir: Path) -> dict[str, list[dict]]:
    out = {}
    for f in sdir.glob("tune/*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out[rows[0]["trial_id"]] = rows
    return out


FLOOR = """
import os, sys, tempfile
os.environ.update(TUNE_MAX_PENDING_TRIALS_PG="2", TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1", RAY_AIR_NEW_OUTPUT="0")
import ray
from ray import tune
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")

def trainable(config):
    import torch  # what every PyTorch trial pays before its first step (the optimizer imports torch._dynamo)
    torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    tune.report({"done": 1})

tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), tune_config=tune.TuneConfig(num_samples=2),
           run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(), name="floor", verbose=0)).fit()
ray.shutdown()
"""


def floor() -> float:
    """Launch-to-exit seconds of the bare Ray Tune script above (the fixed cost no study on this machine avoids)."""
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp"), "RAY_AUTH_MODE": "disabled"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", FLOOR], env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"floor script failed:\n{r.stdout}\n{r.stderr}")
    return time.time() - t0


def overhead(args) -> None:
    space = {
        "name": "overhead",
        "sampler": "random",
        "seed": 0,
        "num_samples": args.trials,
        "max_epochs": args.epochs,
        "early_stopping": {"type": "none"},
        "resources": {"cpu": 1, "gpu": 0},
        "data": {"path": f"synthetic:{args.n}"},
        "fixed": FIXED,
        "space": {"lr": {"type": "float", "low": 0.005, "high": 0.05, "log": True}},
    }
    with tempfile.TemporaryDirectory() as d:
        t0, wall, sdir = run_sweep(space, Path(d))
        res = results(sdir)
    train = {tid: sum(r["epoch_seconds"] for r in rows) for tid, rows in res.items()}
    total = sum(train.values())
    concurrency = min(os.cpu_count() or 1, args.trials)
    ideal = total / concurrency
    first = min(rows[0]["trial_start"] for rows in res.values()) - t0
    print(
        f"{len(res)} trials x {args.epochs} epochs (synthetic:{args.n}, width 0.125, 1 CPU each, "
        f"{concurrency} at a time)"
    )
    print(
        f"per-trial training time: mean {total / len(train):.1f} s (min {min(train.values()):.1f}, "
        f"max {max(train.values()):.1f})"
    )
    print(f"study wall time (fer-tune sweep, launch to exit): {wall:.1f} s")
    print(f"sum of trial training time / {concurrency}:          {ideal:.1f} s")
    print(
        f"overhead: {100 * (wall / ideal - 1):.1f} %  ({wall - ideal:.1f} s: Ray start, data load, trial "
        "start-up, bookkeeping, shutdown)"
    )
    print(f"first trial training started {first:.1f} s after `fer-tune sweep` was launched")
    starts = sorted(rows[0]["trial_start"] for rows in res.values())
    print(
        f"the first {concurrency} trials started within {starts[concurrency - 1] - starts[0]:.1f} s of each other "
        "(Tune's default keeps one trial pending at a time with a searcher: about 5 s apart here)"
    )
    base = floor()
    print(
        f"floor, a bare Ray Tune script (start Ray, 2 trials that import torch and make an optimizer, shut "
        f"down): {base:.1f} s = {100 * base / ideal:.1f} % of {ideal:.1f} s"
    )
    print(f"overhead beyond that floor: {wall - ideal - base:.1f} s = {100 * (wall - ideal - base) / ideal:.1f} %")


def memory(args) -> None:
    from fer_tune.data import load

    data = load(str(args.data), "paper")
    mb = sum(a.nbytes + b.nbytes for a, b in (data.arrays("train"), data.arrays("val"))) / 2**20
    print(
        f"dataset {args.data}: train+val arrays {mb:.1f} MB (uint8 images + int64 labels), shared through "
        "Ray's object store"
    )
    for n in (1, 2):
        space = {
            "name": f"mem{n}",
            "sampler": "random",
            "seed": 0,
            "num_samples": n,
            "max_epochs": 1,
            "early_stopping": {"type": "none"},
            "resources": {"cpu": 1, "gpu": 0},
            "data": {"path": str(args.data)},
            "fixed": {**FIXED, "width": 0.0625},
            "space": {"lr": {"type": "float", "low": 0.005, "high": 0.05, "log": True}},
        }
        with tempfile.TemporaryDirectory() as d:
            _, wall, sdir = run_sweep(space, Path(d))
            res = results(sdir)
        starts = sorted(rows[0]["trial_start"] for rows in res.values())
        ends = sorted(rows[0]["trial_start"] + rows[-1]["time_total_s"] for rows in res.values())
        overlap = n == 1 or starts[-1] < ends[0]
        for tid, rows in res.items():
            last = rows[-1]
            print(
                f"  {n} trial(s){' concurrently' if n > 1 else ''}: trial {tid}: RSS {last['rss_mb']:.0f} MB, "
                f"PSS {last['pss_mb']:.0f} MB, USS (private) {last['uss_mb']:.0f} MB; of which Ray's object store "
                f"(the dataset): RSS {last['store_rss_mb']:.1f} MB, PSS {last['store_pss_mb']:.1f} MB"
            )
        if n > 1:
            print(f"  the two trials ran at the same time: {overlap}")


def prestart(args) -> None:
    """fer-tune's local Ray (no prestarted idle workers) against Ray's default, alternately, on a 2-trial sweep."""
    space = {
        "name": "launch",
        "sampler": "tpe",
        "seed": 0,
        "num_samples": 2,
        "max_epochs": 2,
        "early_stopping": {"type": "none"},
        "resources": {"cpu": 1, "gpu": 0},
        "data": {"path": "synthetic:1000"},
        "fixed": {**FIXED, "width": 0.0625},
        "space": {"lr": {"type": "float", "low": 0.005, "high": 0.05, "log": True}},
    }
    arms = {
        "fer-tune (no idle workers)": {},
        "Ray's default (2 idle workers)": {"RAY_prestart_worker_first_driver": "1"},
    }
    got: dict[str, list[tuple[float, float, float]]] = {arm: [] for arm in arms}
    for i in range(args.repeat):
        for arm, extra in arms.items():
            with tempfile.TemporaryDirectory() as d:
                cpu0 = busy_cpu_seconds()
                t0, wall, sdir = run_sweep(space, Path(d), **extra)
                cpu = busy_cpu_seconds() - cpu0
                first = min(rows[0]["trial_start"] for rows in results(sdir).values()) - t0
            got[arm].append((wall, first, cpu))
            print(f"run {i + 1} {arm}: {wall:.1f} s launch to exit, first trial after {first:.1f} s, {cpu:.1f} CPU-s")
    print(f"means over {args.repeat} run(s) each, alternating:")
    for arm, runs in got.items():
        wall, first, cpu = (sum(r[k] for r in runs) / len(runs) for k in range(3))
        spread = max(r[2] for r in runs) - min(r[2] for r in runs)
        print(f"  {arm}: {wall:.1f} s wall, first trial after {first:.1f} s, {cpu:.1f} CPU-s (spread {spread:.1f})")


def smoke(args) -> None:
    """The shipped smoke space as a user runs it: `fer-tune sweep search_spaces/smoke.yaml`, launch to exit."""
    space = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    walls = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as d:
            _, wall, sdir = run_sweep(space, Path(d))
            n = len(results(sdir))
        walls.append(wall)
        print(f"fer-tune sweep search_spaces/smoke.yaml ({n} trials): {wall:.1f} s launch to exit", flush=True)
    print(f"smoke: min {min(walls):.1f} s, max {max(walls):.1f} s over {len(walls)} run(s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("overhead")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=7, help="7 epochs: about 30 s per trial on 2 CPUs")
    p.add_argument("--n", type=int, default=6000, help="synthetic images")
    p = sub.add_parser("smoke")
    p.add_argument("--repeat", type=int, default=2)
    p = sub.add_parser("prestart")
    p.add_argument("--repeat", type=int, default=4)
    p = sub.add_parser("memory")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "fer2013")
    args = ap.parse_args()
    {"overhead": overhead, "smoke": smoke, "prestart": prestart, "memory": memory}[args.mode](args)


if __name__ == "__main__":
    main()
