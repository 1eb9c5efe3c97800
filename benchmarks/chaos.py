"""The final and PBT stages under kills: SIGKILL the command (its whole process group, as a machine going away)
K times at random moments, run it again each time, and compare what it ends with to an uninterrupted run.

    python benchmarks/chaos.py final [--kills 2] [--runs 1] [--seed 0] [--out /tmp/chaos]
    python benchmarks/chaos.py pbt [--kills 2] [--runs 1]

A small study is swept once (4 trials x 2 epochs on synthetic:1000, width 0.0625). Then, for each run:

- reference: the stage uninterrupted (final: 2 seeds x 4 epochs + 2 fine-tune epochs, an evaluation every 2;
  pbt: a population of 3 from the top 2 trials, 6 epochs, a perturbation every 2);
- chaos: the same command, killed K times, each kill at a moment drawn from U(0.5, 6 s) after its newest epoch
  result appeared, and started again after each kill (the same command: a stage continues where it stopped);

and prints, per run: for the final stage, whether the chaos run's metrics.json equals the reference's (every
per-epoch value, every test score: bit for bit; the training loop resumes exactly on CPU); for PBT, whether every
member reached the last epoch (PBT's exploit decisions depend on the order in which members report, so two
uninterrupted runs differ as well: `--kills 0` shows it); how many epochs were reported more than once, beside the
reference's count (PBT's clones redo epochs by design), lost or stuck runs (a stage that did not complete), and the
wall time. Each run's files stay under OUT/run-N/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_scale import space

ROOT = Path(__file__).resolve().parents[1]
# the scale benchmark's tiny trials, 4 of them, every one to its end
SPACE = {
    **space(4, "after"),
    "name": "chaos",
    "early_stopping": {"type": "none"},
    "data": {"path": "synthetic:1000", "protocol": "paper"},
}
STAGE_ARGS = {
    "final": ["--seeds", "2", "--epochs", "4", "--finetune-epochs", "2", "--eval-every", "2"],
    "pbt": ["--top-k", "2", "--population", "3", "--epochs", "6", "--interval", "2"],
}


def env() -> dict:
    return {
        **os.environ,
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp"),
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fer_tune.cli", *map(str, args), "--quiet", "--num-cpus", "2"]


def newest_result(directory: Path) -> float:
    """When the newest epoch result was written under `directory` (0: none yet)."""
    return max((p.stat().st_mtime for p in directory.glob("tune/*/result.json")), default=0.0)


def stage_command(stage: str, sdir: Path, out: Path) -> list[str]:
    if stage == "final":
        return cli("final", sdir, "--out", out, *STAGE_ARGS["final"])
    return cli("pbt", sdir, *STAGE_ARGS["pbt"])


def stage_dir(stage: str, sdir: Path, out: Path) -> Path:
    return out if stage == "final" else sdir / "pbt"


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def chaos_run(stage: str, sdir: Path, out: Path, kills: int, rng: random.Random, log: Path) -> dict:
    """The stage killed `kills` times, then run to its end; what happened."""
    done_kills, starts = 0, 0
    t0 = time.time()
    while True:
        starts += 1
        with open(log, "a") as fh:
            proc = subprocess.Popen(
                stage_command(stage, sdir, out), env=env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        if done_kills >= kills:
            rc = proc.wait(timeout=1200)
            break
        seen = newest_result(stage_dir(stage, sdir, out))
        while proc.poll() is None and newest_result(stage_dir(stage, sdir, out)) <= seen:
            time.sleep(0.2)  # a new epoch result from this command
        if proc.poll() is not None:  # it finished before the kill
            rc = proc.returncode
            break
        time.sleep(rng.uniform(0.5, 6.0))
        if proc.poll() is not None:
            rc = proc.returncode
            break
        kill_group(proc)
        done_kills += 1
        time.sleep(1)
    return {"rc": rc, "kills": done_kills, "starts": starts, "wall_s": round(time.time() - t0, 1)}


def redone_epochs(directory: Path) -> int:
    """Epoch results reported more than once (an epoch trained again after a kill) across the stage's runs."""
    n = 0
    for f in directory.glob("tune/*/result.json"):
        seen: set[tuple] = set()
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            key = (row.get("phase", "train"), row.get("epoch"), row.get("arm"), row.get("member"))
            n += key in seen
            seen.add(key)
    return n


def comparable(metrics: dict) -> dict:
    """metrics.json without what differs between two identical runs (times, paths, host facts)."""
    drop = {"wall_seconds", "seconds", "epoch_seconds", "device_seconds", "finished", "started", "latency_ms", "node"}
    drop |= {"images_per_s", "rss_mb", "pss_mb", "uss_mb", "trial_start", "time_total_s", "latency", "when"}
    drop |= {"directory", "out", "path", "node_id", "store_rss_mb", "store_pss_mb", "timestamp", "time_this_iter_s"}
    drop |= {"device_hours"}

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in drop}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean(metrics)


def differences(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += differences(a.get(k), b.get(k), f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


SAME = {"final": "metrics.json identical", "pbt": "every member to its last epoch"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("final", "pbt"))
    p.add_argument("--kills", type=int, default=2)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/chaos")
    args = p.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.out) / args.stage
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "chaos.yaml").write_text(yaml.safe_dump(SPACE, sort_keys=False))
    r = subprocess.run(cli("sweep", root / "chaos.yaml", "--results", root), env=env(), capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"the study failed:\n{r.stderr[-3000:]}")
    study = root / "chaos"
    print(f"{args.stage}: {' '.join(STAGE_ARGS[args.stage])}; {args.kills} SIGKILLs per run, then run to the end")
    totals = {"equal": 0, "runs": 0, "redone": 0, "lost": 0}
    for k in range(1, args.runs + 1):
        run = root / f"run-{k}"
        ref_study, chaos_study = run / "reference" / "chaos", run / "chaos" / "chaos"
        for d in (ref_study, chaos_study):  # each stage in its own copy of the study (the PBT stage lives in it)
            shutil.copytree(study, d)
        t0 = time.time()
        with open(run / "reference.log", "w") as fh:
            ref_rc = subprocess.run(
                stage_command(args.stage, ref_study, run / "reference" / "final"),
                env=env(),
                stdout=fh,
                stderr=subprocess.STDOUT,
            ).returncode
        ref_wall = time.time() - t0
        got = chaos_run(args.stage, chaos_study, run / "chaos" / "final", args.kills, rng, run / "chaos.log")
        ref_dir = stage_dir(args.stage, ref_study, run / "reference" / "final")
        chaos_dir = stage_dir(args.stage, chaos_study, run / "chaos" / "final")
        lost = got["rc"] != 0 or not (chaos_dir / "metrics.json").is_file()
        diff = ["no metrics.json"] if lost or ref_rc else []
        if not diff and args.stage == "final":
            a = comparable(json.loads((ref_dir / "metrics.json").read_text()))
            b = comparable(json.loads((chaos_dir / "metrics.json").read_text()))
            diff = differences(a, b)
        elif not diff:  # PBT's exploit decisions depend on the order results arrive: every member to its end
            m = json.loads((chaos_dir / "metrics.json").read_text())
            epochs = int(STAGE_ARGS["pbt"][STAGE_ARGS["pbt"].index("--epochs") + 1])
            diff = [f"member {x['member']} ended at epoch {x['epoch']}" for x in m["members"] if x["epoch"] != epochs]
            diff += [] if m["status"] == "complete" else [f"status {m['status']}"]
        redone, ref_redone = redone_epochs(chaos_dir), redone_epochs(ref_dir)  # PBT's clones redo epochs by design
        totals["runs"] += 1
        totals["equal"] += not diff
        totals["redone"] += redone
        totals["lost"] += lost
        print(
            f"run {k}: {got['kills']} kills, {got['starts']} starts, rc {got['rc']}; reference {ref_wall:.0f} s, "
            f"chaos {got['wall_s']:.0f} s; {SAME[args.stage] if not diff else 'DIFFERS'}; "
            f"epochs trained twice {redone} (reference {ref_redone}); lost/stuck {int(lost)}"
        )
        for d in diff[:8]:
            print(f"    {d}")
    print(
        f"total: {totals['equal']}/{totals['runs']} runs with {SAME[args.stage]}, {totals['redone']} epochs trained "
        f"twice, {totals['lost']} lost or stuck"
    )
    (root / "summary.json").write_text(json.dumps(totals))


if __name__ == "__main__":
    main()
