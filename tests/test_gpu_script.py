"""benchmarks/gpu.sh --smoke: every part of the GPU benchmark runs at tiny sizes (here on the CPU) and its JSON
summary holds each part's figures."""

import json
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_smoke_runs_every_part(env, tmp_path):
    def smoke(timeout):
        return subprocess.run(
            [str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", "--out", str(tmp_path / "gpu")],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    t0 = time.monotonic()
    r = smoke(600)
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "gpu" / "gpu.json").read_text())
    assert summary["smoke"] and summary["env"]["device"] in ("cpu", "cuda") and summary["env"]["torch"]
    t = summary["throughput"]
    assert all(v > 0 for v in t["images_per_s"].values()) and t["gflop_per_crop_fwd_bwd"] > 0
    assert t["precision"] in ("bf16", "fp16", "fp32")
    e = summary["epoch"]
    assert e["epoch_seconds"] > 0 and e["projected_300_epochs_minutes"] > 0 and e["train_images"] > 0
    s = summary["study"]
    assert s["status"] == "complete" and len(s["trials"]) == 2 and all(x["crops_per_s"] > 0 for x in s["trials"])
    a = summary["accuracy"]
    assert 0 <= a["test_top1"] <= 100 and a["epochs"] == 1
    for line in ("env: ", "throughput (", "epoch (", "study (", "accuracy ("):
        assert line in r.stdout
    assert wall < 300, f"the smoke run took {wall:.0f} s"
    again = smoke(120)
    assert again.returncode == 2 and again.stdout == "", again
    assert (
        again.stderr
        == f"gpu.sh: {tmp_path / 'gpu'} holds an earlier run (gpu.json, gpu_study, accuracy): pass an empty --out\n"
    )
