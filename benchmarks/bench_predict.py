"""Images per second of `fer-tune predict` on real FER2013 test images: the torch model against its ONNX export
run with onnxruntime, with and without face detection.

    python benchmarks/bench_predict.py --model MODEL.pt [--images 400] [--data ../shared/datasets/fer2013]
            [--threads 2] [--repeats 3]

Writes --images PublicTest images to a temp folder twice: as they are (48x48 face crops) and each pasted at 128 px
into a 640x480 scene (the kind of photo detection is for). Exports the model to ONNX with fer_tune.export (its
check against torch on real faces is printed), then times fer_tune.predict.predict (reading the files, detection,
TenCrop classification) for each model x detection x folder, interleaved, best of --repeats; and the agreement of
the ONNX model's labels with torch's. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_folders(data: Path, n: int, root: Path) -> tuple[list[str], list[str], np.ndarray]:
    import cv2
    from PIL import Image

    files = sorted((data / "test").glob("*/PublicTest_*.jpg"))
    random.Random(0).shuffle(files)
    rng = np.random.default_rng(0)
    crops, scenes, faces = [], [], []
    (root / "crops").mkdir()
    (root / "scenes").mkdir()
    for i, f in enumerate(files[:n]):
        face = np.asarray(Image.open(f).convert("L"), dtype=np.uint8)
        faces.append(face)
        crops.append(str(root / "crops" / f.name))
        Image.fromarray(face).save(crops[-1], quality=95)
        scene = np.full((480, 640), int(rng.integers(60, 200)), np.uint8)
        y, x = int(rng.integers(0, 480 - 128)), int(rng.integers(0, 640 - 128))
        scene[y : y + 128, x : x + 128] = cv2.resize(face, (128, 128), interpolation=cv2.INTER_CUBIC)
        scenes.append(str(root / "scenes" / f"{i:05d}.jpg"))
        Image.fromarray(scene).save(scenes[-1], quality=95)
    return crops, scenes, np.stack(faces)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a fer-tune model.pt trained on FER2013")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "fer2013"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    from fer_tune.common import EMOTIONS
    from fer_tune.export import export_onnx
    from fer_tune.predict import OnnxModel, load_model, predict

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        crops, scenes, faces = write_folders(Path(args.data), args.images, root)
        torch_model = load_model(args.model)
        record = {"classes": list(EMOTIONS), "data": torch_model.trained_on}
        check = export_onnx(torch_model.net, root / "model.onnx", torch_model.crops, record, faces[:64])
        print(
            f"ONNX export: {check['status']}, opset {check['opset']}, max abs logit difference "
            f"{check['max_abs_logit_diff']:.2g} on {check['checked_on']} real faces"
        )
        models = {"torch": torch_model, "onnxruntime": OnnxModel(root / "model.onnx")}
        runs = [
            (folder, detect, name)
            for folder in ("crops", "scenes")
            for detect in (False, True)
            for name in models
            if not (folder == "scenes" and not detect)
        ]
        best: dict[tuple, float] = {}
        labels: dict[tuple, list] = {}
        for _ in range(args.repeats):
            for folder, detect, name in runs:
                paths = crops if folder == "crops" else scenes
                t0 = time.perf_counter()
                out = predict(models[name], paths, detect=detect)
                dt = time.perf_counter() - t0
                key = (folder, detect, name)
                best[key] = min(best.get(key, float("inf")), dt)
                labels[key] = [[f["label"] for f in r["faces"]] for r in out]
        print(f"{args.images} images, {args.threads} threads, best of {args.repeats}; images/s")
        print(f"{'folder':<8} {'detection':<10} {'torch':>8} {'onnxruntime':>12} {'ratio':>6} {'labels agree':>13}")
        rows = []
        for folder, detect in dict.fromkeys((f, d) for f, d, _ in runs):
            ips = {n: args.images / best[(folder, detect, n)] for n in models}
            a, b = labels[(folder, detect, "torch")], labels[(folder, detect, "onnxruntime")]
            agree = 100 * sum(x == y for x, y in zip(a, b)) / len(a)
            rows.append({"folder": folder, "detect": detect, **ips, "labels_agree": agree})
            print(
                f"{folder:<8} {'on' if detect else 'off':<10} {ips['torch']:>8.0f} {ips['onnxruntime']:>12.0f} "
                f"{ips['onnxruntime'] / ips['torch']:>5.2f}x {agree:>12.1f}%"
            )
        print(json.dumps({"onnx": check, "rows": rows, "images": args.images, "threads": args.threads}))


if __name__ == "__main__":
    main()
