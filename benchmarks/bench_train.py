"""Training: fer_tune.train.fit vs a reference loop built the paper's way (usef-kh/fer: per-image PIL
torchvision transforms in a DataLoader with the default num_workers=0, the same model, SGD-Nesterov, RLRP).

    python benchmarks/bench_train.py throughput [--steps 3] [--threads 2]
        full-width vgg_variant, batches of 64 images with TenCrop (640 crops), synthetic images:
        train images/s of both loops (data pipeline included), side by side in this process.
    python benchmarks/bench_train.py realdata [--data ../shared/datasets/fer2013] [--epochs 8] [--width 0.25]
            [--arms reference,fp32,bf16] [--seeds 0,1]
        the real FER2013, paper protocol, train_crops one, test_crops ten: every arm trains the same epochs;
        prints wall time and PublicTest top-1 (final model and best-val model) of each, and the bf16 / fp32
        ratios per seed (fer_tune fit with amp=off vs amp=bf16).

Both loops use the same model class and initial weights (same seed), the same optimizer and scheduler.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fer_tune import data as fdata
from fer_tune.config import TrainConfig
from fer_tune.device import cpu_has_native_bf16, precision
from fer_tune.evaluate import metrics_from_logits
from fer_tune.models import create_model
from fer_tune.optim import Scheduler, create_optimizer
from fer_tune.train import fit, predict_logits

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# the reference: usef-kh/fer data/fer2013.py + utils/loops.py, rewritten (one-crop variant for train_crops one)
# ---------------------------------------------------------------------------------------------------------
def reference_train_transform(crops: str) -> T.Compose:
    to_tensors = T.Lambda(lambda cs: torch.stack([T.Normalize((0,), (255,))(T.ToTensor()(c)) for c in cs]))
    erase = T.Lambda(lambda ts: torch.stack([T.RandomErasing(p=0.5)(t) for t in ts]))
    cropper = T.TenCrop(40) if crops == "ten" else T.Lambda(lambda im: [T.RandomCrop(40)(im)])
    return T.Compose(
        [
            T.RandomResizedCrop(48, scale=(0.8, 1.2)),
            T.RandomApply([T.RandomAffine(0, translate=(0.2, 0.2))], p=0.5),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.RandomRotation(10)], p=0.5),
            cropper,
            to_tensors,
            erase,
        ]
    )


def reference_test_transform() -> T.Compose:
    return T.Compose(
        [
            T.TenCrop(40),
            T.Lambda(lambda cs: torch.stack([T.Normalize((0,), (255,))(T.ToTensor()(c)) for c in cs])),
        ]
    )


class ReferenceDataset(Dataset):
    """usef-kh/fer CustomDataset: a float64 array turned into a PIL image per item, then the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images.astype(np.float64), labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def reference_evaluate(model, images, labels) -> dict:
    model.eval()
    loader = DataLoader(ReferenceDataset(images, labels, reference_test_transform()), batch_size=64)
    logits = []
    with torch.no_grad():
        for x, _ in loader:
            bs, nc = x.shape[:2]
            logits.append(model(x.flatten(0, 1)).view(bs, nc, -1).mean(1))
    return metrics_from_logits(torch.cat(logits), labels)


def reference_epoch(model, loader, optimizer, scheduler, max_steps: int | None = None) -> tuple[int, float]:
    model.train()
    seen, t0 = 0, time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        bs, nc = x.shape[:2]
        x, y = x.flatten(0, 1), torch.repeat_interleave(y, nc)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.after_batch()
        seen += bs
    return seen, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
class Subset:
    def __init__(self, splits: dict):
        self.splits = splits

    def arrays(self, split):
        return self.splits[split]


def throughput(args) -> None:
    torch.set_num_threads(args.threads)
    n = 64 * args.steps
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 48, 48), dtype=np.uint8)
    labels = rng.integers(0, 7, n)
    cfg = TrainConfig(epochs=1, train_crops="ten", test_crops="center", batch_size=64, seed=0, amp="off")
    print(
        f"torch {torch.__version__}, {args.threads} CPU threads; vgg_variant width 1 (29,890,759 params), "
        f"{args.steps} steps of 64 images x TenCrop = 640 crops, SGD-Nesterov"
    )

    # warm-up both (allocator, kernels)
    warm = Subset({"train": (images[:64], labels[:64]), "val": (images[:2], labels[:2])})
    fit(cfg, warm, device=torch.device("cpu"))
    res = fit(cfg, Subset({"train": (images, labels), "val": (images[:2], labels[:2])}), device=torch.device("cpu"))
    ours = res.history[0]["images_per_s"]
    bf16 = fit(
        cfg.replace(amp="bf16"),
        Subset({"train": (images, labels), "val": (images[:2], labels[:2])}),
        device=torch.device("cpu"),
    ).history[0]["images_per_s"]

    loader = DataLoader(ReferenceDataset(images, labels, reference_train_transform("ten")), batch_size=64, shuffle=True)
    # like fit above: one warm-up step on a throw-away model, then a fresh model, optimizer and scheduler
    for max_steps in (1, None):
        torch.manual_seed(0)
        model = create_model("vgg_variant", width=1.0, dropout=0.2)
        opt = create_optimizer(cfg, model.parameters())
        sched = Scheduler(cfg, opt, args.steps)
        seen, dt = reference_epoch(model, loader, opt, sched, max_steps=max_steps)
    ref = seen / dt
    print(f"reference (per-image PIL transforms in a DataLoader): {ref:7.1f} images/s ({10 * ref:7.1f} crops/s)")
    print(f"fer_tune fit (batched on-device augmentation):        {ours:7.1f} images/s ({10 * ours:7.1f} crops/s)")
    print(f"ratio: {ours / ref:.2f}x (both fp32)")
    print(
        f"fer_tune fit with amp=bf16:                           {bf16:7.1f} images/s ({10 * bf16:7.1f} crops/s), "
        f"{bf16 / ours:.2f}x its fp32"
    )


def _fer_tune_arm(d, args, amp: str, seed: int) -> dict:
    """fit() with `amp` and `seed`; wall time (train + val + test) and PublicTest top-1 of the final and best-val
    models."""
    xte, yte = d.arrays("test")
    cfg = TrainConfig(
        width=args.width, epochs=args.epochs, train_crops="one", test_crops="ten", seed=seed, batch_size=64, amp=amp
    )
    label = f"fer_tune {'fp32' if amp == 'off' else amp} seed {seed}"
    t0 = time.perf_counter()
    best_state: dict = {}

    def on_epoch(m, take):
        if m.get("is_best"):
            best_state["model"] = take()["model"]
        print(
            f"  {label} epoch {m['epoch']}: train_acc {m['train_acc']:.2f} val_acc {m['val_acc']:.2f} "
            f"({m['epoch_seconds']:.0f} s)",
            flush=True,
        )

    res = fit(cfg, d, device=torch.device("cpu"), on_epoch=on_epoch)
    dtype = precision(torch.device("cpu"), amp)[0]
    model = create_model("vgg_variant", width=args.width, dropout=cfg.dropout)
    model.load_state_dict(res.checkpoint["model"])
    x_test = torch.from_numpy(xte)
    final = metrics_from_logits(predict_logits(model, x_test, crops="ten", dtype=dtype), yte)["top1"]
    wall = time.perf_counter() - t0
    model.load_state_dict(best_state["model"])
    best_test = metrics_from_logits(predict_logits(model, x_test, crops="ten", dtype=dtype), yte)["top1"]
    return {
        "label": label,
        "precision": res.precision,
        "wall": wall,
        "final": final,
        "best_test": best_test,
        "best_val": res.best["val_acc"],
        "best_epoch": res.best["epoch"],
        "epoch_s": [h["epoch_seconds"] for h in res.history],
    }


def _reference_arm(d, args) -> dict:
    (xtr, ytr), (xva, yva), (xte, yte) = (d.arrays(s) for s in ("train", "val", "test"))
    cfg = TrainConfig(width=args.width, epochs=args.epochs, seed=0, batch_size=64)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = create_model("vgg_variant", width=args.width, dropout=cfg.dropout)
    opt = create_optimizer(cfg, model.parameters())
    sched = Scheduler(cfg, opt, (len(ytr) + 63) // 64)
    loader = DataLoader(ReferenceDataset(xtr, ytr, reference_train_transform("one")), batch_size=64, shuffle=True)
    best_val, best_state, best_epoch, epoch_s = -1.0, None, 0, []
    for epoch in range(1, args.epochs + 1):
        te = time.perf_counter()
        reference_epoch(model, loader, opt, sched)
        val = reference_evaluate(model, xva, yva)["top1"]
        sched.after_epoch(val)
        if val > best_val:
            best_val, best_state, best_epoch = val, copy.deepcopy(model.state_dict()), epoch
        epoch_s.append(time.perf_counter() - te)
        print(f"  reference epoch {epoch}: val_acc {val:.2f} ({epoch_s[-1]:.0f} s)", flush=True)
    final = reference_evaluate(model, xte, yte)["top1"]
    wall = time.perf_counter() - t0
    model.load_state_dict(best_state)
    return {
        "label": "reference per-image PIL",
        "precision": "fp32",
        "wall": wall,
        "final": final,
        "best_test": reference_evaluate(model, xte, yte)["top1"],
        "best_val": best_val,
        "best_epoch": best_epoch,
        "epoch_s": epoch_s,
    }


def realdata(args) -> None:
    torch.set_num_threads(args.threads)
    d = fdata.load(str(args.data), "paper")
    sizes = [len(d.arrays(s)[1]) for s in ("train", "val", "test")]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = sorted(set(arms) - {"reference", "fp32", "bf16"})
    if bad:
        raise SystemExit(f"--arms: unknown arm(s) {', '.join(bad)} (reference, fp32, bf16)")
    seeds = [int(s) for s in args.seeds.split(",")]
    print(
        f"FER2013 paper protocol: train {sizes[0]:,} / val (PrivateTest) {sizes[1]:,} / test (PublicTest) "
        f"{sizes[2]:,}; vgg_variant width {args.width}, train_crops one, test_crops ten, {args.epochs} epochs, "
        f"SGD-Nesterov lr 0.01, RLRP; torch {torch.__version__}, {args.threads} CPU threads; "
        f"native bf16 on this CPU: {cpu_has_native_bf16()}; arms {', '.join(arms)}; seeds {seeds}"
    )
    runs = []
    if "reference" in arms:
        runs.append(_reference_arm(d, args))
    for seed in seeds:  # fp32 and bf16 interleaved, so that a drift in the machine's load hits both alike
        for amp in ("fp32", "bf16"):
            if amp in arms:
                runs.append(_fer_tune_arm(d, args, "off" if amp == "fp32" else "bf16", seed))

    print()
    print(
        f"{'':28}{'wall (train+val+test)':>24}{'median epoch':>14}{'PublicTest top-1 (final)':>27}"
        f"{'best-val model':>16}{'best val (epoch)':>20}"
    )
    for r in runs:
        print(
            f"{r['label']:28}{r['wall']:22.0f} s{statistics.median(r['epoch_s']):12.1f} s{r['final']:26.2f} %"
            f"{r['best_test']:14.2f} %{r['best_val']:14.2f} % ({r['best_epoch']})"
        )
    by = {p: [r for r in runs if r["label"].startswith("fer_tune") and r["precision"] == p] for p in ("fp32", "bf16")}
    ref = next((r for r in runs if r["label"].startswith("reference")), None)
    for p, rs in by.items():
        if not rs:
            continue
        finals = [r["final"] for r in rs]
        spread = f" (spread over seeds {max(finals) - min(finals):.2f} points)" if len(rs) > 1 else ""
        line = (
            f"fer_tune {p}: mean wall {statistics.fmean(r['wall'] for r in rs):.0f} s, PublicTest final "
            f"{statistics.fmean(finals):.2f} %{spread}"
        )
        if ref is not None:
            line += f"; speed-up vs reference {ref['wall'] / statistics.fmean(r['wall'] for r in rs):.2f}x"
        print(line)
    if by["fp32"] and by["bf16"]:
        pairs = [(a, b) for a in by["fp32"] for b in by["bf16"] if a["label"].split()[-1] == b["label"].split()[-1]]
        for a, b in pairs:
            print(
                f"seed {a['label'].split()[-1]}: bf16 / fp32 wall {a['wall'] / b['wall']:.2f}x faster, "
                f"PublicTest final {b['final'] - a['final']:+.2f} points, best-val model "
                f"{b['best_test'] - a['best_test']:+.2f} points"
            )
        fw = statistics.fmean(r["wall"] for r in by["fp32"]) / statistics.fmean(r["wall"] for r in by["bf16"])
        fa = statistics.fmean(r["final"] for r in by["bf16"]) - statistics.fmean(r["final"] for r in by["fp32"])
        print(f"bf16 vs fp32 over seeds {seeds}: {fw:.2f}x faster, PublicTest final {fa:+.2f} points")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("realdata")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "fer2013")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--arms",
        default="reference,fp32,bf16",
        help="comma-separated: reference (per-image PIL loop, fp32), fp32 (fit, amp=off), bf16 (fit)",
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the fp32 and bf16 arms, e.g. 0,1")
    args = ap.parse_args()
    throughput(args) if args.mode == "throughput" else realdata(args)


if __name__ == "__main__":
    main()
