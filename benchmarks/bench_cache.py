"""Dataset cache: the first load of the full FER2013 (parse + cache write) against a cached load.

python benchmarks/bench_cache.py [PATH]   (default ../shared/datasets/fer2013, a fresh cache in a temp dir)
"""

import sys
import tempfile
import time
from pathlib import Path

from fer_tune.data import load

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else str(ROOT.parent / "shared" / "datasets" / "fer2013")
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        d = load(path, "paper", cache_dir=cache)
        first = time.perf_counter() - t
        times = []
        for _ in range(5):
            t = time.perf_counter()
            load(path, "paper", cache_dir=cache)
            times.append(time.perf_counter() - t)
    print(f"{path}: {len(d.labels):,} images ({d.format})")
    print(f"first load (parse + cache write): {first:.2f} s")
    print(f"cached load: best {min(times):.3f} s, worst {max(times):.3f} s of 5")


if __name__ == "__main__":
    main()
