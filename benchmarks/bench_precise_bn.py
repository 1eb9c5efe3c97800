"""Does validation read stale BatchNorm statistics, and does precise_bn make early epochs predict the final one?

Trains configurations drawn at random from search_spaces/fer2013_cpu.yaml (width 0.25, one training crop, center
test crop, bf16 where the CPU has it) on FER2013 with the paper protocol, and after every epoch evaluates the
validation split (PrivateTest) twice from the same weights: as training leaves them (BatchNorm's running
statistics, what a study's trials report today) and with the statistics recomputed over N training batches on a
copy of the model (fer_tune.precise_bn, what `precise_bn=N` does). Training is the same either way (precise_bn
only touches the running statistics, which train mode does not read; tests/test_train.py checks the losses are
identical), so each configuration is one run and the two readings are paired.

Arms save their outputs to benchmarks/precise_bn/config-K.json; `combine` reads them and prints, per reading:
Spearman's rank correlation across configurations between the val accuracy at epoch e and at the last epoch;
which configurations ASHA (grace period 2, reduction factor 2, as fer2013_cpu.yaml) would keep to the end and how
far the kept best falls below the true best; how often the two readings differ by more than 5 points; the cost
of the recompute per epoch.

    python benchmarks/bench_precise_bn.py --arm 0 [--arm 1 ...]    # one configuration each (run two at a time)
    python benchmarks/bench_precise_bn.py --combine
    [--data ../shared/datasets/fer2013] [--epochs 8] [--batches 50] [--seed 0]
    [--train-crops ten]    # the paper's TenCrop training instead of the space's one crop (saved as config-K-ten)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAVED = Path(__file__).resolve().parent / "precise_bn"
SPACE = ROOT / "search_spaces" / "fer2013_cpu.yaml"


def configuration(k: int, seed: int, epochs: int, train_crops: str = "one"):
    """The k-th configuration Optuna's RandomSampler(seed) draws from the space, as a TrainConfig."""
    import optuna

    from fer_tune.tune.study.spaces import load_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_space(str(SPACE))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
    define = spec.define_by_run()
    for _ in range(k + 1):
        trial = study.ask()
        define(trial)
        study.tell(trial, 0.0)
    params = trial.params
    return params, spec.trial_config(params).replace(epochs=epochs, threads=1, train_crops=train_crops)


def arm(k: int, args) -> None:
    import torch

    from fer_tune import data as fdata
    from fer_tune import precise_bn
    from fer_tune.train import Observer, as_tensor, fit, predict_logits

    params, cfg = configuration(k, args.seed, args.epochs, args.train_crops)
    data = fdata.load(args.data, "paper")
    x_val, y_val = data.arrays("val")
    rows: list[dict] = []

    class Both(Observer):
        def on_fit_start(self, cfg, device, dtype, start, steps) -> None:
            self.device, self.dtype = device, dtype
            self.x_train = as_tensor(data.arrays("train")[0], device)
            self.x, self.y = as_tensor(x_val, device), as_tensor(y_val, device)

        def on_validation_end(self, epoch: int, metrics: dict, model: torch.nn.Module) -> None:
            t0 = time.perf_counter()
            twin = copy.deepcopy(model)
            batches = precise_bn.train_batches(
                self.x_train, args.batches, cfg.batch_size, cfg.train_crops, cfg.seed, epoch
            )
            precise_bn.recompute(twin, batches, self.dtype)
            recompute_s = time.perf_counter() - t0
            logits = predict_logits(
                twin, self.x, crops=cfg.test_crops, batch_size=cfg.eval_batch_size, dtype=self.dtype
            )
            rows.append(
                {
                    "epoch": epoch,
                    "val_acc": metrics["val_acc"],
                    "val_acc_precise": 100.0 * float((logits.argmax(1) == self.y).float().mean()),
                    "train_acc": metrics["train_acc"],
                    "recompute_s": recompute_s,
                    "epoch_s": metrics["epoch_seconds"],
                }
            )
            r = rows[-1]
            print(
                f"config {k} epoch {epoch}: val {r['val_acc']:.2f} | precise {r['val_acc_precise']:.2f} "
                f"(recompute {recompute_s:.1f} s, epoch {r['epoch_s']:.0f} s)",
                flush=True,
            )

    t0 = time.time()
    result = fit(cfg, data, device=torch.device("cpu"), observers=[Both()])
    out = {
        "config": k,
        "seed": args.seed,
        "train_crops": cfg.train_crops,
        "params": params,
        "batches": args.batches,
        "status": result.status,
        "precision": result.precision,
        "wall_s": time.time() - t0,
        "epochs": rows,
        "torch_threads": torch.get_num_threads(),
    }
    SAVED.mkdir(exist_ok=True)
    name = f"config-{k}{suffix(args.train_crops)}.json"
    (SAVED / name).write_text(json.dumps(out, indent=1) + "\n")
    print(f"saved {SAVED / name}")


def suffix(train_crops: str) -> str:
    return "" if train_crops == "one" else f"-{train_crops}"


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def asha(values: dict[int, dict[int, float]], rungs: list[int], keep: float = 0.5) -> set[int]:
    """The configurations synchronous successive halving keeps to the last epoch, ranking by `values`
    {config: {epoch: val}} at each rung (ASHA with all trials at a rung together)."""
    alive = set(values)
    for r in rungs:
        ranked = sorted(alive, key=lambda c: -values[c][r])
        alive = set(ranked[: max(1, int(len(ranked) * keep))])
    return alive


def combine(args) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(SAVED.glob("config-*.json"))]
    runs = [r for r in runs if r["status"] == "completed" and r.get("train_crops", "one") == args.train_crops]
    if len(runs) < 2:
        sys.exit(f"{len(runs)} completed configurations in {SAVED}: run more arms first")
    last = min(len(r["epochs"]) for r in runs)
    readings = {"stale": "val_acc", "precise": "val_acc_precise"}
    by = {
        name: {r["config"]: {e["epoch"]: e[key] for e in r["epochs"]} for r in runs} for name, key in readings.items()
    }
    configs = sorted(by["stale"])
    print(
        f"{len(runs)} configurations of {SPACE.name} (train_crops {args.train_crops}), {last} epochs, precise_bn over "
        f"{runs[0]['batches']} batches"
    )
    print("config  " + "  ".join(f"ep{e:>2} stale/precise" for e in range(1, last + 1)))
    for c in configs:
        cells = "  ".join(f"   {by['stale'][c][e]:5.1f}/{by['precise'][c][e]:5.1f}  " for e in range(1, last + 1))
        print(f"{c:>6}  {cells}")
    for target in ("stale", "precise") if last > 1 else ():
        final = [by[target][c][last] for c in configs]
        print(f"\nSpearman rank correlation with the last epoch's val ({target} reading):")
        for name in readings:
            corr = [f"e{e} {spearman([by[name][c][e] for c in configs], final):+.2f}" for e in range(1, last)]
            print(f"  {name:>7} at   " + "   ".join(corr))
    rungs = [r for r in (2, 4) if r < last]
    for target in readings if rungs else ():
        truth = {c: by[target][c][last] for c in configs}
        best = max(truth.values())
        print(f"\nASHA (rungs {rungs}, keep half): the best final val {best:.2f} ({target} reading)")
        for name in readings:
            kept = asha(by[name], rungs)
            got = max(truth[c] for c in kept)
            print(f"  ranking by {name:>7}: keeps {sorted(kept)}; their best final {got:.2f} ({got - best:+.2f})")
    gaps = [abs(by["stale"][c][e] - by["precise"][c][e]) for c in configs for e in range(1, last + 1)]
    big = sum(g > 5 for g in gaps)
    print(f"\nreadings differ by > 5 points in {big} of {len(gaps)} epochs (largest {max(gaps):.1f})")
    rec = [e["recompute_s"] / e["epoch_s"] for r in runs for e in r["epochs"]]
    print(f"recompute cost: {100 * sum(rec) / len(rec):.1f} % of an epoch on average (max {100 * max(rec):.1f} %)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", type=int, action="append", default=[], help="configuration number (repeatable)")
    ap.add_argument("--combine", action="store_true")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "fer2013"))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-crops", choices=("one", "ten"), default="one")
    args = ap.parse_args()
    for k in args.arm:
        arm(k, args)
    if args.combine:
        combine(args)


if __name__ == "__main__":
    main()
