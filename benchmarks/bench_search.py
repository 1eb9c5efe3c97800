"""Search efficiency on the synthetic faces: the optimizer x scheduler grid (every point trained to the end)
against TPE + ASHA over the same space, both with the real `fer-tune sweep`.

For each study, trials in the order they were started: epochs consumed until a trial whose best val_acc is
within 1 point of the grid's best has been seen. Target: TPE + ASHA needs <= 30 % of the grid's epochs.

    python benchmarks/bench_search.py [--n 2500] [--epochs 6] [--tpe-trials 20] [--seeds 0,1,2]

The grid runs once; TPE + ASHA once per sampler seed (a lucky first random trial decides a lot).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from bench_study import run_sweep

OPTIMIZERS = ["sgd", "sgd_nesterov", "asgd", "adam", "amsgrad", "adadelta", "adagrad"]
SCHEDULERS = ["constant", "rlrp", "cosine", "cosine_wr", "onecycle", "step"]


def space(name: str, n: int, epochs: int, **kw) -> dict:
    return {
        "name": name,
        "description": "bench_search",
        "metric": "val_acc",
        "mode": "max",
        "max_epochs": epochs,
        "resources": {"cpu": 1, "gpu": 0},
        "data": {"path": f"synthetic:{n}", "protocol": "paper"},
        "fixed": {
            "width": 0.125,
            "train_crops": "one",
            "test_crops": "center",
            "batch_size": 32,
            "threads": 1,
            "erase_p": 0.0,
            "lr": 0.01,
            "t_0": 2,
            "step_size": 2,
        },
        "space": {
            "optimizer": {"type": "categorical", "choices": OPTIMIZERS},
            "scheduler": {"type": "categorical", "choices": SCHEDULERS},
        },
        **kw,
    }


def trials(sdir: Path) -> list[dict]:
    with open(sdir / "trials.csv") as fh:
        return sorted(csv.DictReader(fh), key=lambda r: int(r["number"]))


def epochs_until(rows: list[dict], target: float) -> tuple[int | None, int]:
    used = 0
    for r in rows:
        used += int(r["epochs"])
        if r["best_val_acc"] != "" and float(r["best_val_acc"]) >= target:
            return used, int(r["number"])
    return None, -1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--tpe-trials", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2", help="TPE sampler seeds, comma-separated")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-search-", dir="/tmp"))
    n_grid = len(OPTIMIZERS) * len(SCHEDULERS)
    _, wall_g, gdir = run_sweep(
        space("grid", a.n, a.epochs, sampler="grid", seed=0, num_samples=n_grid, early_stopping={"type": "none"}), work
    )
    g = trials(gdir)
    best = max(float(r["best_val_acc"]) for r in g if r["best_val_acc"] != "")
    grid_total = sum(int(r["epochs"]) for r in g)
    g_used, g_at = epochs_until(g, best - 1.0)
    near = sum(1 for r in g if r["best_val_acc"] != "" and float(r["best_val_acc"]) >= best - 1.0)
    print(
        f"space: {len(OPTIMIZERS)} optimizers x {len(SCHEDULERS)} schedulers (lr 0.01), synthetic:{a.n}, width "
        f"0.125, at most {a.epochs} epochs per trial"
    )
    print(
        f"grid:       {len(g)} trials, {grid_total} epochs, {wall_g:.0f} s wall; best val_acc {best:.2f}; "
        f"{near} of {len(g)} points within 1 point of it; the grid's order reached one after {g_used} epochs "
        f"(trial {g_at})"
    )
    shares = []
    for seed in map(int, a.seeds.split(",")):
        _, wall_t, tdir = run_sweep(
            space(
                f"tpe{seed}",
                a.n,
                a.epochs,
                sampler="tpe",
                seed=seed,
                num_samples=a.tpe_trials,
                early_stopping={"type": "asha", "grace_period": 1, "reduction_factor": 3},
            ),
            work,
        )
        t = trials(tdir)
        tpe_total = sum(int(r["epochs"]) for r in t)
        t_used, t_at = epochs_until(t, best - 1.0)
        t_best = max(float(r["best_val_acc"]) for r in t if r["best_val_acc"] != "")
        share = 100 * t_used / grid_total if t_used is not None else None
        shares.append(share)
        print(
            f"TPE + ASHA seed {seed}: {len(t)} trials, {tpe_total} epochs ({100 * tpe_total / grid_total:.1f} % of "
            f"the grid's), {wall_t:.0f} s wall; best val_acc {t_best:.2f}; "
            + (
                f"within 1 point of the grid's best after {t_used} epochs (trial {t_at}) = {share:.1f} % of the "
                "grid's epochs"
                if t_used is not None
                else "never within 1 point of the grid's best"
            )
        )
    found = [x for x in shares if x is not None]
    print(
        f"epochs to within 1 point, share of the grid's {grid_total}: "
        + ", ".join("not found" if x is None else f"{x:.1f} %" for x in shares)
        + f"; found by {len(found)} of {len(shares)} seeds (target <= 30 %)"
    )


if __name__ == "__main__":
    main()
