"""Population-based training against the same configurations without it, on the synthetic faces.

python benchmarks/bench_pbt.py [--n 3000] [--trials 8] [--study-epochs 3] [--epochs 12] [--interval 3] [--width 0.125]

1. a small study (`fer-tune sweep`, TPE + ASHA over optimizer, scheduler, lr, dropout and weight decay) on
   synthetic:N, one train crop, no random erasing;
2. `fer-tune pbt` from its top 4 trials: 4 members, --epochs, perturbing lr / weight_decay / dropout every
   --interval epochs (scheduler constant);
3. the same 4 configurations retrained for the same epochs without PBT: scheduler constant (PBT's members
   without exploit and explore) and with the study's own scheduler, each a plain fit() with the same seed, two
   at a time on one thread each as the PBT members run.

Printed side by side: each arm's best and mean val_acc at the last epoch, the test top-1 (TenCrop) of its best
member / run, and the wall time of the arm; then the clones PBT made and the schedule its best member followed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict) -> float:
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "fer_tune.cli", *args, "--num-cpus", "2"], env=env, capture_output=True, text=True
    )
    if r.returncode:
        sys.exit(f"fer-tune {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.time() - t0


def retrain(config: dict, source: str) -> dict:
    """One configuration trained without PBT: its last epoch's val_acc and the last weights' test top-1 (TenCrop)."""
    import torch

    from fer_tune import data as fdata
    from fer_tune.config import TrainConfig
    from fer_tune.evaluate import evaluate_model
    from fer_tune.train import fit, model_from_checkpoint

    torch.set_num_threads(1)
    data = fdata.load(source, "paper")
    cfg = TrainConfig.from_dict({**config, "threads": 1})
    res = fit(cfg, data, device=torch.device("cpu"))
    model, _ = model_from_checkpoint(res.checkpoint, torch.device("cpu"))
    x, y = data.arrays("test")
    test = evaluate_model(model, x, y, device=torch.device("cpu"), crops="ten", amp=cfg.amp)
    return {"val_acc": res.history[-1]["val_acc"], "test_top1": test["top1"]}


def arm(configs: list[dict], source: str) -> tuple[list[dict], float]:
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=2) as pool:
        out = list(pool.map(retrain, configs, [source] * len(configs)))
    return out, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="synthetic faces (default 3000)")
    ap.add_argument("--trials", type=int, default=8, help="study trials (default 8)")
    ap.add_argument("--study-epochs", type=int, default=3, help="study max_epochs (default 3)")
    ap.add_argument("--epochs", type=int, default=12, help="PBT and retrain epochs (default 12)")
    ap.add_argument("--interval", type=int, default=3, help="PBT perturbation interval (default 3)")
    ap.add_argument("--width", type=float, default=0.125, help="model width (default 0.125)")
    args = ap.parse_args()
    source = f"synthetic:{args.n}"
    work = Path(tempfile.mkdtemp(prefix="bench_pbt"))
    env = {
        **os.environ,
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp"),
        "RAY_AUTH_MODE": "disabled",
        "FER_TUNE_CACHE": str(work / "cache"),
    }
    space = {
        "name": "bench",
        "sampler": "tpe",
        "seed": 0,
        "num_samples": args.trials,
        "max_epochs": args.study_epochs,
        "early_stopping": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 1, "gpu": 0},
        "data": {"path": source, "protocol": "paper"},
        # no random erasing, as the demo: a tiny model on a few thousand faces learns within a few epochs
        "fixed": {
            "width": args.width,
            "train_crops": "one",
            "test_crops": "center",
            "batch_size": 32,
            "threads": 1,
            "erase_p": 0.0,
        },
        "space": {
            "optimizer": {"type": "categorical", "choices": ["sgd_nesterov", "adam"]},
            "scheduler": {"type": "categorical", "choices": ["constant", "cosine", "rlrp"]},
            "lr_sgd": {
                "type": "float",
                "low": 3e-3,
                "high": 0.1,
                "log": True,
                "key": "lr",
                "when": {"optimizer": ["sgd_nesterov"]},
            },
            "lr_adam": {
                "type": "float",
                "low": 3e-4,
                "high": 1e-2,
                "log": True,
                "key": "lr",
                "when": {"optimizer": ["adam"]},
            },
            "dropout": {"type": "float", "low": 0.0, "high": 0.5},
            "weight_decay": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        },
    }
    (work / "bench.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    t_study = cli("sweep", str(work / "bench.yaml"), "--results", str(work / "results"), "--quiet", env=env)
    sdir = work / "results" / "bench"
    pbt = ["--top-k", "4", "--population", "4", "--epochs", str(args.epochs), "--interval", str(args.interval)]
    t_pbt = cli("pbt", str(sdir), *pbt, "--quiet", env=env)
    m = json.loads((sdir / "pbt" / "metrics.json").read_text())
    rec = json.loads((sdir / "pbt" / "pbt.json").read_text())
    tops = _tops(sdir, rec)
    constant, t_constant = arm(rec["bases"], source)
    scheduled, t_own = arm([{**b, "scheduler": t["config"]["scheduler"]} for b, t in zip(rec["bases"], tops)], source)

    described = ", ".join(f"#{t['number']} ({t['config']['optimizer']}, {t['config']['scheduler']})" for t in tops)
    print(
        f"{source}, width {args.width}, one train crop; study: {args.trials} trials of <= {args.study_epochs} "
        f"epochs ({t_study / 60:.1f} min); top 4: {described}; {args.epochs} epochs each, 2 at a time on 2 cores"
    )
    print(f"{'arm':<44}{'best val':>10}{'mean val':>10}{'test top-1 of best':>20}{'wall':>9}")
    vals = [x["value"] for x in m["members"]]
    rows = [
        (f"PBT from the top 4 (interval {args.interval})", max(vals), statistics.fmean(vals), m["test"]["top1"], t_pbt),
        ("same 4 configs, scheduler constant, no PBT", *_summary(constant), t_constant),
        ("same 4 configs, their own schedulers, no PBT", *_summary(scheduled), t_own),
    ]
    for name, best, mean, test, wall in rows:
        print(f"{name:<44}{best:>10.2f}{mean:>10.2f}{test:>20.2f}{wall / 60:>8.1f}m")
    print(
        f"PBT: {m['clones']} clones; best member {m['best']['member']} (weights from trial "
        f"#{m['best']['trial']['number']}), its schedule:"
    )
    for first, values in m["best"]["schedule"]:
        print(f"  from epoch {first}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    print(
        "per config (val_acc at the last epoch): constant "
        + ", ".join(f"{r['val_acc']:.2f}" for r in constant)
        + "; own scheduler "
        + ", ".join(f"{r['val_acc']:.2f}" for r in scheduled)
        + "; PBT members "
        + ", ".join(f"{v:.2f}" for v in vals)
    )


def _tops(sdir: Path, rec: dict) -> list[dict]:
    """The top trials with their study configs (their own schedulers), in the order the PBT stage took them."""
    from fer_tune.tune.study.outputs import best_trial
    from fer_tune.tune.study.record import read_study, spec_with

    record = read_study(sdir)
    spec = spec_with((sdir / "space.yaml").read_text(), record["overrides"], "space", record["name"])
    return [best_trial(sdir, record, spec, m["trial"]["number"]) for m in rec["members"]]


def _summary(runs: list[dict]) -> tuple[float, float, float]:
    best = max(runs, key=lambda r: r["val_acc"])
    return best["val_acc"], statistics.fmean(r["val_acc"] for r in runs), best["test_top1"]


if __name__ == "__main__":
    main()
