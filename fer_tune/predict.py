"""Classify face images of any size with a trained model: grayscale, 48x48, the test crops of the model's recorded
score (TenCrop(40) for a final stage's model), logits averaged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import EMOTIONS, FerTuneError


def model_file(path: str | Path) -> Path:
    """A model.pt, a fer-tune checkpoint, or a directory holding model.pt (a final stage's output)."""
    p = Path(path)
    if p.is_dir():
        for name in ("model.pt", "best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise FerTuneError(f"{p} holds no model.pt (give a final stage directory, a model.pt or a checkpoint)")
    return p


def read_faces(paths: list[str]) -> np.ndarray:
    """uint8 (N, 48, 48); every unreadable file is named in one error before anything runs."""
    from PIL import Image, UnidentifiedImageError

    faces, bad = [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                faces.append(np.asarray(im.convert("L").resize((48, 48), Image.BILINEAR), dtype=np.uint8))
        except FileNotFoundError:
            bad.append(f"{p}: no such file")
        except IsADirectoryError:
            bad.append(f"{p}: is a directory")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            bad.append(f"{p}: not a readable image ({exc.__class__.__name__})")
    if bad:
        raise FerTuneError(f"{len(bad)} of {len(paths)} image(s) cannot be read: " + "; ".join(bad))
    return np.stack(faces)


USAGE = "fer-tune predict MODEL IMAGE..."


def load_model(path: str | Path) -> dict:
    """The fer-tune model (or checkpoint) at `path`; an image or a CSV given in its place is named as such."""
    from .train import load_checkpoint

    return load_checkpoint(model_file(path), USAGE)


def predict(state: dict, paths: list[str], device: Any = None) -> list[dict]:
    """Classify the images at `paths` with the model `state` (load_model's)."""
    import torch

    from .train import model_from_checkpoint, predict_logits, select_device, trained_on

    device = device or select_device()
    faces = read_faces(paths)
    model, _ = model_from_checkpoint(state, device)
    crops = trained_on(state).get("test_crops", "ten")  # those of the model's recorded test score
    logits = predict_logits(model, torch.from_numpy(faces).to(device), crops=crops)
    probs = torch.softmax(logits, 1).cpu().numpy()
    out = []
    for p, pr in zip(paths, probs):
        order = np.argsort(-pr)
        out.append(
            {
                "image": str(p),
                "emotion": EMOTIONS[order[0]],
                "top2": [EMOTIONS[i] for i in order[:2]],
                "probabilities": {e: round(float(pr[i]), 6) for i, e in enumerate(EMOTIONS)},
            }
        )
    return out
