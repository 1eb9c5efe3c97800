"""Faces in photos: found by a face detector, and each cropped as FER2013 frames its faces and made the model's 48x48
grayscale input.

Two detectors, chosen by measurement on FER2013 faces placed in scenes (benchmarks/bench_faces.py, RESULTS.md "Faces
in photos"): MTCNN (facenet-pytorch's P-, R- and O-Nets, whose weights ship inside its wheel: the optional extra
`fer-tune[faces]`) finds about nine in ten of them, OpenCV's frontal-face Haar cascade (inside opencv-python-headless)
about six in ten. The default is the best one installed (DETECTORS, best first); nothing is downloaded. A FER2013
face is a tight crop (brows to chin) and each detector draws its own box around the same face: its `frame` maps a
detected box onto FER2013's framing.

An image that is already a face crop (FER2013's own, a cropped avatar) has no background to tell a face from; the
image is padded with its own border and enlarged before detection, and an image small and square enough to be a crop
(CROP_SIDE, CROP_ASPECT) is taken whole when no face is found that fills most of it (CROP_BOX, of the framed box).
A large photo is searched on a copy at most DETECT_MAX_SIDE long (faces under MIN_FACE of its shorter side are not
searched anyway), and its faces are cut from the full-resolution image.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import FerTuneError

SIZE = 48  # the models' input side (FER2013)
CASCADE = "haarcascade_frontalface_default.xml"
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 5
MIN_FACE = 0.1  # the smallest face searched, as a fraction of the image's shorter side (and >= 24 px)
DETECT_SIDE = 160  # small images are enlarged to this shorter side before detection
PAD = 0.25  # and padded with their own border by this fraction of each side
DETECT_MAX_SIDE = 1600  # large images are searched on a copy made this long on its longer side
MAX_PIXELS = 100_000_000  # larger images are not read (--max-pixels): 100 megapixels, 400 MB as RGB
FRAME = (0.0, 0.0, 1.03)  # FER2013's crop from a cascade's box: centre shift (x, y) in box widths, scale of
# its longer side (measured)
MTCNN_FRAME = (0.0, -0.025, 0.95)  # and from an MTCNN box (measured; of its longer side: it is taller than wide)
MTCNN_MIN_PROB = 0.7  # MTCNN's boxes kept: O-Net's face probability at least this (facenet-pytorch's own threshold)
MTCNN_MIN_BOX = 20  # px: the smallest MTCNN box searched for
CROP_SIDE = 160  # an image at most this large ...
CROP_ASPECT = 1.35  # ... and at most this elongated is a face crop: it is used whole unless a face is found whose
CROP_BOX = 0.72  # framed box fills at least this part of its shorter side (smaller ones in FER2013's crops are not it)
DETECTORS = ("mtcnn", "cascade")  # best first: the default is the first one installed
# the detectors' packages: (the modules it needs, how to install them; facenet-pytorch 2.6.0 would replace torch,
# numpy and pillow with old releases)
PACKAGES = {"mtcnn": (("facenet_pytorch", "torch"), "pip install facenet-pytorch==2.5.3 (the extra fer-tune[faces])")}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # x, y, w, h in the image's pixels
    pixels: np.ndarray  # uint8 (48, 48)
    detected: bool  # False: the whole image, taken as a face crop


class Unreadable(FerTuneError):
    """An image that cannot be classified: `reason` says why (missing, not an image, too large, truncated)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@contextmanager
def pil_pixel_limit(limit: int | None) -> Iterator[None]:
    """Within: PIL's own decompression-bomb check at `limit` pixels (None: none), its warning raised as an error."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def read_gray(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image at `path` as uint8 grayscale (H, W), turned upright by its EXIF orientation (phone photos); its size
    is checked from its header before it is decoded. Unreadable when it cannot be read, has more than `max_pixels`
    pixels or does not decode whole (a file cut short)."""
    from PIL import Image, ImageOps

    try:
        with pil_pixel_limit(None):  # the size is checked below, from the header, with its numbers in the message
            im = Image.open(path)
    except FileNotFoundError:
        raise Unreadable(path, "no such file") from None
    except IsADirectoryError:
        raise Unreadable(path, "is a directory") from None
    except Exception as exc:  # PIL's UnidentifiedImageError, or what a format's header parser raises
        raise Unreadable(path, f"not a readable image ({exc.__class__.__name__})") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise Unreadable(path, f"{w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} (--max-pixels)")
        try:
            with pil_pixel_limit(max_pixels):  # PIL's check of what it decodes (frames, tiles), at the same limit
                im.load()
                return np.asarray(ImageOps.exif_transpose(im).convert("L"), dtype=np.uint8)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise Unreadable(path, f"decodes to more than {max_pixels:,} pixels (--max-pixels)") from None
        except Exception as exc:  # whatever the format's decoder raises for data cut short or damaged
            raise Unreadable(path, f"truncated or damaged image ({first_line(exc)})") from None


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]


def _cv2():
    try:
        import cv2
    except ImportError:
        raise FerTuneError(
            "face detection needs OpenCV 4 (pip install 'opencv-python-headless>=4.8,<5'), or pass --no-detect"
        ) from None
    if not hasattr(cv2, "CascadeClassifier"):
        raise FerTuneError(
            f"OpenCV {cv2.__version__} has no CascadeClassifier (OpenCV 5 removed it): pip install "
            "'opencv-python-headless>=4.8,<5', or pass --no-detect"
        )
    return cv2


class Detector:
    """OpenCV's frontal-face cascade with fer-tune's settings; detect(gray) -> boxes, largest first. Another detector
    is a subclass with its own `name`, `frame` and find()."""

    name = "cascade"
    min_score = 0.0  # the boxes kept: those whose score (find's last column) is at least this

    def __init__(
        self,
        cascade: str = CASCADE,
        scale_factor: float = SCALE_FACTOR,
        min_neighbors: int = MIN_NEIGHBORS,
        frame: tuple[float, float, float] = FRAME,
    ):
        cv2 = _cv2()
        self.cv2, self.scale_factor, self.min_neighbors, self.frame = cv2, scale_factor, min_neighbors, frame
        self.cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / cascade))
        if self.cascade.empty():
            raise FerTuneError(f"OpenCV's {cascade} cannot be loaded from {cv2.data.haarcascades}")

    def find(self, img: np.ndarray, side: int) -> np.ndarray:
        """(n, 5) float: x, y, w, h, score of the faces in `img` (as scored() prepares it) whose box framed as
        FER2013's is about `side` px or larger (a cascade's box is about FER2013's crop)."""
        found = self.cascade.detectMultiScale(
            self.cv2.equalizeHist(img),
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(side, side),
        )
        boxes = np.asarray(found, dtype=float).reshape(-1, 4)
        return np.hstack([boxes, np.ones((len(boxes), 1))])

    def scored(self, gray: np.ndarray) -> list[tuple[tuple[int, int, int, int], float]]:
        """Every box found (x, y, w, h in `gray`'s pixels) with its score, largest first: a small image is enlarged
        and padded with its border, a large one searched on a smaller copy."""
        cv2 = self.cv2
        h, w = gray.shape
        scale = min(max(1.0, DETECT_SIDE / min(h, w)), DETECT_MAX_SIDE / max(h, w))
        pad = int(round(PAD * max(h, w) * scale)) if scale > 1 else 0
        img = gray
        if scale > 1:
            img = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_CUBIC)
            img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        elif scale < 1:
            img = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        out = []
        for x, y, bw, bh, score in self.find(img, max(24, int(MIN_FACE * min(h, w) * scale))):
            x0, y0 = max(0.0, (x - pad) / scale), max(0.0, (y - pad) / scale)
            x1, y1 = min(float(w), (x + bw - pad) / scale), min(float(h), (y + bh - pad) / scale)
            if x1 - x0 >= 4 and y1 - y0 >= 4:
                box = (int(round(x0)), int(round(y0)), int(round(x1 - x0)), int(round(y1 - y0)))
                out.append((box, float(score)))
        return sorted(out, key=lambda bs: -bs[0][2] * bs[0][3])

    def detect(self, gray: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes (x, y, w, h) in `gray`'s pixels, largest first (a large image is searched on a smaller copy)."""
        return [box for box, score in self.scored(gray) if score >= self.min_score]

    def crop(self, gray: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """The face in `box`, framed as FER2013's faces are, as uint8 48x48 (the image's border extends it)."""
        return frame_crop(gray, box, self.frame)

    def faces(self, gray: np.ndarray) -> list[Face]:
        """Every face found; an image with none that is small and square enough to be a face crop is taken whole."""
        boxes = self.detect(gray)
        if looks_like_a_crop(gray) and (not boxes or max(boxes[0][2:]) * self.frame[2] < CROP_BOX * min(gray.shape)):
            return [whole(gray)]
        return [Face(b, self.crop(gray, b), True) for b in boxes]


class Mtcnn(Detector):
    """MTCNN: facenet-pytorch's P-, R- and O-Nets (their weights are inside its wheel), run with torch on the CPU on
    the grayscale image; the boxes whose O-Net face probability is at least `min_score`."""

    name = "mtcnn"

    def __init__(self, min_score: float = MTCNN_MIN_PROB, frame: tuple[float, float, float] = MTCNN_FRAME):
        self.cv2, self.min_score, self.frame = _cv2(), min_score, frame
        try:
            from facenet_pytorch.models.mtcnn import MTCNN

            self.net = MTCNN(keep_all=True, select_largest=False, device="cpu")
        except Exception as exc:  # not installed, its torch missing or broken, its weights unreadable
            raise FerTuneError(
                f"the mtcnn face detector cannot be loaded ({exc.__class__.__name__}: {first_line(exc)}): "
                f"{PACKAGES['mtcnn'][1]}, or pass --detector cascade"
            ) from None

    def find(self, img: np.ndarray, side: int) -> np.ndarray:
        self.net.min_face_size = max(MTCNN_MIN_BOX, side / self.frame[2])  # `side` as MTCNN's own box
        boxes, probs = self.net.detect(np.repeat(img[:, :, None], 3, axis=2))
        if boxes is None:
            return np.zeros((0, 5))
        b = np.asarray(boxes, dtype=float).reshape(-1, 4)
        return np.column_stack([b[:, :2], b[:, 2:] - b[:, :2], np.asarray(probs, dtype=float)])


def missing(name: str) -> list[str]:
    """The modules detector `name` needs that are not installed (looked up, not imported)."""
    import importlib.util

    return [m for m in PACKAGES.get(name, ((), ""))[0] if importlib.util.find_spec(m) is None]


def installed() -> list[str]:
    """The detectors whose packages are installed, best first: the default is the first."""
    return [d for d in DETECTORS if not missing(d)]


def load_detector(name: str | None = None) -> Detector:
    """The detector called `name` (one of DETECTORS), or the best one installed; FerTuneError, in one line, when it
    is unknown, not installed or cannot be loaded."""
    name = name or installed()[0]
    if name not in DETECTORS:
        raise FerTuneError(f"no face detector called {name!r} (detectors: {', '.join(DETECTORS)})")
    if name == "cascade":
        return Detector()
    if missing(name):
        raise FerTuneError(
            f"the {name} face detector needs {' and '.join(missing(name))}, not installed: {PACKAGES[name][1]}, "
            "or pass --detector cascade"
        )
    return Mtcnn()


def frame_crop(gray: np.ndarray, box: tuple[int, int, int, int], frame: tuple[float, float, float]) -> np.ndarray:
    import cv2

    x, y, w, h = box
    dx, dy, scale = frame
    side = max(w, h) * scale
    cx, cy = x + w / 2 + dx * w, y + h / 2 + dy * w
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = max(1, int(round(side)))
    H, W = gray.shape
    pad = max(0, -x0, -y0, x0 + s - W, y0 + s - H)
    src = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE) if pad else gray
    patch = src[y0 + pad : y0 + pad + s, x0 + pad : x0 + pad + s]
    interp = cv2.INTER_AREA if s > SIZE else cv2.INTER_LINEAR
    return cv2.resize(patch, (SIZE, SIZE), interpolation=interp)


def looks_like_a_crop(gray: np.ndarray) -> bool:
    h, w = gray.shape
    return max(h, w) <= CROP_SIDE and max(h, w) / min(h, w) <= CROP_ASPECT


def whole(gray: np.ndarray) -> Face:
    """The whole image as one face (today's behaviour for face crops): resized to 48x48."""
    from PIL import Image

    h, w = gray.shape
    pixels = np.asarray(Image.fromarray(gray).resize((SIZE, SIZE), Image.BILINEAR), dtype=np.uint8)
    return Face((0, 0, w, h), pixels, False)


def image_paths(items: list[str]) -> list[str]:
    """Images named on the command line: files as given, folders (their images, recursively, sorted) and glob
    patterns the shell left unexpanded; a name that is none of these stays (predict's check names it)."""
    import glob

    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FerTuneError(f"no images in {p} ({' '.join(IMAGE_SUFFIXES)})")
            out += found
        elif not p.exists() and glob.has_magic(item) and glob.glob(item, recursive=True):
            out += sorted(h for h in glob.glob(item, recursive=True) if Path(h).is_file())
        else:
            out.append(item)
    return out
