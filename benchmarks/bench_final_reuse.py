"""A final stage's runs in fresh trial processes or one after another in the same process (Tune's reuse_actors).

python benchmarks/bench_final_reuse.py [--repeats 2] [--out DIR]
    sweeps a small synthetic study once (3 trials, 2 epochs, width 1/16), then runs its final stage with 2 seeds and
    the paper baseline (4 runs of 3 + 1 epochs, one CPU: one run at a time) as `fer-tune final` does, and again
    with reuse_actors=False (the arm "fresh"), alternating, each a process of its own; prints the busy CPU-seconds
    of the whole machine (/proc/stat) and the wall time of each, and whether every epoch's losses and accuracies
    are the same in both arms.
python benchmarks/bench_final_reuse.py --arm fresh|reuse STUDY
    one final stage of STUDY (what the combined run calls).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_scale import space
from cpu_by_process import busy_cpu_seconds as busy

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--seeds", "2", "--epochs", "3", "--finetune-epochs", "1", "--baseline", "paper", "--quiet", "--num-cpus", "1"]
# the scale benchmark's tiny trials, 3 of them, on 500 synthetic faces
SPACE = {**space(3, "after"), "name": "t", "data": {"path": "synthetic:500", "protocol": "paper"}}


def one(arm: str, study: str) -> int:
    from ray import tune

    from fer_tune.cli import main

    if arm == "fresh":  # every run in a trial process of its own
        made = tune.TuneConfig

        def fresh(**kw):
            return made(**{**kw, "reuse_actors": False})

        tune.TuneConfig = fresh
    return main(["final", study, *ARGS])


def epochs(study: Path) -> dict:
    out = {}
    for f in glob.glob(f"{study}/final/tune/*/result.json"):
        for line in open(f):
            r = json.loads(line)
            out[(r.get("arm"), r.get("seed"), r.get("epoch"), r.get("phase"))] = [
                r.get(k) for k in ("train_loss", "train_acc", "val_loss", "val_acc")
            ]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--arm", choices=("fresh", "reuse"))
    ap.add_argument("study", nargs="?")
    a = ap.parse_args()
    if a.arm:
        return one(a.arm, a.study)
    import yaml

    work = Path(a.out or tempfile.mkdtemp(prefix="bench-final-reuse-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FER_TUNE_CACHE": str(work / "cache")}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    (work / "t.yaml").write_text(yaml.safe_dump(SPACE, sort_keys=False))
    cli = [sys.executable, "-m", "fer_tune.cli"]
    sweep = [*cli, "sweep", str(work / "t.yaml"), "--results", str(work / "results"), "--num-cpus", "1", "--quiet"]
    subprocess.run(sweep, env=env, check=True, capture_output=True)
    print(f"final stage of a synthetic study: {' '.join(ARGS)} (4 runs)")
    seen: dict[str, list] = {"reuse": [], "fresh": []}
    for i in range(a.repeats):
        for arm in ("reuse", "fresh"):
            study = work / f"{arm}-{i}"
            shutil.copytree(work / "results" / "t", study, ignore=shutil.ignore_patterns("final*"))
            b0, t0 = busy(), time.time()
            subprocess.run(
                [sys.executable, __file__, "--arm", arm, str(study)], env=env, check=True, capture_output=True
            )
            cpu, wall = busy() - b0, time.time() - t0
            seen[arm].append(cpu)
            print(f"  {arm:5}  busy {cpu:5.1f} CPU-s  wall {wall:5.1f} s")
    same = epochs(work / "reuse-0") == epochs(work / "fresh-0") and len(epochs(work / "reuse-0")) > 0
    r, f = (sum(v) / len(v) for v in (seen["reuse"], seen["fresh"]))
    print(f"mean: reuse {r:.1f}, fresh {f:.1f} CPU-s ({100 * (1 - r / f):.0f} % less); same epochs: {same}")
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
