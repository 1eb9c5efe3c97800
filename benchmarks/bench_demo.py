"""`fer-tune demo` as a new user runs it: wall time from launch to exit and what the final stage learned.

python benchmarks/bench_demo.py            # the full demo (README's main command)
python benchmarks/bench_demo.py --quick    # the budget the test suite runs
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    quick = "--quick" in sys.argv
    work = Path(tempfile.mkdtemp(prefix="bench-demo-", dir="/tmp"))
    env = {
        **os.environ,
        "RAY_TMPDIR": str(work / "ray"),
        "RAY_AUTH_MODE": "disabled",
        "FER_TUNE_CACHE": str(work / "cache"),
    }
    (work / "ray").mkdir()
    try:
        t0 = time.perf_counter()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "fer_tune.cli",
                "demo",
                "--out",
                str(work / "demo"),
                *(["--quick"] if quick else []),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(f"demo failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        m = json.loads((work / "demo" / "final" / "metrics.json").read_text())
        status = {}
        for line in (work / "demo" / "trials.csv").read_text().splitlines()[1:]:
            st = line.split(",")[3]
            status[st] = status.get(st, 0) + 1
        print(f"fer-tune demo{' --quick' if quick else ''}: {wall:.1f} s wall, launch to exit ({os.cpu_count()} CPUs)")
        print(f"sweep: {sum(status.values())} trials ({', '.join(f'{n} {s}' for s, n in sorted(status.items()))})")
        print(
            f"final stage, test split ({m['seeds'][0]['models']['finetuned']['n']} synthetic faces, TenCrop); "
            f"chance 14.3 %:"
        )
        for name, a in m["aggregate"].items():
            print(
                f"  {name:<9} top-1 {a['top1']['mean']:.2f} %  top-2 {a['top2']['mean']:.2f} %  "
                f"macro-F1 {a['macro_f1']['mean']:.2f} %"
            )
        print(f"report: {(work / 'demo' / 'report.html').stat().st_size / 1e6:.1f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
