"""torch.compile against eager for fer-tune's training, on this machine's device (CPU here, CUDA where present).

python benchmarks/bench_compile.py step [--widths 0.125,0.25,1] [--precisions fp32,bf16] [--seconds 8]
        [--threads 2]
    one train step of vgg_variant (SGD-Nesterov, channels_last; batches of 64 images x TenCrop = 640 crops, at
    width 1 16 images = 160 crops as in the bf16 table): steady crops/s and the first two steps' seconds (the
    compile) for eager, the model compiled (model.compile(), what compile=on does) and the model plus the
    optimizer step compiled (the whole step); the variants of one width and precision run back to back.
python benchmarks/bench_compile.py fit [--width 0.25] [--epochs 3] [--images 4000] [--precision bf16]
    fer_tune.train.fit on synthetic faces (one-crop training, center-crop validation), compile=off against
    compile=on in one process: every epoch's seconds (compile and recompiles included) and the total.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def step_rate(width: float, dtype, variant: str, seconds: float, dev: torch.device) -> dict:
    from fer_tune.models import create_model

    torch.manual_seed(0)
    images = 16 if width >= 1 else 64
    crops = images * 10
    model = create_model("vgg_variant", width=width, dropout=0.2).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    opt_step = opt.step
    if variant != "eager":
        model.compile()
    if variant == "whole step":
        opt_step = torch.compile(opt.step)
    x = torch.rand(crops, 1, 40, 40, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (crops,), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt_step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    step()
    sync()
    first = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        step()
        n += 1
    sync()
    return {"crops_per_s": n * crops / (time.perf_counter() - t0), "first_two_steps_s": first, "crops": crops}


def cmd_step(args) -> None:
    """Each width x precision x variant in a fresh process (compiled code never leaks from one into the next)."""
    import subprocess
    import sys

    dev = device()
    print(f"{dev.type}, {args.threads} threads, torch {torch.__version__}; crops/s (first two steps' seconds)")
    print(
        f"{'width':>6} {'prec':>5} {'crops':>6} {'eager':>14} {'compiled':>14} {'whole step':>14} {'compiled/eager':>15}"
    )
    rows = []
    for width in args.widths.split(","):
        for prec in args.precisions.split(","):
            r = {}
            for variant in ("eager", "compiled", "whole step"):
                cmd = [
                    sys.executable,
                    __file__,
                    "cell",
                    "--width",
                    width,
                    "--precision",
                    prec,
                    "--variant",
                    variant,
                    "--seconds",
                    str(args.seconds),
                    "--threads",
                    str(args.threads),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                r[variant] = json.loads(out.strip().splitlines()[-1])
            rows.append({"width": float(width), "precision": prec, **r})
            cell = {v: f"{r[v]['crops_per_s']:.0f} ({r[v]['first_two_steps_s']:.1f}s)" for v in r}
            print(
                f"{float(width):>6g} {prec:>5} {r['eager']['crops']:>6} {cell['eager']:>14} {cell['compiled']:>14} "
                f"{cell['whole step']:>14} {r['compiled']['crops_per_s'] / r['eager']['crops_per_s']:>14.2f}x",
                flush=True,
            )
    print(json.dumps({"device": dev.type, "threads": args.threads, "rows": rows}))


def cmd_cell(args) -> None:
    torch.set_num_threads(args.threads)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.precision]
    print(json.dumps(step_rate(args.width, dtype, args.variant, args.seconds, device())))


def cmd_fit(args) -> None:
    from fer_tune import data as fdata
    from fer_tune.config import TrainConfig
    from fer_tune.train import fit

    dev = device()
    data = fdata.load(f"synthetic:{args.images}", "paper")
    base = {
        "width": args.width,
        "epochs": args.epochs,
        "train_crops": "one",
        "test_crops": "center",
        "threads": args.threads,
        "amp": {"bf16": "bf16", "fp32": "off"}[args.precision],
    }
    out = {}
    for setting in ("off", "on"):
        cfg = TrainConfig.from_dict({**base, "compile": setting})
        times: list[float] = []
        t0 = time.perf_counter()
        r = fit(cfg, data, device=dev, on_epoch=lambda m, s, t=times: t.append(m["epoch_seconds"]))
        out[setting] = {
            "total_s": time.perf_counter() - t0,
            "epochs_s": times,
            "compiled": r.compiled,
            "val_acc": r.history[-1]["val_acc"],
        }
        print(
            f"compile={setting}: total {out[setting]['total_s']:.1f} s; epochs "
            + ", ".join(f"{t:.1f}" for t in times)
            + f" s; val_acc {out[setting]['val_acc']:.2f} %",
            flush=True,
        )
    print(
        f"compile=on / off: total {out['off']['total_s'] / out['on']['total_s']:.2f}x faster, last epoch "
        f"{out['off']['epochs_s'][-1] / out['on']['epochs_s'][-1]:.2f}x faster"
    )
    print(json.dumps({"device": dev.type, "width": args.width, "images": args.images, "fit": out}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step")
    s.add_argument("--widths", default="0.125,0.25,1")
    s.add_argument("--precisions", default="fp32,bf16")
    s.add_argument("--seconds", type=float, default=8.0)
    s.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("cell", help="one step_rate measurement (what step runs in a fresh process)")
    c.add_argument("--width", type=float, required=True)
    c.add_argument("--precision", choices=("fp32", "bf16"), required=True)
    c.add_argument("--variant", choices=("eager", "compiled", "whole step"), required=True)
    c.add_argument("--seconds", type=float, default=8.0)
    c.add_argument("--threads", type=int, default=2)
    f = sub.add_parser("fit")
    f.add_argument("--width", type=float, default=0.25)
    f.add_argument("--epochs", type=int, default=3)
    f.add_argument("--images", type=int, default=4000)
    f.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    f.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    {"step": cmd_step, "cell": cmd_cell, "fit": cmd_fit}[args.cmd](args)


if __name__ == "__main__":
    main()
