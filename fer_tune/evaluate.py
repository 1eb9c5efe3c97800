"""Evaluation: top-1/top-2, loss, confusion matrix (rows = true class), per-class P/R/F1, macro F1, saliency.

``evaluate_model`` is what fills ``test`` in metrics.json and what ``fer-tune evaluate`` prints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import augment
from .common import EMOTIONS, NUM_CLASSES
from .device import precision
from .train import crop_logits, predict_logits


def metrics_from_logits(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> dict:
    logits = torch.as_tensor(logits, dtype=torch.float32).cpu()
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    n = len(labels)
    top2 = logits.topk(min(2, logits.shape[1]), dim=1).indices
    pred = top2[:, 0]
    conf = torch.bincount(labels * NUM_CLASSES + pred, minlength=NUM_CLASSES**2).view(NUM_CLASSES, NUM_CLASSES)
    conf = conf.numpy().astype(np.int64)
    tp = np.diag(conf).astype(float)
    pred_tot, true_tot = conf.sum(0).astype(float), conf.sum(1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(pred_tot > 0, tp / pred_tot, 0.0)
        rec = np.where(true_tot > 0, tp / true_tot, 0.0)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    present = true_tot > 0
    return {
        "n": n,
        "top1": 100.0 * float((pred == labels).float().mean()) if n else 0.0,
        "top2": 100.0 * float((top2 == labels[:, None]).any(1).float().mean()) if n else 0.0,
        "loss": float(F.cross_entropy(logits, labels)) if n else 0.0,
        "confusion": conf.tolist(),
        "per_class": {
            e: {
                "precision": 100 * float(prec[i]),
                "recall": 100 * float(rec[i]),
                "f1": 100 * float(f1[i]),
                "support": int(true_tot[i]),
            }
            for i, e in enumerate(EMOTIONS)
        },
        "macro_f1": 100.0 * float(f1[present].mean()) if present.any() else 0.0,
    }


def evaluate_model(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    device: torch.device,
    crops: str = "ten",
    batch_size: int = 0,
    amp: str = "auto",
    save_logits: Path | None = None,
) -> dict:
    """The model's metrics on (images, labels) with the test crops `crops`; with `save_logits`, each crop's logits
    (float32 (N, crops, 7), what the metrics average over the crops) saved there (.npy)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    dtype, _ = precision(device, amp)
    per_crop = crop_logits(model, x, crops=crops, batch_size=batch_size, dtype=dtype)
    if save_logits is not None:
        np.save(save_logits, per_crop.cpu().numpy())
    out = metrics_from_logits(per_crop.mean(1), labels)
    out["crops"] = crops
    return out


def saliency(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, *, device: torch.device) -> np.ndarray:
    """|d loss / d pixel| on the center 40x40 crop (max-normalised per image), float32 (N, 40, 40)."""
    model.eval()
    x = augment.eval_batch(torch.from_numpy(np.ascontiguousarray(images)).to(device), "center").requires_grad_(True)
    loss = F.cross_entropy(model(x), torch.as_tensor(labels, device=device, dtype=torch.long), reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    sal = grad.abs()[:, 0]
    sal = sal / sal.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    return sal.detach().cpu().numpy().astype(np.float32)


def saliency_sample(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    out_dir: str | Path,
    *,
    device: torch.device,
    per_class: int = 4,
    seed: int = 0,
) -> dict:
    """Saliency for ``per_class`` images of each class: writes saliency.png (grid) and saliency.npz."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    idx = np.concatenate(
        [
            rng.choice(np.flatnonzero(labels == c), size=min(per_class, int((labels == c).sum())), replace=False)
            for c in range(NUM_CLASSES)
            if (labels == c).any()
        ]
    ).astype(np.int64)
    with torch.enable_grad():
        sal = saliency(model, images[idx], labels[idx], device=device)
    with torch.no_grad():
        logits = predict_logits(model, torch.from_numpy(np.ascontiguousarray(images[idx])).to(device), crops="ten")
    preds = logits.argmax(1).cpu().numpy()
    crops = images[idx][:, 4:44, 4:44]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "saliency.npz", images=crops, saliency=sal, labels=labels[idx], preds=preds)
    # grid: per sample a pair (face | heat map overlaid), 4 pairs per row, scaled x3
    tiles = []
    for face, s in zip(crops, sal):
        gray = np.repeat(face[..., None], 3, axis=2).astype(np.float32)
        heat = np.stack([s * 255, np.zeros_like(s), (1 - s) * 64], axis=2)
        over = (0.5 * gray + 0.5 * heat).clip(0, 255)
        tiles.append(np.concatenate([gray, over], axis=1))
    cols = 4
    rows = (len(tiles) + cols - 1) // cols
    h, w = 40, 80
    sheet = np.zeros((rows * (h + 2), cols * (w + 2), 3), np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        sheet[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = t.astype(np.uint8)
    Image.fromarray(sheet).resize((sheet.shape[1] * 3, sheet.shape[0] * 3), Image.NEAREST).save(
        out_dir / "saliency.png"
    )
    return {"png": str(out_dir / "saliency.png"), "npz": str(out_dir / "saliency.npz"), "n": int(len(idx))}


def format_report(m: dict) -> str:
    lines = [
        f"n={m['n']:,}  top-1 {m['top1']:.2f} %  top-2 {m['top2']:.2f} %  loss {m['loss']:.4f}  "
        f"macro-F1 {m['macro_f1']:.2f} %  ({m.get('crops', 'ten')} crops)",
        "",
        f"{'class':<9}{'prec':>7}{'recall':>8}{'f1':>7}{'n':>7}",
    ]
    for e, pc in m["per_class"].items():
        lines.append(f"{e:<9}{pc['precision']:>7.1f}{pc['recall']:>8.1f}{pc['f1']:>7.1f}{pc['support']:>7,}")
    lines += ["", "confusion (rows = true, cols = predicted):", " " * 9 + "".join(f"{e[:5]:>7}" for e in EMOTIONS)]
    for e, row in zip(EMOTIONS, m["confusion"]):
        lines.append(f"{e:<9}" + "".join(f"{v:>7,}" for v in row))
    return "\n".join(lines)
