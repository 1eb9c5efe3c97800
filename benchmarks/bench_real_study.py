"""A real FER2013 study on a CPU, and whether tuning beats the paper's recipe at the same budget.

Arms, each a real `fer-tune` command; each saves a summary to benchmarks/real_study/ARM.json (small, committed),
so that arms can run in separate sessions and `combine` prints the table from the saved summaries:

    python benchmarks/bench_real_study.py --arm tpe            # (a) search_spaces/fer2013_cpu.yaml: TPE + ASHA
    python benchmarks/bench_real_study.py --arm random         # (b) the same space and trial count, random + ASHA
    python benchmarks/bench_real_study.py --arm final-tpe      # (a)'s best and the paper recipe, retrained
    python benchmarks/bench_real_study.py --arm final-random   # (b)'s best, retrained the same way
    python benchmarks/bench_real_study.py --arm warm           # (c) the file as it ships now: the paper's recipe
                                                               #     as trial 0, the weight EMA searched
    python benchmarks/bench_real_study.py --arm final-warm     # (c)'s 3 best as an ensemble, beside the paper recipe
    python benchmarks/bench_real_study.py --arm combine        # the table
    [--data ../shared/datasets/fer2013] [--out ~/.cache/fer-tune-bench/real_study] [--epochs 12]
    [--finetune-epochs 3] [--seeds 2]

The final stages retrain with more epochs than the study's trials, the same fine-tune and the same seeds, and
evaluate on PublicTest with TenCrop; PublicTest is never used to select anything (the study and the final
stage select on PrivateTest, the paper protocol's val split).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "fer2013_cpu.yaml"
SAVED = Path(__file__).resolve().parent / "real_study"
MODELS = ("last", "best_val", "finetuned")
BUDGET_S = 45 * 60  # the space's wall-time target on a 2-core machine


def fer_tune(*args: str) -> float:
    """Run one fer-tune command with its output on this terminal; its wall time."""
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp"), "RAY_AUTH_MODE": "disabled"}
    print("$ fer-tune " + " ".join(args), flush=True)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "fer_tune.cli", *args], env=env)
    if r.returncode:
        sys.exit(f"fer-tune {args[0]} failed (exit {r.returncode})")
    return time.time() - t0


def save(arm: str, summary: dict) -> None:
    SAVED.mkdir(exist_ok=True)
    (SAVED / f"{arm}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved {SAVED / f'{arm}.json'}")


def study_arm(arm: str, args) -> None:
    sdir = args.out / arm
    if (sdir / "study.json").exists():
        sys.exit(f"{sdir} already holds this arm's study; remove it to run the arm again")
    space = SPACE
    if arm == "random":  # the same file with the random sampler
        raw = yaml.safe_load(SPACE.read_text())
        raw["sampler"] = "random"
        space = args.out / "fer2013_cpu_random.yaml"
        space.write_text(yaml.safe_dump(raw, sort_keys=False))
    args.out.mkdir(parents=True, exist_ok=True)
    wall = fer_tune("sweep", str(space), "--data", str(args.data), "--name", arm, "--results", str(args.out), "--quiet")
    with open(sdir / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    best = max((r for r in rows if r["best_val_acc"] != ""), key=lambda r: float(r["best_val_acc"]))
    states: dict[str, int] = {}
    for r in rows:
        states[r["status"]] = states.get(r["status"], 0) + 1
    save(
        arm,
        {
            "arm": arm,
            "sampler": "random" if arm == "random" else "tpe",
            "warm_start": [r["number"] for r in rows if r.get("warm_start")],
            "wall_s": round(wall, 1),
            "trials": len(rows),
            "states": states,
            "trial_epochs": sum(int(r["epochs"]) for r in rows),
            "best_trial": int(best["number"]),
            "best_val": float(best["best_val_acc"]),
            "best_params": {k[6:]: v for k, v in best.items() if k.startswith("param_") and v != ""},
            "precision": sorted({r.get("precision", "") for r in rows} - {""}),
            "rows": [{k: r[k] for k in ("number", "status", "epochs", "best_val_acc")} for r in rows],
        },
    )


def final_arm(arm: str, args) -> None:
    study = arm.removeprefix("final-")
    sdir = args.out / study
    if not (sdir / "study.json").exists():
        sys.exit(f"{sdir} holds no study: run --arm {study} first (on this machine, with the same --out)")
    extra = ["--baseline", "paper"] if study in ("tpe", "warm") else []
    if study == "warm":
        extra += ["--ensemble", "3"]
    wall = fer_tune(
        "final",
        str(sdir),
        "--epochs",
        str(args.epochs),
        "--finetune-epochs",
        str(args.finetune_epochs),
        "--seeds",
        str(args.seeds),
        "--eval-every",
        str(args.epochs),
        "--quiet",
        *extra,
    )
    m = json.loads((sdir / "final" / "metrics.json").read_text())

    def arm_of(block: dict) -> dict:
        return {
            n: {"mean": a["top1"]["mean"], "std": a["top1"]["std"], "values": a["top1"]["values"]}
            for n, a in block["aggregate"].items()
        }

    out = {
        "arm": arm,
        "wall_s": round(wall, 1),
        "epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs,
        "seeds": [s["seed"] for s in m["seeds"]],
        "trial": m["trial"]["number"],
        "config": m["config"],
        "winner": arm_of(m),
        "final_epochs": (args.epochs + args.finetune_epochs) * len(m["seeds"]),
    }
    if m.get("baseline"):
        out["paper"] = arm_of(m["baseline"])
        out["paper_config"] = m["baseline"]["config"]
    e = m.get("ensemble")
    if e:
        out["ensemble"] = {
            "members": [
                {"trial": x["trial"]["number"], "study_val": x["trial"]["value"], "params": x["trial"]["params"]}
                | {"finetuned": {k: x["aggregate"]["top1"][k] for k in ("mean", "std", "values")}}
                for x in e["members"]
            ],
            "finetuned": {k: e["aggregate"]["top1"][k] for k in ("mean", "std", "values")},
            "difference": e.get("difference", {}).get("top1"),
            "baseline_difference": e.get("baseline_difference", {}).get("top1"),
            "cost": json.loads((sdir / "final" / "model.json").read_text())["cost"],
        }
    save(arm, out)


def _pm(a: dict) -> str:
    return f"{a['mean']:.2f} +- {a['std']:.2f}" if len(a["values"]) > 1 else f"{a['mean']:.2f}"


def combine(args) -> None:
    got = {p.stem: json.loads(p.read_text()) for p in SAVED.glob("*.json")}
    missing = [a for a in ("tpe", "random", "final-tpe", "final-random") if a not in got]
    if missing:
        print(f"arms not run yet: {', '.join(missing)} (the table shows what is saved)")
    print(
        f"\n{'arm':<28}{'trials':>7}{'trial epochs':>14}{'study wall':>12}{'best val %':>12}"
        + "".join(f"{'PublicTest ' + n + ' %':>28}" for n in MODELS)
    )
    rows = []
    for study in ("tpe", "random"):
        s, f = got.get(study), got.get(f"final-{study}")
        label = "(a) TPE + ASHA" if study == "tpe" else "(b) random + ASHA"
        rows.append((label, s, f["winner"] if f else None))
    if "final-tpe" in got and "paper" in got["final-tpe"]:
        rows.append(("paper recipe (no search)", None, got["final-tpe"]["paper"]))
    for label, s, acc in rows:
        print(
            f"{label:<28}"
            + (
                f"{s['trials']:>7}{s['trial_epochs']:>14}{s['wall_s'] / 60:>10.1f} m{s['best_val']:>12.2f}"
                if s
                else f"{'-':>7}{'0':>14}{'-':>12}{'-':>12}"
            )
            + "".join(f"{_pm(acc[n]) if acc else '-':>28}" for n in MODELS)
        )
    for study in ("tpe", "random"):
        s = got.get(study)
        if s:
            verdict = "within" if s["wall_s"] <= BUDGET_S else "OVER"
            print(
                f"{study}: study wall {s['wall_s'] / 60:.1f} min ({verdict} the 45-minute target), states "
                f"{s['states']}, precision {s['precision']}, best trial {s['best_trial']} {s['best_params']}"
            )
    ft = got.get("final-tpe")
    if ft:
        print(f"final stages: {ft['epochs']} epochs + {ft['finetune_epochs']} fine-tune epochs, seeds {ft['seeds']}")
    if ft and "paper" in ft:
        for n in MODELS:
            print(f"(a) - paper recipe, {n}: {ft['winner'][n]['mean'] - ft['paper'][n]['mean']:+.2f} points")
    fr = got.get("final-random")
    if ft and fr:
        for n in MODELS:
            print(f"(a) - (b), {n}: {ft['winner'][n]['mean'] - fr['winner'][n]['mean']:+.2f} points")
    warm, fw = got.get("warm"), got.get("final-warm")
    if warm:
        print(
            f"\n(c) the space as it ships: {warm['trials']} trials, {warm['trial_epochs']} trial epochs, study wall "
            f"{warm['wall_s'] / 60:.1f} min, best val {warm['best_val']:.2f} (trial {warm['best_trial']}), "
            f"the paper's recipe as trial {warm.get('warm_start')}"
        )
    if fw and "ensemble" in fw:
        e = fw["ensemble"]
        print(
            f"(c) final stage --ensemble 3: {fw['epochs']} + {fw['finetune_epochs']} epochs, seeds {fw['seeds']}, "
            "PublicTest top-1 % of the fine-tuned models:"
        )
        for i, x in enumerate(e["members"], 1):
            print(f"  member {i}  trial {x['trial']:>2} (study val {x['study_val']:.2f})  {_pm(x['finetuned']):>16}")
        print(f"  ensemble                              {_pm(e['finetuned']):>16}")
        if "paper" in fw:
            print(f"  paper recipe                          {_pm(fw['paper']['finetuned']):>16}")
        best, paper = e["members"][0]["finetuned"]["mean"], fw.get("paper", {}).get("finetuned", {}).get("mean")
        print(
            f"  ensemble - member 1 (validation's pick): {e['difference']:+.2f} points (goal >= +1.0: "
            f"{'met' if e['difference'] >= 1.0 else 'not met'})"
        )
        if paper is not None:
            print(
                f"  member 1 - paper recipe: {best - paper:+.2f} points (goal >= +1.0: "
                f"{'met' if best - paper >= 1.0 else 'not met'}); ensemble - paper recipe: "
                f"{e['baseline_difference']:+.2f}"
            )
        c = e["cost"]
        print(
            f"  the ensemble's cost: {c['params']:.2f} M parameters, {c['mflops']:.0f} MFLOPs, {c['latency_ms']:.1f} ms"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--arm",
        required=True,
        choices=("tpe", "random", "warm", "final-tpe", "final-random", "final-warm", "combine"),
    )
    ap.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("FER2013_DIR", ROOT.parent / "shared" / "datasets" / "fer2013")),
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path.home() / ".cache" / "fer-tune-bench" / "real_study",
        help="where the studies and final stages are written (large: checkpoints)",
    )
    ap.add_argument("--epochs", type=int, default=12, help="final-stage training epochs (the trials have 8)")
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    if args.arm == "combine":
        combine(args)
    elif args.arm.startswith("final-"):
        final_arm(args.arm, args)
    else:
        if not args.data.exists():
            sys.exit(f"--data {args.data} does not exist")
        study_arm(args.arm, args)


if __name__ == "__main__":
    main()
