"""Train-time augmentation throughput on one CPU thread: batched `fer_tune.augment.train_batch` vs the
per-image torchvision PIL pipeline exactly as usef-kh/fer builds it (data/fer2013.py).

    python benchmarks/bench_augment.py [--images 2000] [--reps 3]

The reference images are PIL mode 'F' (the reference feeds Image.fromarray a float64 array); a mode-'L'
run (uint8 PIL images) is timed too. The reference timing excludes DataLoader/collate overhead, so the
real per-image pipeline is somewhat slower than shown.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from fer_tune.augment import train_batch


def reference_transform() -> T.Compose:
    mu, st = 0, 255
    return T.Compose(
        [
            T.RandomResizedCrop(48, scale=(0.8, 1.2)),
            T.RandomApply([T.RandomAffine(0, translate=(0.2, 0.2))], p=0.5),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.RandomRotation(10)], p=0.5),
            T.TenCrop(40),
            T.Lambda(lambda crops: torch.stack([T.ToTensor()(c) for c in crops])),
            T.Lambda(lambda ts: torch.stack([T.Normalize(mean=(mu,), std=(st,))(t) for t in ts])),
            T.Lambda(lambda ts: torch.stack([T.RandomErasing(p=0.5)(t) for t in ts])),
        ]
    )


def bench_reference(arr: np.ndarray, mode: str) -> float:
    ims = [Image.fromarray(a.astype(np.float64) if mode == "F" else a) for a in arr]
    tf = reference_transform()
    t = time.perf_counter()
    out = [tf(im) for im in ims]
    dt = time.perf_counter() - t
    assert out[0].shape == (10, 1, 40, 40)
    return len(ims) / dt


def bench_batched(x: torch.Tensor, batch: int, crops: str, reps: int) -> float:
    g = torch.Generator().manual_seed(0)
    train_batch(x[:batch], g, crops)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for s in range(0, len(x), batch):
            train_batch(x[s : s + batch], g, crops)
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3, help="batched passes; the best is reported")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    arr = np.random.default_rng(0).integers(0, 256, (args.images, 48, 48), dtype=np.uint8)
    x = torch.from_numpy(arr)
    print(f"torch {torch.__version__}, 1 CPU thread, {args.images} random 48x48 images, train pipeline with TenCrop")
    ref = bench_reference(arr, "F")
    print(f"reference per-image torchvision (PIL 'F', as usef-kh/fer): {ref:9.0f} images/s")
    ref_l = bench_reference(arr, "L")
    print(f"reference per-image torchvision (PIL 'L')                : {ref_l:9.0f} images/s")
    for batch in (64, 256):
        ips = bench_batched(x, batch, "ten", args.reps)
        print(
            f"batched train_batch crops=ten, batch {batch:3d}               : {ips:9.0f} images/s"
            f"  ({ips / ref:5.1f}x vs 'F', {ips / ref_l:5.1f}x vs 'L')"
        )
    ips = bench_batched(x, 256, "one", args.reps)
    print(f"batched train_batch crops=one, batch 256 (no per-image ref): {ips:9.0f} images/s")


if __name__ == "__main__":
    main()
