"""Classify the faces in images with a trained model.

Each image is read as grayscale (turned upright by its EXIF orientation); its faces are found (by the best face
detector installed, or the one named) and framed as FER2013's (fer_tune.faces), each made 48x48 and classified with
the test crops of the model's recorded score (TenCrop(40) for a final stage's model), logits averaged. A fer-tune model file (model.pt, a training checkpoint)
runs with torch; a final stage's model.onnx runs with onnxruntime, and that path imports torch only for a
detector that runs on it (MTCNN; the cascade does not).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .common import EMOTIONS, FerTuneError, write_atomic
from .faces import MAX_PIXELS, Detector, Unreadable, pil_pixel_limit

USAGE = "fer-tune predict MODEL IMAGE..."
CHUNK = 32  # images whose faces are classified together
ANNOTATED_SIDE = 240  # the shorter side an annotated image has at least
ONNX_INPUT, ONNX_OUTPUT = "faces", "logits"  # model.onnx's tensors (fer_tune.export writes it)
ONNX_META_KEY = "fer_tune"  # the model's record in model.onnx's metadata_props (JSON)


def model_file(path: str | Path) -> Path:
    """A model.pt / model.onnx, a fer-tune checkpoint, or a directory holding one (a final stage's output)."""
    p = Path(path)
    if p.is_dir():
        for name in ("model.pt", "model.onnx", "best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise FerTuneError(f"{p} holds no model.pt (give a final stage directory, a model.pt or a checkpoint)")
    return p


class TorchModel:
    """A fer-tune model file or checkpoint, run with torch."""

    def __init__(self, state: dict, device: Any = None):
        from .device import select_device
        from .train import model_from_checkpoint, trained_on

        self.device = device or select_device()
        self.net, _ = model_from_checkpoint(state, self.device)
        self.trained_on = trained_on(state)
        self.crops = self.trained_on.get("test_crops", "ten")  # those of the model's recorded test score

    def probabilities(self, faces: np.ndarray) -> np.ndarray:
        import torch

        from .train import predict_logits

        logits = predict_logits(self.net, torch.from_numpy(faces).to(self.device), crops=self.crops)
        return torch.softmax(logits, 1).cpu().numpy()


class OnnxModel:
    """A final stage's model.onnx (fer_tune.export: the test crops are inside), run with onnxruntime."""

    def __init__(self, path: Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise FerTuneError(f"{path}: running an ONNX model needs onnxruntime (pip install onnxruntime)") from None
        if not path.is_file():
            raise FerTuneError(f"{path}: no such file (usage: {USAGE})")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise FerTuneError(f"{path} is not an ONNX model onnxruntime can load ({first})") from None
        meta = self.session.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY)
        if meta is None:
            raise FerTuneError(f"{path} is an ONNX model, but not one fer-tune exported (a final stage's model.onnx)")
        record = json.loads(meta)
        self.trained_on, self.crops = dict(record.get("data") or {}), record.get("test_crops", "ten")

    def probabilities(self, faces: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(faces), 256):
            x = faces[i : i + 256, None].astype(np.float32)
            logits = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0]
            e = np.exp(logits - logits.max(1, keepdims=True))
            out.append(e / e.sum(1, keepdims=True))
        return np.concatenate(out) if out else np.zeros((0, len(EMOTIONS)), np.float32)


def load_model(path: str | Path) -> TorchModel | OnnxModel:
    """The model at `path`; an image or a CSV given in its place is named as such."""
    file = model_file(path)
    if file.suffix.lower() == ".pt2":
        raise FerTuneError(
            f"{file} is a torch.export program of the network alone: give the model.pt or model.onnx beside it "
            f"(usage: {USAGE})"
        )
    if file.suffix.lower() == ".onnx":
        return OnnxModel(file)
    from .train import load_checkpoint

    return TorchModel(load_checkpoint(file, USAGE))


def predict(
    model: TorchModel | OnnxModel,
    paths: list[str],
    *,
    detect: bool = True,
    detector: str | Detector | None = None,
    max_pixels: int = MAX_PIXELS,
    on_image: Callable[[str, dict], None] | None = None,
    on_skip: Callable[[Unreadable], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Per image classified: {"image", "detector", "faces": [{"box": [x, y, w, h], "detected", "detector", "label",
    "probabilities"}]}: "detector" names the face detector that searched the image and found each face (None for an
    image taken whole); `detector` is the one to use, or names it (fer_tune.faces.DETECTORS; default: the best
    installed); `detect` False takes each image whole (images that are face crops). An image that cannot be read,
    has more than `max_pixels` pixels or is truncated is skipped: on_skip(why); none classified is an error naming
    them. on_image(path, result) after each image (annotation); progress(n) after each chunk of n images."""
    from .faces import load_detector, read_gray, whole

    finder = (detector if isinstance(detector, Detector) else load_detector(detector)) if detect else None
    name = finder.name if finder else None
    results, skipped = [], []
    for start in range(0, len(paths), CHUNK):
        chunk, found = paths[start : start + CHUNK], []  # found: (path, faces) of the images read
        for p in chunk:
            try:
                gray = read_gray(p, max_pixels)  # one full-resolution image held at a time
            except Unreadable as why:
                skipped.append(why)
                if on_skip is not None:
                    on_skip(why)
                continue
            found.append((p, finder.faces(gray) if finder else [whole(gray)]))
        flat = [f for _, faces in found for f in faces]
        probs = model.probabilities(np.stack([f.pixels for f in flat])) if flat else np.zeros((0, len(EMOTIONS)))
        k = 0
        for p, faces in found:
            rows = []
            for f in faces:
                pr = probs[k]
                k += 1
                rows.append(
                    {
                        "box": [int(v) for v in f.box],
                        "detected": f.detected,
                        "detector": name if f.detected else None,
                        "label": EMOTIONS[int(np.argmax(pr))],
                        "probabilities": {e: round(float(pr[i]), 6) for i, e in enumerate(EMOTIONS)},
                    }
                )
            results.append({"image": str(p), "detector": name, "faces": rows})
            if on_image is not None:
                on_image(p, results[-1])
        if progress is not None:
            progress(len(chunk))
    if skipped and not results:
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        named = "; ".join(str(why) for why in skipped[:5])
        raise FerTuneError(f"no image can be classified ({len(skipped)} skipped): {named}{more}")
    return results


def text_lines(results: Iterable[dict]) -> list[str]:
    """One line per face (and per image without one): what `fer-tune predict` prints."""
    lines = []
    for r in results:
        faces = r["faces"]
        if not faces:
            lines.append(f"{r['image']}: no face found by {r['detector']}")
        for i, f in enumerate(faces):
            top = sorted(f["probabilities"].items(), key=lambda kv: -kv[1])[:3]
            where = ""
            if f["detected"]:
                x, y, w, h = f["box"]
                n = f" {i + 1} of {len(faces)}" if len(faces) > 1 else ""
                where = f" face{n} at x={x} y={y} {w}x{h} ({f['detector']}):"
            probs = ", ".join(f"{e} {p * 100:.1f} %" for e, p in top)
            lines.append(f"{r['image']}:{where} {f['label']}  ({probs})")
    return lines


def write_csv(results: list[dict], path: str | Path) -> int:
    """One row per face: image, face (1-based), x, y, w, h, detected, detector, label, p_<emotion>...; the row
    count."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["image", "face", "x", "y", "w", "h", "detected", "detector", "label", *(f"p_{e}" for e in EMOTIONS)])
    n = 0
    for r in results:
        for i, f in enumerate(r["faces"]):
            w.writerow(
                [
                    r["image"],
                    i + 1,
                    *f["box"],
                    int(f["detected"]),
                    f["detector"] or "",
                    f["label"],
                    *(f["probabilities"][e] for e in EMOTIONS),
                ]
            )
            n += 1
    write_atomic(path, buf.getvalue())
    return n


def annotate(image: str, result: dict, out_dir: Path, taken: set[str]) -> Path:
    """The image in colour with each face's box and label drawn, into out_dir (a name already `taken` gets -2, -3)."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    src = Path(image)
    suffix = src.suffix.lower() if src.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif") else ".png"
    name, k = src.stem + suffix, 1
    while name in taken:
        k += 1
        name = f"{src.stem}-{k}{suffix}"
    taken.add(name)
    with pil_pixel_limit(None), Image.open(src) as im:  # (its size was checked when it was read)
        canvas = ImageOps.exif_transpose(im).convert("RGB")
    zoom = max(1.0, ANNOTATED_SIDE / min(canvas.size))  # small images enlarged so that the labels fit
    if zoom > 1:
        canvas = canvas.resize((round(canvas.width * zoom), round(canvas.height * zoom)), Image.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(12, min(canvas.size) // 25))
    line = max(2, min(canvas.size) // 200)
    for f in result["faces"]:
        x, y, w, h = (round(v * zoom) for v in f["box"])
        text = f"{f['label']} {f['probabilities'][f['label']] * 100:.0f} %"
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(255, 200, 0), width=line)
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        above = y - (bottom - top) - 2 * line  # the label above the box, or below it at the image's top
        ty = above if above >= 0 else y + h
        draw.rectangle([x, ty, x + right - left + 2 * line, ty + bottom - top + 2 * line], fill=(255, 200, 0))
        draw.text((x + line, ty + line - (top - y)), text, fill=(0, 0, 0), font=font)
    out = out_dir / name
    with io.BytesIO() as buf:
        canvas.save(buf, format={".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF"}.get(suffix, suffix[1:].upper()))
        write_atomic(out, buf.getvalue())
    return out
