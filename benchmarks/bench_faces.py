"""Which face detector settings `fer-tune predict` uses, and how a detected box is framed, measured on real FER2013
faces placed in scenes.

    python benchmarks/bench_faces.py [--faces 240] [--data ../shared/datasets/fer2013] [--model MODEL.pt]

1. Detection: --faces PublicTest faces (stratified by emotion, seeded), each enlarged to 64, 128 and 256 px and
   pasted at a random place into a 640x480 scene (a plain, a noisy and a cluttered background), plus each face
   alone as a tight crop at 48 px (FER2013's own) and enlarged to 144 px. For each of OpenCV's frontal-face
   cascades (default, alt, alt2) and minNeighbors 3 / 5: the share of faces found (a box with IoU >= 0.3 with where
   the face was put), the extra boxes per scene, the boxes on 120 scenes without a face, and ms per scene.
2. Framing: for the chosen settings, the median offset and scale from a detected box to the FER2013 crop that was
   placed (fer_tune.faces.FRAME).
3. With --model (a model trained on FER2013): PublicTest top-1 of the faces detected in the 128 px scenes, classified
   from the original 48x48 image, from the detected box as drawn, and from the box framed as FER2013's; the share
   of answers that agree with the original's; and for the 48 px crops where a box was found, top-1 of the whole
   crop against the box, for boxes smaller and larger than fer_tune.faces.CROP_BOX of the crop.
Prints a table and one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCENE = (480, 640)  # h, w
SIZES = (64, 128, 256)
CONFIGS = [(c, n) for c in ("default", "alt", "alt2") for n in (3, 5)]


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


def build_cases(faces, seed: int):
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
    empty = [background(("plain", "noise", "clutter")[k % 3], rng) for k in range(120)]
    return cases, empty


def run_config(cascade: str, neighbors: int, cases, empty) -> dict:
    from fer_tune.faces import Detector

    det = Detector(cascade=f"haarcascade_frontalface_{cascade}.xml", min_neighbors=neighbors)
    found: dict[str, list[int]] = {}
    extra, matches, crops, t = [], [], [], 0.0
    for what, size, img, box, i in cases:
        t0 = time.perf_counter()
        boxes = det.detect(img)
        t += time.perf_counter() - t0 if what == "scene" else 0.0
        best = max(boxes, key=lambda b: iou(b, box), default=None)
        hit = best is not None and iou(best, box) >= 0.3
        found.setdefault(f"{what} {size}", []).append(int(hit))
        if what == "crop" and size == 48 and boxes:
            crops.append((i, boxes[0]))
        if what == "scene":
            extra.append(len(boxes) - int(hit))
            if hit:
                matches.append((i, size, best, box))
    fp_empty = sum(len(det.detect(img)) for img in empty)
    n_scenes = sum(1 for c in cases if c[0] == "scene")
    return {
        "cascade": cascade,
        "min_neighbors": neighbors,
        "found": {k: sum(v) / len(v) for k, v in found.items()},
        "found_scenes": statistics.fmean(v for k, vs in found.items() if k.startswith("scene") for v in vs),
        "extra_per_scene": sum(extra) / len(extra),
        "boxes_on_empty": fp_empty / len(empty),
        "ms_per_scene": 1000 * t / n_scenes,
        "matches": matches,
        "crops": crops,
    }


def framing(matches) -> tuple[float, float, float]:
    dx = [((px + pw / 2) - (bx + bw / 2)) / bw for _, _, (bx, by, bw, bh), (px, py, pw, ph) in matches]
    dy = [((py + ph / 2) - (by + bh / 2)) / bw for _, _, (bx, by, bw, bh), (px, py, pw, ph) in matches]
    sc = [pw / bw for _, _, (bx, by, bw, bh), (px, py, pw, ph) in matches]
    return (round(statistics.median(dx), 3), round(statistics.median(dy), 3), round(statistics.median(sc), 3))


def classify(model_path: str, faces, cases, matches, frame, crops) -> dict:
    from fer_tune.common import EMOTIONS
    from fer_tune.faces import frame_crop
    from fer_tune.predict import load_model

    model = load_model(model_path)
    scenes = {(c[4], c[1]): c[2] for c in cases if c[0] == "scene"}
    chosen = [(i, box) for i, size, box, _ in matches if size == 128]

    def top1(pixels: list[np.ndarray]) -> np.ndarray:
        return model.probabilities(np.stack(pixels)).argmax(1)

    truth = np.array([EMOTIONS.index(faces[i][1]) for i, _ in chosen])
    original = top1([faces[i][0] for i, _ in chosen])
    raw = top1([frame_crop(scenes[(i, 128)], box, (0.0, 0.0, 1.0)) for i, box in chosen])
    framed = top1([frame_crop(scenes[(i, 128)], box, frame) for i, box in chosen])
    from fer_tune.faces import CROP_BOX, whole

    by_fill = {}
    for name, keep in (
        ("small boxes", lambda b: max(b[2:]) < CROP_BOX * 48),
        ("large boxes", lambda b: max(b[2:]) >= CROP_BOX * 48),
    ):
        sel = [(i, b) for i, b in crops if keep(b)]
        t = np.array([EMOTIONS.index(faces[i][1]) for i, _ in sel])
        w = top1([whole(faces[i][0]).pixels for i, _ in sel]) if sel else t
        d = top1([frame_crop(faces[i][0], b, frame) for i, b in sel]) if sel else t
        by_fill[name] = {
            "n": len(sel),
            "top1_whole": float((w == t).mean() * 100) if sel else None,
            "top1_box": float((d == t).mean() * 100) if sel else None,
        }
    return {
        "crops_48": by_fill,
        "n": len(chosen),
        "top1_original": float((original == truth).mean() * 100),
        "top1_box_as_drawn": float((raw == truth).mean() * 100),
        "top1_fer2013_framing": float((framed == truth).mean() * 100),
        "agree_box_as_drawn": float((raw == original).mean() * 100),
        "agree_fer2013_framing": float((framed == original).mean() * 100),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", type=int, default=240)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "fer2013"))
    ap.add_argument("--model", default=None, help="a model trained on FER2013 (step 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chosen-only", action="store_true", help="step 1 for fer-tune's settings alone")
    args = ap.parse_args()
    import cv2

    cv2.setNumThreads(1)
    faces = sample_faces(Path(args.data), args.faces, args.seed)
    cases, empty = build_cases(faces, args.seed)
    print(
        f"{len(faces)} PublicTest faces, {len(cases)} images, {len(empty)} scenes without a face; OpenCV {cv2.__version__}"
    )
    head = f"{'cascade':<8} {'nb':>2} " + " ".join(
        f"{k:>9}" for k in ("scene 64", "scene 128", "scene 256", "crop 48", "crop 144")
    )
    print(head + f" {'extra/scene':>11} {'empty':>6} {'ms':>6}")
    rows = []
    from fer_tune.faces import CASCADE, CROP_BOX, MIN_NEIGHBORS

    configs = [(CASCADE.split("_")[-1][:-4], MIN_NEIGHBORS)] if args.chosen_only else CONFIGS
    for cascade, nb in configs:
        r = run_config(cascade, nb, cases, empty)
        rows.append(r)
        f = r["found"]
        print(
            f"{cascade:<8} {nb:>2} "
            + " ".join(f"{100 * f[k]:>8.1f}%" for k in ("scene 64", "scene 128", "scene 256", "crop 48", "crop 144"))
            + f" {r['extra_per_scene']:>11.3f} {r['boxes_on_empty']:>6.3f} {r['ms_per_scene']:>6.1f}"
        )
    chosen = next(
        r
        for r in rows
        if f"haarcascade_frontalface_{r['cascade']}.xml" == CASCADE and r["min_neighbors"] == MIN_NEIGHBORS
    )
    frame = framing(chosen["matches"])
    print(
        f"framing of {CASCADE} minNeighbors {MIN_NEIGHBORS} ({len(chosen['matches'])} boxes): centre shift x "
        f"{frame[0]:+.3f}, y {frame[1]:+.3f} box widths, scale {frame[2]:.3f}"
    )
    summary = {"configs": [{k: v for k, v in r.items() if k != "matches"} for r in rows], "framing": frame}
    if args.model:
        c = classify(args.model, faces, cases, chosen["matches"], frame, chosen["crops"])
        summary["classify"] = c
        print(
            f"top-1 of {c['n']} faces found in 128 px scenes: original 48x48 {c['top1_original']:.1f} %, box as drawn "
            f"{c['top1_box_as_drawn']:.1f} % (agrees {c['agree_box_as_drawn']:.1f} %), FER2013 framing "
            f"{c['top1_fer2013_framing']:.1f} % (agrees {c['agree_fer2013_framing']:.1f} %)"
        )
        for name, r in c["crops_48"].items():
            if r["n"]:
                print(
                    f"48x48 crops with {name} (side < / >= {CROP_BOX} of the crop's): n={r['n']}, top-1 of the "
                    f"whole crop {r['top1_whole']:.1f} %, of the box {r['top1_box']:.1f} %"
                )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
