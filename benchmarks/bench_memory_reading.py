"""What a trial's memory figures cost to read, in a process that has loaded PyTorch and Ray Tune as a trial has.

python benchmarks/bench_memory_reading.py [--calls 50]
    prints the CPU milliseconds of one reading of this process's memory (fer_tune.tune.runtime.trial._read_memory:
    /proc/self/smaps_rollup, then /proc/self/smaps for Ray's object-store mapping), of smaps_rollup alone, and of
    memory_mb() as a trial's report calls it (one reading every MEMORY_S seconds, the last one in between).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def cpu_ms(fn, calls: int) -> float:
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    import ray.tune  # noqa: F401  (a trial process has both loaded)
    import torch  # noqa: F401

    from fer_tune.tune.runtime import trial

    smaps = Path("/proc/self/smaps")
    lines = len(smaps.read_text().splitlines())
    print(f"/proc/self/smaps: {lines} lines in this process (torch and ray.tune imported)")
    print(f"  a reading (_read_memory):      {cpu_ms(trial._read_memory, args.calls):6.2f} ms CPU")
    print(
        f"  smaps_rollup alone:            {cpu_ms(Path('/proc/self/smaps_rollup').read_text, args.calls):6.2f} ms CPU"
    )
    print(
        f"  memory_mb() within MEMORY_S:   {cpu_ms(trial.memory_mb, args.calls):6.2f} ms CPU (one reading, then the last)"
    )


if __name__ == "__main__":
    main()
