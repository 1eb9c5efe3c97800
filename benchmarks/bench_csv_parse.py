"""Parse the full FER2013 challenge CSV: fer_tune.data.parse_csv vs the paper code's row-by-row np.fromstring.

usage: python benchmarks/bench_csv_parse.py [fer2013.csv]
Without an argument it converts ../shared/datasets/fer2013 to /tmp/fer2013_bench.csv first (fer-tune data convert).
Both parsers run in this one process on the same file, best of 3 each.
"""

import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from fer_tune.data import parse_csv

ROOT = Path(__file__).resolve().parents[1]


def reference_parse(path):
    """usef-kh/fer data/fer2013.py: pandas read_csv, then one np.fromstring per row."""
    data = pd.read_csv(path)
    image_array = np.zeros(shape=(len(data), 48, 48))
    image_label = np.array(list(map(int, data["emotion"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for i, row in enumerate(data.index):
            image = np.fromstring(data.loc[row, "pixels"], dtype=int, sep=" ")
            image_array[i] = np.reshape(image, (48, 48))
    return image_array, image_label


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    if len(sys.argv) > 1:
        csv = Path(sys.argv[1])
    else:
        csv = Path("/tmp/fer2013_bench.csv")
        if not csv.exists():
            subprocess.run(
                ["fer-tune", "data", "convert", str(ROOT.parent / "shared/datasets/fer2013"), str(csv)], check=True
            )
    print(f"file: {csv} ({csv.stat().st_size / 1e6:.1f} MB)")
    t_ref, (ref_img, ref_lab) = best_of(lambda: reference_parse(csv))
    t_new, (img, lab, origin, skipped) = best_of(lambda: parse_csv(csv))
    assert np.array_equal(ref_img.astype(np.uint8), img) and np.array_equal(ref_lab, lab) and not skipped
    print(f"rows: {len(lab):,}")
    print(f"reference (pandas + per-row np.fromstring): {t_ref:.2f} s")
    print(f"fer_tune.data.parse_csv (vectorized):       {t_new:.2f} s")
    print(f"speed-up: {t_ref / t_new:.1f}x (identical arrays)")


if __name__ == "__main__":
    main()
