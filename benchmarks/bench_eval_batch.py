"""Evaluation batch size on a CPU: seconds for a TenCrop pass over 3,589 images (FER2013's val split size) with
fer_tune.train.predict_logits at several images per forward pass, side by side in this process; `auto` is what
fit() uses by default (128 crops' worth on a CPU).

    python benchmarks/bench_eval_batch.py [--widths 0.25,0.125,1.0] [--threads 2] [--images 512]

The model is vgg_variant in eval mode (channels_last, as fit() builds it) with random weights; random images;
timings are extrapolated from --images images to 3,589.
"""

from __future__ import annotations

import argparse
import time

import torch

from fer_tune.config import TrainConfig
from fer_tune.train import build_model, eval_images_per_batch, predict_logits

VAL = 3589


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="0.25,0.125,1.0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    x = torch.randint(0, 256, (a.images, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    print(f"TenCrop evaluation on CPU, {a.threads} threads, seconds per {VAL:,} images (from {a.images})")
    for width in map(float, a.widths.split(",")):
        model = build_model(TrainConfig(width=width), cpu).eval()
        auto = eval_images_per_batch(cpu, "ten")
        sizes = [auto, 4, 8, 32, 64, 256]
        times = {}
        for bs in sizes:
            if bs in times:
                continue
            predict_logits(model, x[: bs * 2], crops="ten", batch_size=bs)  # warm-up
            t0 = time.perf_counter()
            predict_logits(model, x, crops="ten", batch_size=bs)
            times[bs] = (time.perf_counter() - t0) * VAL / a.images
        line = ", ".join(f"{bs} images {s:.1f} s" for bs, s in sorted(times.items()))
        print(
            f"width {width}: {line}; auto = {auto} images ({auto * 10} crops): {times[auto]:.1f} s, "
            f"{times[256] / times[auto]:.2f}x faster than 256 images per pass"
        )


if __name__ == "__main__":
    main()
