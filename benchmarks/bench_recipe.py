"""The paper's recipe against the paper's recipe plus each training addition (label smoothing, mixup, cutmix, weight
EMA, alternating flip, no weight decay on 1-d parameters) and a combination, on the real FER2013 at CPU scale.

    python benchmarks/bench_recipe.py run --arm ARM[,ARM...] [--seeds 0,1] [--epochs 6] [--width 0.25]
            [--data ../shared/datasets/fer2013] [--out ~/.cache/fer-tune-bench/recipe]
        trains each arm and seed with fer_tune.train.fit (paper protocol, vgg_variant at --width, one random crop
        per training image, center-crop validation, bf16 where the CPU has it, the paper's SGD-Nesterov lr 0.01,
        RLRP, dropout 0.2, weight decay 1e-4, batch 64), then scores the last-epoch and the best-val models on
        PublicTest with TenCrop; one JSON per arm and seed in --out (a finished one is not run again).
    python benchmarks/bench_recipe.py combine [--out DIR]
        the table: per arm, PublicTest top-1 mean +- std over its seeds (last epoch, best-val model), the
        difference from the paper arm over the seeds both have, the best val, and the median epoch time.
    python benchmarks/bench_recipe.py overhead [--epochs 2] [--width 0.25] [--repeats 2]
        what each addition costs: seconds per training epoch on 4,000 synthetic faces, every arm in one process,
        interleaved, the paper arm in the same run (best of --repeats).

Arms: paper, smooth (label_smoothing 0.1), mixup (alpha 0.2), cutmix (alpha 1.0, mix_p 0.5), ema (0.999),
alternate (flip alternate), no_wd (no_wd_1d), combo (given with --combo KEY=VALUE,...: the additions that helped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "width": 0.25,
    "train_crops": "one",
    "test_crops": "center",
    "threads": 2,
    "amp": "auto",
}
ARMS = {
    "paper": {},
    "smooth": {"label_smoothing": 0.1},
    "mixup": {"mixup": 0.2},
    "cutmix": {"cutmix": 1.0, "mix_p": 0.5},
    "ema": {"ema": 0.999},
    "alternate": {"flip": "alternate"},
    "no_wd": {"no_wd_1d": True},
}


def _run_one(data, arm: str, changes: dict, seed: int, args, out: Path) -> None:
    from fer_tune.config import TrainConfig
    from fer_tune.device import select_device
    from fer_tune.evaluate import evaluate_model
    from fer_tune.recipe import ArraySplits
    from fer_tune.train import fit, model_from_checkpoint

    f = out / f"{arm}-seed{seed}.json"
    if f.exists():
        print(f"{arm} seed {seed}: done before ({f})")
        return
    cfg = TrainConfig.from_dict({**BASE, "width": args.width, "epochs": args.epochs, "seed": seed, **changes})
    device = select_device("cpu")
    splits = {s: data.arrays(s) for s in ("train", "val", "test")}
    best: dict = {}

    def on_epoch(m: dict, take) -> None:
        if take is not None and m["is_best"]:
            best["model"] = take()["model"]
        print(
            f"  {arm} seed {seed} epoch {m['epoch']}: train_acc {m.get('train_acc', 0):.2f} "
            f"val_acc {m.get('val_acc', 0):.2f} ({m.get('epoch_seconds', 0):.0f} s)",
            flush=True,
        )

    t0 = time.time()
    res = fit(cfg, ArraySplits(splits), device=device, on_epoch=on_epoch)
    x, y = splits["test"]
    scores = {}
    for name, weights in (("last", res.checkpoint["model"]), ("best_val", best["model"])):
        model, _ = model_from_checkpoint({"config": cfg.to_dict(), "model": weights}, device)
        scores[name] = evaluate_model(model, x, y, device=device, crops="ten", amp=cfg.amp)["top1"]
    row = {
        "arm": arm,
        "seed": seed,
        "changes": changes,
        "config": cfg.to_dict(),
        "status": res.status,
        "wall_s": time.time() - t0,
        "best_val": res.best["val_acc"],
        "best_epoch": res.best["epoch"],
        "test_last": scores["last"],
        "test_best_val": scores["best_val"],
        "history": res.history,
        "torch": torch.__version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(row, indent=1))
    print(
        f"{arm} seed {seed}: PublicTest top-1 last {scores['last']:.2f} %, best-val model {scores['best_val']:.2f} %"
        f" (best val {res.best['val_acc']:.2f} % at epoch {res.best['epoch']}), {row['wall_s']:.0f} s",
        flush=True,
    )


def run(args) -> None:
    from fer_tune import data as fdata

    torch.set_num_threads(2)
    arms = [a.strip() for a in args.arm.split(",") if a.strip()]
    combo = dict(kv.split("=", 1) for kv in args.combo.split(",") if kv) if args.combo else {}
    bad = sorted(set(arms) - set(ARMS) - ({"combo"} if combo else set()))
    if bad:
        raise SystemExit(f"--arm: unknown arm(s) {', '.join(bad)} ({', '.join(ARMS)}, combo with --combo)")
    d = fdata.load(str(args.data), "paper")
    seeds = [int(s) for s in args.seeds.split(",")]
    print(
        f"FER2013 paper protocol; vgg_variant width {args.width}, {args.epochs} epochs, one-crop training, "
        f"center-crop val, PublicTest with TenCrop; arms {arms}; seeds {seeds}; torch {torch.__version__}",
        flush=True,
    )
    for seed in seeds:
        for arm in arms:
            _run_one(d, arm, combo if arm == "combo" else ARMS[arm], seed, args, Path(args.out).expanduser())


def _pm(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} +- {statistics.stdev(values):.2f}"


def _median_epoch(runs: dict) -> float:
    return statistics.median(h["epoch_seconds"] for r in runs.values() for h in r["history"])


def overhead(args) -> None:
    from fer_tune import data as fdata
    from fer_tune.config import TrainConfig
    from fer_tune.device import select_device
    from fer_tune.train import fit

    torch.set_num_threads(2)
    d = fdata.load("synthetic:4000", "paper")
    device = select_device("cpu")
    best: dict[str, float] = {}
    arms = {**ARMS, "all": {k: v for a in ARMS.values() for k, v in a.items()}}
    for _ in range(args.repeats):
        for arm, changes in arms.items():
            cfg = TrainConfig.from_dict({**BASE, "width": args.width, "epochs": args.epochs, **changes})
            r = fit(cfg, d, device=device)
            train_s = min(h["epoch_seconds"] for h in r.history)
            best[arm] = min(best.get(arm, float("inf")), train_s)
    print(f"epoch seconds on synthetic:4000, width {args.width}, best of {args.repeats} x {args.epochs} epochs:")
    for arm, s in best.items():
        print(f"  {arm:<10}{s:8.2f} s  {s / best['paper']:.2f}x the paper arm")


def combine(args) -> None:
    out = Path(args.out).expanduser()
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("*-seed*.json"))]
    if not rows:
        raise SystemExit(f"no results in {out}: run `bench_recipe.py run --arm ...` first")
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["arm"], {})[r["seed"]] = r
    paper = by.get("paper", {})
    order = [a for a in [*ARMS, "combo"] if a in by]
    print(
        f"{'arm':<10}{'changes':<34}{'seeds':>6}{'PublicTest last':>18}{'diff':>8}{'best-val model':>17}{'diff':>8}"
        f"{'best val':>16}{'epoch':>8}"
    )
    for arm in order:
        runs = by[arm]
        seeds = sorted(runs)
        both = [s for s in seeds if s in paper]
        diff = {
            k: (f"{statistics.fmean(runs[s][k] - paper[s][k] for s in both):+.2f}" if both and arm != "paper" else "-")
            for k in ("test_last", "test_best_val")
        }
        changes = ", ".join(f"{k}={v}" for k, v in runs[seeds[0]]["changes"].items()) or "(the paper's recipe)"
        print(
            f"{arm:<10}{changes:<34}{len(seeds):>6}{_pm([runs[s]['test_last'] for s in seeds]):>18}"
            f"{diff['test_last']:>8}{_pm([runs[s]['test_best_val'] for s in seeds]):>17}{diff['test_best_val']:>8}"
            f"{_pm([runs[s]['best_val'] for s in seeds]):>16}{_median_epoch(runs):>7.0f}s"
        )
    spread = [paper[s]["test_last"] for s in sorted(paper)]
    if len(spread) > 1:
        print(f"paper arm: PublicTest last over seeds {sorted(paper)} spans {max(spread) - min(spread):.2f} points")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--arm", required=True, help="comma-separated arms")
    p.add_argument("--combo", default="", help="the combo arm's changes: KEY=VALUE,...")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "fer2013")
    p.add_argument("--out", default="~/.cache/fer-tune-bench/recipe")
    p.set_defaults(func=run)
    p = sub.add_parser("overhead")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=2)
    p.set_defaults(func=overhead)
    p = sub.add_parser("combine")
    p.add_argument("--out", default="~/.cache/fer-tune-bench/recipe")
    p.set_defaults(func=combine)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
