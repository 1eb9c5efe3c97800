"""Which face detector `fer-tune predict` uses, with which settings, and how its boxes are framed, measured on real
FER2013 faces placed in scenes and on one real photo.

    python benchmarks/bench_faces.py [--faces 240] [--empty 120] [--detectors cascade,mtcnn,...] [--cascades]
            [--data ../shared/datasets/fer2013] [--model MODEL.pt]

1. Detection: --faces PublicTest faces (stratified by emotion, seeded), each enlarged to 64, 128 and 256 px and
   pasted at a random place into a 640x480 scene (a plain, a noisy and a cluttered background), plus each face
   alone as a tight crop at 48 px (FER2013's own) and enlarged to 144 px; --empty scenes without a face; and
   scikit-image's `astronaut` photo (skimage.data.astronaut, inside its wheel) when scikit-image is installed. For
   each detector (--detectors, default: every one installed) and setting: the share of faces found (a box with
   IoU >= 0.3 with where the face was put), the extra boxes per scene, the boxes per scene without a face, ms per
   scene (one thread), whether the astronaut's face is found (and how many other boxes her photo gets), and "frame
   IoU" (below). Every detector searches through fer_tune.faces.Detector.scored, so small images are enlarged and
   padded with their own border as `predict` does.
   Detectors: fer-tune's two, cascade (OpenCV's Haar cascade with fer-tune's settings) and mtcnn (facenet-pytorch's
   MTCNN, its boxes cut at O-Net face probabilities 0.7 (fer-tune's), 0.9 and 0.97); dlib-hog (dlib's HOG
   detector, upsampled once) and dlib-cnn (dlib's MMOD CNN, its weights from face_recognition_models; about 2 s a
   scene on one thread: run it on a few faces); mediapipe-short and mediapipe-full (MediaPipe's BlazeFace through
   its legacy solutions API, whose wheels up to 0.10.21 hold the models). --cascades adds the six cascade settings
   fer-tune's were chosen from (OpenCV's default, alt and alt2 cascades at minNeighbors 3 / 5).
2. Framing: per detector, the median offset and scale from a detected box to the FER2013 crop that was placed, as
   fer_tune.faces.frame_crop applies them (shifts in box widths, the scale of the box's longer side). fer-tune's
   two detectors frame with their constants (fer_tune.faces.FRAME, MTCNN_FRAME), the others with what is measured
   here. "frame IoU": the mean IoU of each found face's framed square with the crop that was placed, face by face.
3. With --model (a model trained on FER2013): PublicTest top-1 of the faces each detector found in the 128 px scenes,
   classified from the box framed as FER2013's, against top-1 of the same faces' original 48x48 images and the share
   of answers that agree; and for the 48 px crops where a box was found, top-1 of the whole crop against the framed
   box, for framed boxes smaller and larger than fer_tune.faces.CROP_BOX of the crop.
Prints a table and one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread for every detector
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from face_detectors import detectors, installed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCENE = (480, 640)  # h, w
SIZES = (64, 128, 256)
KEYS = ("scene 64", "scene 128", "scene 256", "crop 48", "crop 144")
ASTRONAUT_FACE = (178, 68, 90, 100)  # x, y, w, h of Eileen Collins's face (brows to chin) in skimage's astronaut


def sample_faces(data: Path, n: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    from PIL import Image

    from fer_tune.common import EMOTIONS

    rng = random.Random(seed)
    per = {e: sorted((data / "test" / e).glob("PublicTest_*.jpg")) for e in EMOTIONS}
    out = []
    while len(out) < n:
        for e in EMOTIONS:
            if per[e] and len(out) < n:
                f = per[e].pop(rng.randrange(len(per[e])))
                out.append((np.asarray(Image.open(f).convert("L"), dtype=np.uint8), e))
    return out


def background(kind: str, rng: np.random.Generator) -> np.ndarray:
    import cv2

    h, w = SCENE
    if kind == "plain":
        return np.full((h, w), rng.integers(40, 220), np.uint8)
    if kind == "noise":
        img = rng.normal(rng.integers(60, 200), 40, (h, w)).clip(0, 255).astype(np.uint8)
        return cv2.GaussianBlur(img, (0, 0), 3)
    img = np.full((h, w), rng.integers(60, 200), np.uint8)  # clutter: shapes and lines
    for _ in range(40):
        c = int(rng.integers(0, 256))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        a, b = int(rng.integers(10, 120)), int(rng.integers(10, 120))
        shape = rng.integers(3)
        if shape == 0:
            cv2.rectangle(img, (x, y), (x + a, y + b), c, -1)
        elif shape == 1:
            cv2.ellipse(img, (x, y), (a // 2, b // 2), float(rng.integers(180)), 0, 360, c, -1)
        else:
            cv2.line(img, (x, y), (x + a, y + b), c, int(rng.integers(1, 6)))
    return cv2.GaussianBlur(img, (0, 0), 1.5)


def place(face: np.ndarray, size: int, kind: str, rng: np.random.Generator):
    import cv2

    img = background(kind, rng)
    big = cv2.resize(face, (size, size), interpolation=cv2.INTER_CUBIC)
    y, x = int(rng.integers(0, SCENE[0] - size)), int(rng.integers(0, SCENE[1] - size))
    img[y : y + size, x : x + size] = big
    return img, (x, y, size, size)


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / (aw * ah + bw * bh - inter)


def build_cases(faces, seed: int, n_empty: int = 120):
    """[(kind, size, image, placed box, face index)] and the no-face scenes."""
    import cv2

    rng = np.random.default_rng(seed)
    cases = []
    for i, (face, _) in enumerate(faces):
        for size in SIZES:
            kind = ("plain", "noise", "clutter")[(i + size) % 3]
            img, box = place(face, size, kind, rng)
            cases.append(("scene", size, img, box, i))
        cases.append(("crop", 48, face, (0, 0, 48, 48), i))
        cases.append(("crop", 144, cv2.resize(face, (144, 144), interpolation=cv2.INTER_CUBIC), (0, 0, 144, 144), i))
    empty = [background(("plain", "noise", "clutter")[k % 3], rng) for k in range(n_empty)]
    return cases, empty


def astronaut() -> np.ndarray | None:
    """scikit-image's astronaut photo as predict reads it (grayscale, PIL's conversion), or None without it."""
    if not installed("skimage"):
        return None
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).convert("L"), dtype=np.uint8)


def search(det, cases, empty, photo) -> dict:
    """Every box with its score, per image: the cases, the empty scenes, the astronaut; ms per scene."""
    found, t, n = [], 0.0, 0
    for what, _, img, _, _ in cases:
        t0 = time.perf_counter()
        found.append(det.scored(img))
        if what == "scene":
            t, n = t + time.perf_counter() - t0, n + 1
    return {
        "cases": found,
        "empty": [det.scored(img) for img in empty],
        "astronaut": det.scored(photo) if photo is not None else None,
        "ms_per_scene": 1000 * t / n,
    }


def tally(run: dict, cases, empty, cut: float) -> dict:
    """The figures of one detector at score cut-off `cut`."""
    found: dict[str, list[int]] = {}
    extra, matches, crops = [], [], []
    for (what, size, _, box, i), scored in zip(cases, run["cases"]):
        boxes = [b for b, s in scored if s >= cut]
        best = max(boxes, key=lambda b: iou(b, box), default=None)
        hit = best is not None and iou(best, box) >= 0.3
        found.setdefault(f"{what} {size}", []).append(int(hit))
        if what == "crop" and size == 48 and boxes:
            crops.append((i, boxes[0]))
        if what == "scene":
            extra.append(len(boxes) - int(hit))
            if hit:
                matches.append((i, size, best, box))
    photo = None
    if run["astronaut"] is not None:
        boxes = [b for b, s in run["astronaut"] if s >= cut]
        hit = any(iou(b, ASTRONAUT_FACE) >= 0.3 for b in boxes)
        photo = {"found": hit, "other_boxes": len(boxes) - int(hit), "boxes": boxes}
    return {
        "found": {k: sum(v) / len(v) for k, v in found.items()},
        "extra_per_scene": sum(extra) / len(extra),
        "boxes_on_empty": sum(sum(s >= cut for _, s in scored) for scored in run["empty"]) / len(empty),
        "ms_per_scene": run["ms_per_scene"],
        "astronaut": photo,
        "matches": matches,
        "crops": crops,
    }


def framing(matches) -> tuple[float, float, float]:
    """Median centre shift (x, y, in box widths) and scale (of the box's longer side) from a detected box to the
    placed FER2013 crop: what fer_tune.faces.frame_crop applies."""
    dx = [((px + pw / 2) - (bx + bw / 2)) / bw for _, _, (bx, by, bw, bh), (px, py, pw, ph) in matches]
    dy = [((py + ph / 2) - (by + bh / 2)) / bw for _, _, (bx, by, bw, bh), (px, py, pw, ph) in matches]
    sc = [pw / max(bw, bh) for _, _, (bx, by, bw, bh), (px, py, pw, ph) in matches]
    return (round(statistics.median(dx), 3), round(statistics.median(dy), 3), round(statistics.median(sc), 3))


def framed_iou(matches, frame) -> float:
    """Mean IoU of each found face's box framed as FER2013's (fer_tune.faces.frame_crop's square) with the FER2013
    crop that was placed: how closely a detector reproduces FER2013's framing face by face (1: exactly)."""
    out = []
    for _, _, (bx, by, bw, bh), placed in matches:
        side = max(bw, bh) * frame[2]
        cx, cy = bx + bw / 2 + frame[0] * bw, by + bh / 2 + frame[1] * bw
        out.append(iou((cx - side / 2, cy - side / 2, side, side), placed))
    return statistics.fmean(out)


def classify(model, faces, cases, matches, frame, crops) -> dict:
    """Top-1 of the faces found in 128 px scenes (framed by `frame`) against their original images; top-1 of the
    48 px crops with a box, whole against framed, by the framed box's size."""
    from fer_tune.common import EMOTIONS
    from fer_tune.faces import CROP_BOX, frame_crop, whole

    scenes = {(c[4], c[1]): c[2] for c in cases if c[0] == "scene"}
    chosen = [(i, box) for i, size, box, _ in matches if size == 128]

    def top1(pixels: list[np.ndarray]) -> np.ndarray:
        return model.probabilities(np.stack(pixels)).argmax(1) if pixels else np.zeros(0, int)

    truth = np.array([EMOTIONS.index(faces[i][1]) for i, _ in chosen])
    original = top1([faces[i][0] for i, _ in chosen])
    framed = top1([frame_crop(scenes[(i, 128)], box, frame) for i, box in chosen])
    by_fill = {}
    for name, large in (("small", False), ("large", True)):
        sel = [(i, b) for i, b in crops if (max(b[2:]) * frame[2] >= CROP_BOX * 48) == large]
        t = np.array([EMOTIONS.index(faces[i][1]) for i, _ in sel])
        w = top1([whole(faces[i][0]).pixels for i, _ in sel])
        d = top1([frame_crop(faces[i][0], b, frame) for i, b in sel])
        by_fill[name] = {
            "n": len(sel),
            "top1_whole": float((w == t).mean() * 100) if sel else None,
            "top1_box": float((d == t).mean() * 100) if sel else None,
        }
    pct = lambda a, b: float((a == b).mean() * 100) if len(chosen) else None  # noqa: E731
    return {
        "n": len(chosen),
        "top1_original": pct(original, truth),
        "top1_framed": pct(framed, truth),
        "agree": pct(framed, original),
        "crops_48": by_fill,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", type=int, default=240)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "fer2013"))
    ap.add_argument("--model", default=None, help="a model trained on FER2013 (step 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--empty", type=int, default=120, help="scenes without a face")
    ap.add_argument(
        "--detectors",
        default=None,
        help="comma-separated: cascade, mtcnn, dlib-hog, dlib-cnn, mediapipe-short, "
        "mediapipe-full (default: every one installed)",
    )
    ap.add_argument("--cascades", action="store_true", help="also the six cascade settings fer-tune's were chosen from")
    args = ap.parse_args()
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    names = args.detectors.split(",") if args.detectors else None
    todo = detectors(names, args.cascades)
    faces = sample_faces(Path(args.data), args.faces, args.seed)
    cases, empty = build_cases(faces, args.seed, args.empty)
    photo = astronaut()
    model = None
    if args.model:
        from fer_tune.predict import load_model

        model = load_model(args.model)
    print(
        f"{len(faces)} PublicTest faces, {len(cases)} images, {len(empty)} scenes without a face; "
        f"astronaut: {'yes' if photo is not None else 'no (scikit-image is not installed)'}; OpenCV {cv2.__version__}, "
        f"torch {torch.__version__}, one thread"
    )
    print(
        f"{'detector':<22} {'cut':>4} "
        + " ".join(f"{k:>9}" for k in KEYS)
        + f" {'extra/scene':>11} {'empty':>6} {'ms':>6} {'astronaut':>9} {'frame IoU':>9} {'top-1 128':>9}"
    )
    rows = []
    for name, make, cuts in todo:
        det = make()
        run = search(det, cases, empty, photo)
        for cut in cuts:
            r = tally(run, cases, empty, cut)
            measured = framing(r["matches"]) if r["matches"] else None
            frame = det.frame or measured  # fer-tune's detectors: their own constant
            r.update(detector=name, cut=cut, framing_measured=measured, framing_used=frame)
            r["frame_iou"] = framed_iou(r["matches"], frame) if frame is not None else None
            if model is not None and frame is not None:
                r["classify"] = classify(model, faces, cases, r["matches"], frame, r["crops"])
            rows.append(r)
            a, top1 = r["astronaut"], r.get("classify", {}).get("top1_framed")
            cells = (
                "-" if a is None else f"{'yes' if a['found'] else 'no'} +{a['other_boxes']}",
                "-" if r["frame_iou"] is None else f"{r['frame_iou']:.3f}",
                "-" if top1 is None else f"{top1:.1f}%",
            )
            print(
                f"{name:<22} {cut:>4.2f} "
                + " ".join(f"{100 * r['found'][k]:>8.1f}%" for k in KEYS)
                + f" {r['extra_per_scene']:>11.3f} {r['boxes_on_empty']:>6.3f} {r['ms_per_scene']:>6.1f} "
                + " ".join(f"{c:>9}" for c in cells),
                flush=True,
            )
    print("framing (centre shift x, y in box widths; scale of the box's longer side), measured / used:")
    for r in rows:
        m, u = r["framing_measured"], r["framing_used"]
        if m is not None:
            used = "the same" if u == m else f"{u[0]:+.3f} {u[1]:+.3f} {u[2]:.3f}"
            print(
                f"  {r['detector']:<22} {r['cut']:.2f} ({len(r['matches'])} boxes): {m[0]:+.3f} {m[1]:+.3f} {m[2]:.3f}; used: {used}"
            )
    if model is not None:
        for r in rows:
            c = r.get("classify")
            if c and c["n"]:
                fill = "; ".join(
                    f"{k} framed boxes n={v['n']}: whole {v['top1_whole']:.1f} %, box {v['top1_box']:.1f} %"
                    for k, v in c["crops_48"].items()
                    if v["n"]
                )
                print(
                    f"{r['detector']} {r['cut']:.2f}: top-1 of {c['n']} faces found in 128 px scenes: framed "
                    f"{c['top1_framed']:.1f} %, their original 48x48 {c['top1_original']:.1f} % (agree "
                    f"{c['agree']:.1f} %); 48x48 crops with a box: {fill}"
                )
    else:
        print("top-1: no --model given")
    print(json.dumps([{k: v for k, v in r.items() if k not in ("matches", "crops")} for r in rows]))


if __name__ == "__main__":
    main()
