"""Synthetic-face generator: throughput on one core, and learnability by a tiny CNN.

    python benchmarks/bench_synthetic.py [--epochs 5] [--train 6000] [--val 1000] [--no-train]

Prints generation throughput (images/s, best of a few runs) and, unless --no-train, the
validation accuracy per epoch of a 3-conv-layer CNN trained on one CPU thread (about a minute).
The generator is tuned so that epoch 1 is clearly above chance (1/7 = 14 %) and accuracy keeps
rising without reaching ~100 %.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # numpy / BLAS on one core too
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402

from fer_tune.common import NUM_CLASSES
from fer_tune.synthetic import generate


def throughput(n: int = 5000, repeats: int = 3) -> float:
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        generate(n, seed=r)
        best = min(best, time.perf_counter() - t0)
    return n / best


def train_tiny_cnn(n_train: int, n_val: int, epochs: int, seed: int = 0) -> list[float]:
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    xt, yt = generate(n_train, seed=seed + 1)
    xv, yv = generate(n_val, seed=seed + 2)

    def tensors(x, y):
        x = torch.from_numpy(x[:, 4:44, 4:44].astype(np.float32) / 255.0).unsqueeze(1)  # centre 40x40
        return (x - 0.5) / 0.25, torch.from_numpy(y)

    (xt, yt), (xv, yv) = tensors(xt, yt), tensors(xv, yv)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 20
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 10
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 5
        nn.Flatten(),
        nn.Linear(32 * 5 * 5, NUM_CLASSES),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    accs = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xv).argmax(1) == yv).float().mean().item()
        accs.append(acc)
        print(f"epoch {epoch}: val acc {acc:.3f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--no-train", action="store_true")
    args = ap.parse_args()
    print(f"generation: {throughput():,.0f} images/s (one core, 48x48)", flush=True)
    if not args.no_train:
        _, yv = generate(args.val, seed=2)
        print(f"chance: 1/7 = {1 / NUM_CLASSES:.3f}; majority class (happy) = {np.mean(yv == 3):.3f}")
        train_tiny_cnn(args.train, args.val, args.epochs)


if __name__ == "__main__":
    main()
