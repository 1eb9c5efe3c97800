"""The face detectors bench_faces.py compares beside fer-tune's own two (fer_tune.faces): each a
fer_tune.faces.Detector whose find() runs another library, searched through the same Detector.scored (small images
enlarged and padded, large ones shrunk) and framed by what the benchmark measures (`frame` None)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fer_tune.faces import Detector

CASCADES = [(c, n) for c in ("default", "alt", "alt2") for n in (3, 5)]
MTCNN_CUTS = (0.7, 0.9, 0.97)  # O-Net face probabilities reported (fer-tune's: fer_tune.faces.MTCNN_MIN_PROB)
DLIB_HOG_UPSAMPLE = 1  # dlib's HOG window is 80 px: upsampled once it finds the 48-80 px faces searched
MEDIAPIPE_MIN_SCORE = 0.5  # MediaPipe's default min_detection_confidence


class DlibHog(Detector):
    """dlib's HOG + linear SVM frontal-face detector (built into dlib; dlib-bin's wheel)."""

    name = "dlib-hog"

    def __init__(self):
        import cv2
        import dlib

        self.cv2, self.frame, self.hog = cv2, None, dlib.get_frontal_face_detector()

    def find(self, img: np.ndarray, side: int) -> np.ndarray:
        rects, scores, _ = self.hog.run(img, DLIB_HOG_UPSAMPLE, 0.0)
        return keep_from(side, [(r.left(), r.top(), r.width(), r.height(), s) for r, s in zip(rects, scores)])


class DlibCnn(Detector):
    """dlib's MMOD CNN face detector, its weights (mmod_human_face_detector.dat) from face_recognition_models."""

    name = "dlib-cnn"

    def __init__(self):
        import cv2
        import dlib

        spec = importlib.util.find_spec("face_recognition_models")  # (its __init__ needs pkg_resources)
        weights = Path(spec.origin).parent / "models" / "mmod_human_face_detector.dat"
        self.cv2, self.frame, self.cnn = cv2, None, dlib.cnn_face_detection_model_v1(str(weights))

    def find(self, img: np.ndarray, side: int) -> np.ndarray:
        found = self.cnn(img, 0)
        return keep_from(
            side, [(d.rect.left(), d.rect.top(), d.rect.width(), d.rect.height(), d.confidence) for d in found]
        )


class MediaPipe(Detector):
    """MediaPipe's BlazeFace through its legacy solutions API: the short-range model (faces within about 2 m of a
    phone's camera) or the full-range one."""

    def __init__(self, full_range: bool):
        import cv2
        import mediapipe as mp

        self.name = "mediapipe-full" if full_range else "mediapipe-short"
        self.cv2, self.frame = cv2, None
        self.fd = mp.solutions.face_detection.FaceDetection(
            model_selection=int(full_range), min_detection_confidence=MEDIAPIPE_MIN_SCORE
        )

    def find(self, img: np.ndarray, side: int) -> np.ndarray:
        h, w = img.shape
        found = self.fd.process(np.repeat(img[:, :, None], 3, axis=2)).detections or []
        boxes = []
        for d in found:
            b = d.location_data.relative_bounding_box
            boxes.append((b.xmin * w, b.ymin * h, b.width * w, b.height * h, d.score[0]))
        return keep_from(side, boxes)


def keep_from(side: int, boxes) -> np.ndarray:
    """(n, 5) of the boxes whose longer side is at least 3/4 of `side` (the smallest face searched)."""
    out = np.asarray(boxes, dtype=float).reshape(-1, 5)
    return out[np.maximum(out[:, 2], out[:, 3]) >= 0.75 * side]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def detectors(names: list[str] | None, cascades: bool) -> list[tuple[str, Callable[[], Detector], tuple[float, ...]]]:
    """[(name, a factory of the detector, the score cut-offs reported)] of those asked for (default: every one
    installed); a name asked for that is not installed is an error."""
    from fer_tune.faces import MTCNN_MIN_PROB, Mtcnn

    table = {
        "cascade": (lambda: Detector(), (0.0,), True),
        "mtcnn": (lambda: Mtcnn(min_score=0.0), MTCNN_CUTS, installed("facenet_pytorch")),
        "dlib-hog": (DlibHog, (0.0,), installed("dlib")),
        "dlib-cnn": (DlibCnn, (0.0,), installed("dlib") and installed("face_recognition_models")),
        "mediapipe-short": (lambda: MediaPipe(False), (MEDIAPIPE_MIN_SCORE,), installed("mediapipe")),
        "mediapipe-full": (lambda: MediaPipe(True), (MEDIAPIPE_MIN_SCORE,), installed("mediapipe")),
    }
    assert MTCNN_MIN_PROB in MTCNN_CUTS
    for name in names or []:
        if name not in table or not table[name][2]:
            raise SystemExit(f"bench_faces: no detector {name!r} installed (known: {', '.join(table)})")
    out = [(n, f, cuts) for n, (f, cuts, ok) in table.items() if (n in names if names else ok)]
    if cascades:
        for c, nb in CASCADES:
            xml = f"haarcascade_frontalface_{c}.xml"
            out.append((f"cascade {c} nb{nb}", lambda xml=xml, nb=nb: Detector(cascade=xml, min_neighbors=nb), (0.0,)))
    return out
