"""Everything a GPU run of fer-tune needs measured, in one command (benchmarks/gpu.sh runs it).

    benchmarks/gpu.sh [--data ../shared/datasets/fer2013] [--out DIR] [--parts env,throughput,epoch,study,accuracy]
    benchmarks/gpu.sh --smoke          # the same parts at tiny sizes, on a CPU too (< 3 minutes)

Parts (each prints its lines as it goes; one JSON summary at the end, also written to OUT/gpu.json):
- env: the GPU (name, memory), torch, CUDA, cuDNN, CPU threads;
- throughput: train images/s of vgg_variant width 1 with TenCrop, batch 64 (640 crops a step), synthetic images on
  the device: fer_tune.fit eager and compiled (compile=on) at the device's precision (bf16 on a GPU that has it),
  against the reference loop (usef-kh/fer's per-image PIL transforms in a single-process DataLoader, fp32) on the
  same device; MFU from the counted FLOPs per crop (torch.utils.flop_counter) and the GPU's dense bf16 peak;
- epoch: one full real-data epoch (TenCrop train + TenCrop validation) with the faster of eager and compiled, its
  wall time and the 300-epoch projection;
- study: a 4-trial study with --gpus-per-trial 0.25 (2 epochs each, real data, through `fer-tune sweep`): per-trial
  crops/s and peak GPU memory, the study's wall time;
- accuracy: a 20-epoch real-data run at width 1 (one-crop training, TenCrop test) through `fer-tune train`, its
  PublicTest top-1.
--smoke: width 1/16, a few steps, 2 one-epoch trials, one epoch of accuracy, on 600 synthetic faces (FER2013 is not
read: decoding its 35,887 JPEGs would take longer than the rest); the figures mean nothing, every code path runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
# dense bf16 tensor-core peaks (vendor datasheets), TFLOP/s, for MFU; other GPUs get no MFU
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0}
FULL = {
    "width": 1.0,
    "steps": 40,
    "ref_steps": 8,
    "trials": 4,
    "trial_epochs": 2,
    "gpu_per_trial": 0.25,
    "acc_epochs": 20,
    "images": None,
}
SMOKE = {
    "width": 0.0625,
    "steps": 3,
    "ref_steps": 2,
    "trials": 2,
    "trial_epochs": 1,
    "gpu_per_trial": 0.25,
    "acc_epochs": 1,
    "images": 600,
}


def say(text: str) -> None:
    print(text, flush=True)


def device() -> torch.device:
    from fer_tune.device import select_device

    return select_device()


class Arrays:
    def __init__(self, splits: dict):
        self.splits = splits

    def arrays(self, split):
        return self.splits[split]


def part_env(dev: torch.device) -> dict:
    out = {"device": dev.type, "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        out.update(
            gpu=p.name,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            gpus=torch.cuda.device_count(),
        )
    say("env: " + ", ".join(f"{k} {v}" for k, v in out.items()))
    return out


def flops_per_crop(width: float, dev: torch.device) -> float:
    """Forward + backward FLOPs of one 40x40 crop through vgg_variant at `width` (counted, not estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fer_tune.models import create_model

    model = create_model("vgg_variant", width=width, dropout=0.2).to(dev)
    x = torch.rand(8, 1, 40, 40, device=dev)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 8


def peak_flops(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    hits = [v for k, v in PEAK_BF16_TFLOPS.items() if k in name]
    return max(hits) * 1e12 if hits else None


def fit_rate(cfg, images: np.ndarray, labels: np.ndarray, dev: torch.device) -> tuple[float, object]:
    """Train images/s of fit's second epoch (the first warms up: allocator, cuDNN's autotuner, the compile)."""
    from fer_tune.train import fit

    data = Arrays({"train": (images, labels), "val": (images[:64], labels[:64])})
    r = fit(cfg.replace(epochs=2), data, device=dev)
    return r.history[-1]["images_per_s"], r


def reference_rate(images: np.ndarray, labels: np.ndarray, steps: int, dev: torch.device, width: float) -> float:
    """usef-kh/fer's loop (benchmarks/bench_train.py's rewrite) on `dev`: images/s after one warm-up step."""
    import torch.nn.functional as F
    from bench_train import ReferenceDataset, reference_train_transform
    from torch.utils.data import DataLoader

    from fer_tune.models import create_model

    torch.manual_seed(0)
    model = create_model("vgg_variant", width=width, dropout=0.2).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    loader = DataLoader(ReferenceDataset(images, labels, reference_train_transform("ten")), batch_size=64, shuffle=True)
    seen, t0 = 0, None
    model.train()
    for step, (x, y) in enumerate(loader):
        if step == 1:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if step > steps:
            break
        bs, nc = x.shape[:2]
        x, y = x.flatten(0, 1).to(dev), torch.repeat_interleave(y, nc).to(dev)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += bs if step >= 1 else 0
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def part_throughput(dev: torch.device, size: dict) -> dict:
    from fer_tune.config import TrainConfig

    width = size["width"]
    rng = np.random.default_rng(0)
    n = 64 * size["steps"]
    images, labels = rng.integers(0, 256, (n, 48, 48), dtype=np.uint8), rng.integers(0, 7, n)
    cfg = TrainConfig(width=width, train_crops="ten", test_crops="center", batch_size=64, amp="auto")
    eager, r = fit_rate(cfg, images, labels, dev)
    compiled, _ = fit_rate(cfg.replace(compile="on"), images, labels, dev)
    ref = reference_rate(images, labels, size["ref_steps"], dev, width)
    per_crop = flops_per_crop(width, dev)
    peak = peak_flops(dev)
    out = {
        "width": width,
        "precision": r.precision,
        "images_per_s": {"eager": eager, "compiled": compiled, "reference_fp32": ref},
        "crops_per_s": {"eager": 10 * eager, "compiled": 10 * compiled, "reference_fp32": 10 * ref},
        "compiled_over_eager": compiled / eager,
        "eager_over_reference": eager / ref,
        "gflop_per_crop_fwd_bwd": per_crop / 1e9,
        "mfu": {k: 10 * v * per_crop / peak for k, v in (("eager", eager), ("compiled", compiled))} if peak else None,
    }
    say(
        f"throughput (width {width:g}, TenCrop, batch 64, {r.precision}): eager {10 * eager:,.0f} crops/s, "
        f"compiled {10 * compiled:,.0f} ({compiled / eager:.2f}x), reference loop (fp32) {10 * ref:,.0f} "
        f"({eager / ref:.1f}x slower than eager); {per_crop / 1e9:.2f} GFLOP per crop"
        + (f"; MFU eager {out['mfu']['eager']:.1%}, compiled {out['mfu']['compiled']:.1%}" if peak else "")
    )
    return out


def load_real(data: str | None, size: dict) -> dict:
    from fer_tune import data as fdata

    if size is SMOKE:
        d = fdata.load(f"synthetic:{size['images']}", "paper")
    elif data and Path(data).is_dir():
        d = fdata.load(data, "paper")
    else:
        raise SystemExit(f"gpu.sh: FER2013 not found at {data} (--data PATH/TO/fer2013)")
    if size["images"] is None:
        return {s: d.arrays(s) for s in ("train", "val", "test")}
    n = size["images"]
    return {s: tuple(a[: n if s == "train" else n // 4] for a in d.arrays(s)) for s in ("train", "val", "test")}


def real_or_synthetic(data: str | None, size: dict) -> str:
    """The data of the study and accuracy parts: FER2013, or in a smoke run synthetic faces (a full FER2013 epoch
    per trial is minutes on a CPU)."""
    if size is SMOKE:
        return f"synthetic:{size['images']}"
    if not (data and Path(data).is_dir()):
        raise SystemExit(f"gpu.sh: FER2013 not found at {data} (--data PATH/TO/fer2013)")
    return data


def part_epoch(dev: torch.device, size: dict, splits: dict, compile_setting: str) -> dict:
    from fer_tune.config import TrainConfig
    from fer_tune.train import fit

    cfg = TrainConfig(width=size["width"], epochs=2, train_crops="ten", test_crops="ten", compile=compile_setting)
    t0 = time.perf_counter()
    r = fit(cfg, Arrays(splits), device=dev)
    wall = time.perf_counter() - t0
    first, second = (h["epoch_seconds"] for h in r.history)
    out = {
        "compile": compile_setting,
        "train_images": len(splits["train"][1]),
        "epoch_seconds": second,
        "first_epoch_seconds": first,
        "wall_two_epochs": wall,
        "projected_300_epochs_minutes": (first + 299 * second) / 60,
        "val_acc_after_2": r.history[-1]["val_acc"],
    }
    say(
        f"epoch (TenCrop train + TenCrop val, {out['train_images']:,} images, compile {compile_setting}): "
        f"{second:.1f} s (first {first:.1f} s); 300 epochs ~ {out['projected_300_epochs_minutes']:.1f} min"
    )
    return out


def run_cli(part: str, cmd: list[str]) -> tuple[float, dict | None]:
    """Run a fer-tune command; (wall seconds, None) or (wall, the part's failure record, said on stdout)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode == 0:
        return wall, None
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    say(f"{part}: failed (exit {r.returncode}): {last}")
    return wall, {"status": "failed", "exit": r.returncode, "stderr": r.stderr[-2000:]}


def part_study(dev: torch.device, size: dict, data: str | None, work: Path) -> dict:
    import yaml

    gpu = size["gpu_per_trial"] if dev.type == "cuda" else 0
    space = {
        "name": "gpu_study",
        "metric": "val_acc",
        "mode": "max",
        "sampler": "random",
        "seed": 0,
        "num_samples": size["trials"],
        "max_epochs": size["trial_epochs"],
        "resources": {"cpu": 1, "gpu": gpu},
        "data": {"path": real_or_synthetic(data, size), "protocol": "paper"},
        "fixed": {"width": size["width"], "train_crops": "ten", "test_crops": "ten", "batch_size": 64},
        "space": {"lr": {"type": "float", "low": 0.005, "high": 0.02, "log": True}},
    }
    (work / "gpu_study.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    cpus = max(size["trials"], 2)
    cmd = [
        sys.executable,
        "-m",
        "fer_tune.cli",
        "sweep",
        str(work / "gpu_study.yaml"),
        "--results",
        str(work),
        "--quiet",
        "--num-cpus",
        str(cpus),
    ]
    wall, failed = run_cli("study", cmd)
    if failed:
        return failed
    trials = []
    for f in sorted((work / "gpu_study" / "tune").glob("*/result.json")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            trials.append(
                {
                    "crops_per_s": 10 * max(x.get("images_per_s", 0) for x in rows),
                    "gpu_mem_mb": max(x.get("gpu_mem_mb", 0) for x in rows) or None,
                    "epochs": len(rows),
                    "val_acc": rows[-1].get("val_acc"),
                }
            )
    out = {"status": "complete", "gpus_per_trial": gpu, "wall_seconds": wall, "trials": trials}
    say(
        f"study ({len(trials)} trials x {size['trial_epochs']} epochs, {gpu:g} GPU each): {wall:.0f} s; per trial "
        + "; ".join(
            f"{t['crops_per_s']:,.0f} crops/s" + (f", {t['gpu_mem_mb']:.0f} MB" if t["gpu_mem_mb"] else "")
            for t in trials
        )
    )
    return out


def part_accuracy(dev: torch.device, size: dict, data: str | None, work: Path) -> dict:
    src = real_or_synthetic(data, size)
    out_dir = work / "accuracy"
    sets = [f"width={size['width']}", f"epochs={size['acc_epochs']}", "train_crops=one", "test_crops=ten"]
    cmd = [sys.executable, "-m", "fer_tune.cli", "train", "--data", src, "--out", str(out_dir), "--set", *sets]
    wall, failed = run_cli("accuracy", cmd)
    if failed:
        return failed
    m = json.loads((out_dir / "metrics.json").read_text())
    test = m["test"]
    split = "test (synthetic faces)" if src.startswith("synthetic:") else "PublicTest"
    out = {
        "epochs": size["acc_epochs"],
        "width": size["width"],
        "split": split,
        "test_top1": test["top1"],
        "best_val_acc": m["best"]["val_acc"],
        "wall_seconds": wall,
        "precision": m.get("precision"),
        "data": src,
    }
    say(
        f"accuracy ({size['acc_epochs']} epochs, width {size['width']:g}): {split} top-1 {test['top1']:.2f} % "
        f"(best val {m['best']['val_acc']:.2f} %), {wall:.0f} s"
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get("FER2013_DIR") or str(ROOT.parent / "shared/datasets/fer2013"))
    ap.add_argument("--out", default=None, help="where gpu.json and the runs go, a new folder (default: a temp dir)")
    ap.add_argument("--parts", default="env,throughput,epoch,study,accuracy")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: every code path, on a CPU too")
    args = ap.parse_args()
    size = SMOKE if args.smoke else FULL
    parts = args.parts.split(",")
    dev = device()
    work = Path(args.out or tempfile.mkdtemp(prefix="fer-tune-gpu-"))
    earlier = [n for n in ("gpu.json", "gpu_study", "accuracy") if (work / n).exists()]
    if earlier:  # its study and training run would refuse to start over there, and its figures are not this run's
        print(f"gpu.sh: {work} holds an earlier run ({', '.join(earlier)}): pass an empty --out", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary: dict = {"smoke": args.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    summary["env"] = part_env(dev)
    splits = None
    if "throughput" in parts:
        summary["throughput"] = part_throughput(dev, size)
    if "epoch" in parts:
        splits = load_real(args.data, size)
        faster = summary.get("throughput", {}).get("compiled_over_eager", 0) > 1.0
        summary["epoch"] = part_epoch(dev, size, splits, "on" if faster else "off")
    if "study" in parts:
        summary["study"] = part_study(dev, size, args.data, work)
    if "accuracy" in parts:
        summary["accuracy"] = part_accuracy(dev, size, args.data, work)
    summary["wall_seconds"] = time.perf_counter() - t0
    (work / "gpu.json").write_text(json.dumps(summary, indent=2))
    say(f"done in {summary['wall_seconds']:.0f} s; {work / 'gpu.json'}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
