"""`fer-tune predict`: the faces in images, found and classified with a trained model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..common import FerTuneError
from ..faces import DETECT_MAX_SIDE, DETECTORS, MAX_PIXELS
from .common import log, parser_with

SOME_SKIPPED = 3  # the exit status when some images were skipped and the others classified


def cmd_predict(args: argparse.Namespace) -> int:
    from ..faces import image_paths, load_detector
    from ..predict import annotate, load_model, predict, text_lines, write_csv

    if args.max_pixels < 1:
        raise FerTuneError(f"--max-pixels must be >= 1 (got {args.max_pixels})")
    paths = image_paths(args.images)
    detector = None if args.no_detect else load_detector(args.detector)  # before the model: a detector's error first
    out_dir = Path(args.annotate) if args.annotate else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise FerTuneError(f"--annotate {out_dir}: not a directory")
        if any(Path(p).resolve().parent == out_dir.resolve() for p in paths):
            raise FerTuneError(f"--annotate {out_dir} holds images being classified: give another directory")
        out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    if model.trained_on.get("format") == "synthetic":
        log.warning(
            "%s was trained on fer-tune's synthetic faces (the demo's), not on photos: its answers for real faces "
            "mean nothing; a model to use is trained on FER2013 (--data)",
            args.model,
        )
    taken: set[str] = set()
    on_image = (lambda p, r: annotate(p, r, out_dir, taken)) if out_dir is not None else None
    bar = None
    if len(paths) > 1 and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="image", file=sys.stderr, leave=False)
    skipped = []  # named once the others are classified (when none is, the error names them)
    try:
        results = predict(
            model,
            paths,
            detect=not args.no_detect,
            detector=detector,
            max_pixels=args.max_pixels,
            on_image=on_image,
            on_skip=skipped.append,
            progress=bar.update if bar else None,
        )
    finally:
        if bar is not None:
            bar.close()
    for why in skipped:
        log.warning("skipped %s", why)
    if args.csv:
        rows = write_csv(results, args.csv)
        log.info("%d face(s) of %d image(s) in %s", rows, len(results), args.csv)
    if args.json:
        print("\n".join(json.dumps(r) for r in results))
    elif not args.csv:
        print("\n".join(text_lines(results)))
    if out_dir is not None:
        log.info("annotated images in %s", out_dir)
    if skipped:
        log.warning("%d of %d image(s) skipped, %d classified", len(skipped), len(paths), len(results))
        return SOME_SKIPPED
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = parser_with(
        sub,
        "predict",
        "find the faces in images and classify their emotion (a final stage's model.pt or model.onnx)",
        """
        fer-tune predict results/joint/final/model.pt photo.jpg group.png
        fer-tune predict results/joint/final/model.onnx photos/ --csv faces.csv --annotate annotated/
        fer-tune predict results/joint/final 'shots/*.jpg' --json
        fer-tune predict results/joint/final crops/ --no-detect     # images that are already face crops
        fer-tune predict results/joint/final photo.jpg --detector cascade   # OpenCV's cascade, not MTCNN
        fer-tune predict results/joint/final photos/ --max-pixels 200000000   # photos up to 200 megapixels
    """,
        details="Faces are found with the best face detector installed (mtcnn: facenet-pytorch's MTCNN, the extra "
        "fer-tune[faces]; else cascade: OpenCV's frontal-face Haar cascade), or the one --detector names, and framed "
        "as FER2013's faces; the output names the detector of each face. An image with no face found that is small "
        "and square enough to be a face crop (at most 160 px) is classified whole. Each face is made grayscale 48x48 and classified with the test crops of the model's score "
        f"(TenCrop for a final stage's model). An image longer than {DETECT_MAX_SIDE} px is searched for faces on "
        "a copy that long; its faces are cut from the full image and their boxes are in its pixels. An image "
        "that cannot be read (missing, not an image), is truncated or has more pixels than --max-pixels (checked "
        "from its header before it is decoded) is skipped and named on stderr. Exit status: 0 when every image "
        f"was classified, {SOME_SKIPPED} when some were skipped and the others classified, 2 when none could be "
        "(or on any other error).",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a model.pt or model.onnx (final stage), a training checkpoint, or a final stage directory",
    )
    p.add_argument(
        "images", nargs="+", metavar="IMAGE", help="images (any format PIL reads), folders of images, glob patterns"
    )
    p.add_argument(
        "--json", action="store_true", help="print JSON: per image, its faces with box, detector, label, probabilities"
    )
    p.add_argument("--csv", metavar="FILE", default=None, help="write one row per face to FILE (then print nothing)")
    p.add_argument("--annotate", metavar="DIR", default=None, help="write each image with its faces' boxes and labels")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--detector",
        choices=DETECTORS,
        default=None,
        help="the face detector: mtcnn (facenet-pytorch's MTCNN: pip install facenet-pytorch==2.5.3, the extra "
        "[faces]) or cascade (OpenCV's Haar cascade); default: the best one installed, in that order",
    )
    how.add_argument(
        "--no-detect", action="store_true", help="classify each image whole (images that are already face crops)"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        metavar="N",
        help=f"skip images with more than N pixels (width x height; default {MAX_PIXELS:,}, e.g. 12000x8000 fits)",
    )
    p.set_defaults(func=cmd_predict)
