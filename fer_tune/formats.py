"""FER2013's two file formats: the challenge CSV (emotion, pixels, Usage) and the Kaggle image folders
(train/ and test/, one folder per emotion), read into uint8 images (N, 48, 48), labels and origins.

The CSV is parsed in chunks on threads straight from a memory map; folders are decoded with PIL.
"""

from __future__ import annotations

import gzip
import mmap
import os
from pathlib import Path

import numpy as np

from .common import EMOTIONS, NUM_CLASSES, FerTuneError, atomic_path

SIZE = 48
NPIX = SIZE * SIZE

# origin codes
TRAINING, PUBLIC, PRIVATE, TRAIN_DIR, TEST_DIR = range(5)
USAGES = {"training": TRAINING, "publictest": PUBLIC, "privatetest": PRIVATE}
PREFIXES = {"training_": TRAINING, "publictest_": PUBLIC, "privatetest_": PRIVATE}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".pgm"}


# ---------------------------------------------------------------------------------------------------------
# challenge CSV
# ---------------------------------------------------------------------------------------------------------
def _read_bytes(path: Path):
    """The file's bytes: a read-only mmap for a plain file (no 300 MB copy), the inflated bytes for .gz."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return b""
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, EOFError, ValueError) as exc:
        raise FerTuneError(f"{path}: cannot read the file ({exc})") from None


def parse_csv(path: Path, *, skip_bad_rows: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Parse the challenge CSV (columns emotion, pixels, Usage in any order).

    Rows are located with bytes.find (no per-line copies); the pixel strings are parsed in chunks of rows by
    a vectorized digit parser on worker threads (numpy releases the GIL). A chunk that fails the fast path's
    checks is re-parsed row by row to name the exact line and problem.
    """
    raw = _read_bytes(path)
    n = len(raw)
    pos = 0
    while pos < n and raw[pos : pos + 1].isspace():
        pos += 1
    if pos >= n:
        raise FerTuneError(f"{path}: the file is empty")
    eol = raw.find(b"\n", pos)
    eol = n if eol < 0 else eol
    header = [c.strip().strip(b'"').decode("utf-8", "replace").lower() for c in raw[pos:eol].split(b",")]
    missing = [c for c in ("emotion", "pixels", "usage") if c not in header]
    if missing:
        raise FerTuneError(
            f"{path}: header has columns {header}; missing {', '.join(missing)} "
            "(the challenge CSV has emotion,pixels,Usage)"
        )
    ci, pi, ui = header.index("emotion"), header.index("pixels"), header.index("usage")
    ncol = len(header)
    lineno = bytes(raw[:eol]).count(b"\n") + 1

    bad: dict[int, str] = {}  # line number -> reason
    lines, labels, origins, spans = [], [], [], []
    pos = eol + 1
    while pos < n:
        eol = raw.find(b"\n", pos)
        eol = n if eol < 0 else eol
        lineno += 1
        end = eol - 1 if eol > pos and raw[eol - 1] == 13 else eol
        start, pos = pos, eol + 1
        if end <= start or not raw[start:end].strip():
            continue
        cuts = [start - 1]
        for _ in range(ncol - 1):
            c = raw.find(b",", cuts[-1] + 1, end)
            if c < 0:
                break
            cuts.append(c)
        if len(cuts) != ncol or raw.find(b",", cuts[-1] + 1, end) >= 0:
            nf = raw[start:end].count(b",") + 1
            bad[lineno] = f"has {nf} fields, expected {ncol}"
            continue
        cuts.append(end)
        field = lambda k: (cuts[k] + 1, cuts[k + 1])  # noqa: E731, B023  (called in this iteration only)
        a, b = field(ci)
        emo = raw[a:b].strip().strip(b'"')
        if not emo.isdigit() or not 0 <= int(emo) < NUM_CLASSES:
            bad[lineno] = f"emotion label {emo.decode('utf-8', 'replace')!r} is not an integer 0-6"
            continue
        a, b = field(ui)
        usage = raw[a:b].strip().strip(b'"').decode("utf-8", "replace")
        if usage.lower() not in USAGES:
            bad[lineno] = f"unknown Usage {usage!r} (expected Training, PublicTest or PrivateTest)"
            continue
        a, b = field(pi)
        while a < b and raw[a] in b' "\t':
            a += 1
        while b > a and raw[b - 1] in b' "\t':
            b -= 1
        lines.append(lineno)
        labels.append(int(emo))
        origins.append(USAGES[usage.lower()])
        spans.append((a, b))
    if not lines and not bad:
        raise FerTuneError(f"{path}: the file has a header but no data rows")

    images = np.zeros((len(spans), SIZE, SIZE), dtype=np.uint8)
    row_errors: dict[int, str] = {}
    chunk = 256
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for errs in pool.map(lambda i: _parse_chunk(raw, spans, i, i + chunk, images), range(0, len(spans), chunk)):
            row_errors.update(errs)
    for k, reason in row_errors.items():
        bad[lines[k]] = reason
    keep = np.ones(len(spans), dtype=bool)
    keep[list(row_errors)] = False
    if bad and not skip_bad_rows:
        first = sorted(bad)[:3]
        more = f" (and {len(bad) - len(first)} more bad rows)" if len(bad) > len(first) else ""
        detail = "; ".join(f"line {ln}: {bad[ln]}" for ln in first)
        raise FerTuneError(f"{path}: {detail}{more}. Fix the file, or pass --skip-bad-rows to drop bad rows.")
    if not keep.any():
        raise FerTuneError(f"{path}: no valid rows left after skipping {len(bad)} bad rows")
    skipped = [f"line {ln}: {bad[ln]}" for ln in sorted(bad)]
    return (images[keep], np.array(labels, dtype=np.int64)[keep], np.array(origins, dtype=np.int8)[keep], skipped)


def _parse_chunk(raw, spans, lo: int, hi: int, images: np.ndarray) -> dict[int, str]:
    """Parse rows lo..hi into images[lo:hi]; returns {row index: reason} for bad rows."""
    spans = spans[lo:hi]
    rows = len(spans)
    # fast path: only digits and spaces, exactly 2304 tokens of 1-3 digits per row, every value <= 255
    mv = memoryview(raw)
    buf = np.frombuffer(b"   " + b" ".join([mv[a:b] for a, b in spans]) + b" ", dtype=np.uint8)
    d = buf - np.uint8(48)
    isd = d < 10
    if np.count_nonzero(isd) + np.count_nonzero(buf == 32) == len(buf):
        e = np.flatnonzero(isd[:-1] > isd[1:])  # last digit of each token
        if len(e) == rows * NPIX:
            # row k occupies buf[first[k]:stop[k]]; if its 1st..2304th token ends all fall inside it for every
            # row, and the total is rows * 2304, every row has exactly 2304 tokens
            width = np.fromiter((b - a for a, b in spans), dtype=np.int64, count=rows)
            stop = 3 + np.cumsum(width + 1) - 1
            first = stop - width
            ends = e.reshape(rows, NPIX)
            if (ends[:, 0] >= first).all() and (ends[:, -1] < stop).all():
                m1, m2 = isd[e - 1], isd[e - 2]
                if not (m1 & m2 & isd[e - 3]).any():  # no token longer than 3 digits
                    v = d[e].astype(np.uint16)
                    v += m1 * (np.uint16(10) * d[e - 1])
                    v += (m1 & m2) * (np.uint16(100) * d[e - 2])
                    if v.max(initial=0) <= 255:
                        images[lo:hi] = v.astype(np.uint8).reshape(rows, SIZE, SIZE)
                        return {}
    # slow path: row by row, naming the problem
    errors = {}
    for k, (a, b) in enumerate(spans):
        tokens = bytes(raw[a:b]).split()
        wrong = next((t for t in tokens if not t.isdigit()), None)
        if wrong is not None:
            errors[lo + k] = f"pixel value {wrong.decode('utf-8', 'replace')[:20]!r} is not an integer 0-255"
        elif len(tokens) != NPIX:
            errors[lo + k] = f"pixels has {len(tokens)} values, expected {NPIX} (48x48)"
        else:
            vals = np.array([int(t) for t in tokens])
            if vals.max() > 255:
                errors[lo + k] = "a pixel value is outside 0-255"
            else:
                images[lo + k] = vals.astype(np.uint8).reshape(SIZE, SIZE)
    return errors


def write_csv(path: Path, images: np.ndarray, labels: np.ndarray, usage: list[str] | np.ndarray) -> None:
    """Write the challenge CSV format (emotion,pixels,Usage), atomically."""
    table = [str(i).encode() for i in range(256)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    with atomic_path(path) as tmp, opener(tmp, "wb") as fh:
        fh.write(b"emotion,pixels,Usage\n")
        for img, lab, use in zip(images, labels, usage):
            fh.write(
                b"%d,%s,%s\n"
                % (int(lab), b" ".join(map(table.__getitem__, img.reshape(-1).tolist())), str(use).encode())
            )


# ---------------------------------------------------------------------------------------------------------
# Kaggle image folders
# ---------------------------------------------------------------------------------------------------------
def parse_folders(
    root: Path, *, resize: bool = False, skip_bad_rows: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    items: list[tuple[Path, int, int]] = []
    for top in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in ("train", "test")):
        for cls_dir in sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")):
            name = cls_dir.name.lower()
            if name not in EMOTIONS:
                raise FerTuneError(
                    f"{cls_dir}: unknown emotion folder {cls_dir.name!r}; expected one of {', '.join(EMOTIONS)}"
                )
            label = EMOTIONS.index(name)
            for f in sorted(cls_dir.iterdir()):
                if f.suffix.lower() not in IMAGE_EXTS or f.name.startswith("."):
                    continue
                lower = f.name.lower()
                origin = next((o for p, o in PREFIXES.items() if lower.startswith(p)), None)
                if origin is None:
                    origin = TRAIN_DIR if top.name.lower() == "train" else TEST_DIR
                items.append((f, label, origin))
    if not items:
        raise FerTuneError(f"{root}: no images found under train/<emotion>/ or test/<emotion>/")
    images = np.zeros((len(items), SIZE, SIZE), dtype=np.uint8)
    keep = np.ones(len(items), dtype=bool)
    bad: list[str] = []
    for i, (f, _, _) in enumerate(items):
        try:
            with Image.open(f) as im:
                im.load()
                img = im.convert("L")
        except Exception as exc:  # PIL raises many types for corrupt files
            bad.append(f"{f}: unreadable or truncated image ({exc.__class__.__name__}: {exc})")
            keep[i] = False
            continue
        if img.size != (SIZE, SIZE):
            if not resize:
                bad.append(f"{f}: image is {img.size[0]}x{img.size[1]}, expected 48x48 (pass --resize to resize)")
                keep[i] = False
                continue
            img = img.resize((SIZE, SIZE), Image.BILINEAR)
        images[i] = np.asarray(img, dtype=np.uint8)
    if bad and not skip_bad_rows:
        more = f" (and {len(bad) - 1} more bad files)" if len(bad) > 1 else ""
        raise FerTuneError(f"{bad[0]}{more}. Fix or remove it, or pass --skip-bad-rows to drop bad files.")
    labels = np.array([it[1] for it in items], dtype=np.int64)[keep]
    origin = np.array([it[2] for it in items], dtype=np.int8)[keep]
    if len(labels) == 0:
        raise FerTuneError(f"{root}: no readable images left after skipping {len(bad)} bad files")
    return images[keep], labels, origin, bad
