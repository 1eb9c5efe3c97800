"""Load and validate FER2013 (challenge CSV, Kaggle image folders) or the synthetic faces into one FerData.

Every source becomes uint8 images (N, 48, 48), labels 0-6 in the challenge order and, per image, its *origin*
(the challenge Usage, or the folder it came from). A named split protocol then maps origins to train/val/test:

- ``paper``    train = Training, val = PrivateTest, test = PublicTest   (usef-kh/fer; 73.28 % is on PublicTest)
- ``standard`` train = Training, val = PublicTest,  test = PrivateTest

Images without a challenge Usage (folders without ``Training_``/``PublicTest_``/``PrivateTest_`` prefixes) go to
train (from ``train/``) or test (from ``test/``); when no val images result, val is a seeded, stratified 10 % of
train. Parsed sources are cached (keyed by path, size and mtime) as .npy files, so a second load is fast.
"""

from __future__ import annotations

import gzip
import mmap
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .common import EMOTIONS, NUM_CLASSES, SPLITS, FerTuneError

SIZE = 48
NPIX = SIZE * SIZE
CACHE_VERSION = 1
DEFAULT_SYNTHETIC_N = 6000

# origin codes
TRAINING, PUBLIC, PRIVATE, TRAIN_DIR, TEST_DIR = range(5)
USAGES = {"training": TRAINING, "publictest": PUBLIC, "privatetest": PRIVATE}
PREFIXES = {"training_": TRAINING, "publictest_": PUBLIC, "privatetest_": PRIVATE}
PROTOCOLS = {
    # origin -> split index (0 train, 1 val, 2 test); TRAIN_DIR / TEST_DIR are the same in both
    "paper": {TRAINING: 0, PRIVATE: 1, PUBLIC: 2, TRAIN_DIR: 0, TEST_DIR: 2},
    "standard": {TRAINING: 0, PUBLIC: 1, PRIVATE: 2, TRAIN_DIR: 0, TEST_DIR: 2},
}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".pgm"}


@dataclass
class FerData:
    images: np.ndarray  # uint8 (N, 48, 48)
    labels: np.ndarray  # int64 (N,)
    split: np.ndarray  # int8 (N,): 0 train, 1 val, 2 test
    format: str  # csv | folders | synthetic
    source: str
    protocol: str
    protocol_note: str  # what the protocol meant for this source, in words
    fingerprint: str  # sha256 of the parsed images + labels + origins (first 16 hex digits)
    skipped: list[str] = field(default_factory=list)  # bad rows dropped by skip_bad_rows

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.split == SPLITS.index(split)
        return self.images[mask], self.labels[mask]

    def counts(self) -> dict:
        out = {}
        for i, name in enumerate(SPLITS):
            labels = self.labels[self.split == i]
            per = np.bincount(labels, minlength=NUM_CLASSES)
            out[name] = {"total": int(len(labels)), "per_class": {e: int(n) for e, n in zip(EMOTIONS, per)}}
        return out

    def describe(self) -> dict:
        """What results record about the data."""
        return {
            "format": self.format,
            "source": self.source,
            "protocol": self.protocol,
            "protocol_note": self.protocol_note,
            "fingerprint": self.fingerprint,
            "sizes": {name: int((self.split == i).sum()) for i, name in enumerate(SPLITS)},
        }


# ---------------------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------------------
def load(
    path: str | os.PathLike | None = None,
    protocol: str = "paper",
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    resize: bool = False,
    skip_bad_rows: bool = False,
    val_seed: int = 0,
) -> FerData:
    """Load a dataset. ``path``: a CSV (.csv/.csv.gz), a Kaggle folder, or ``synthetic[:N[:SEED]]`` / None."""
    if protocol not in PROTOCOLS:
        raise FerTuneError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    spec = "synthetic" if path is None else str(path)
    fmt, key_parts = _identify(spec)
    key_parts += [f"resize={resize}", f"skip={skip_bad_rows}", f"v={CACHE_VERSION}"]
    cached = _cache_read(cache_dir, key_parts) if use_cache else None
    if cached is None:
        if fmt == "synthetic":
            images, labels, origin, skipped = _load_synthetic(spec)
        elif fmt == "csv":
            images, labels, origin, skipped = parse_csv(Path(spec), skip_bad_rows=skip_bad_rows)
        else:
            images, labels, origin, skipped = parse_folders(Path(spec), resize=resize, skip_bad_rows=skip_bad_rows)
        digest = hashlib.sha256()
        for arr in (images, labels, origin):
            digest.update(np.ascontiguousarray(arr).tobytes())
        meta = {"fingerprint": digest.hexdigest()[:16], "skipped": skipped}
        if use_cache:
            _cache_write(cache_dir, key_parts, images, labels, origin, meta)
    else:
        images, labels, origin, meta = cached
    source = spec if fmt == "synthetic" else str(Path(spec).resolve())
    split, note = assign_splits(origin, labels, protocol, seed=val_seed, source=source)
    return FerData(images, labels, split, fmt, source, protocol, note, meta["fingerprint"], list(meta["skipped"]))


def assign_splits(origin: np.ndarray, labels: np.ndarray, protocol: str, *, seed: int = 0, source: str = "data"):
    table = PROTOCOLS[protocol]
    lut = np.array([table[o] for o in range(5)], dtype=np.int8)
    split = lut[origin]
    parts = {0: [], 1: [], 2: []}
    names = {TRAINING: "Training", PUBLIC: "PublicTest", PRIVATE: "PrivateTest", TRAIN_DIR: "train/", TEST_DIR: "test/"}
    for o in range(5):
        if (origin == o).any():
            parts[table[o]].append(names[o])
    if not (split == 1).any() and (split == 0).any():
        # no val images from the source: carve a seeded, stratified 10 % out of train
        rng = np.random.default_rng(seed)
        train_idx = np.flatnonzero(split == 0)
        for c in range(NUM_CLASSES):
            members = train_idx[labels[train_idx] == c]
            take = int(round(0.1 * len(members)))
            if take:
                split[rng.choice(members, size=take, replace=False)] = 1
        parts[1] = [f"10 % of {'+'.join(parts[0])} (stratified, seed {seed})"]
        parts[0] = [f"{'+'.join(parts[0])} (90 %)"]
    for i, name in enumerate(SPLITS):
        if not (split == i).any():
            wanted = {0: "Training rows or train/ images",
                      1: {"paper": "PrivateTest rows", "standard": "PublicTest rows"}[protocol]
                      + ", or enough train images to hold out a stratified 10 %",
                      2: {"paper": "PublicTest", "standard": "PrivateTest"}[protocol] + " rows or test/ images"}[i]
            raise FerTuneError(
                f"{source}: the {name} split is empty under protocol {protocol!r} (it needs {wanted}); "
                "check that the source holds all three challenge usages, or try --protocol standard/paper"
            )
    note = ", ".join(f"{name}={'+'.join(parts[i])}" for i, name in enumerate(SPLITS))
    return split, note


def is_synthetic(spec: str) -> bool:
    """True for a `--data` value that names the embedded synthetic faces (synthetic[:N[:SEED]])."""
    return spec == "synthetic" or spec.startswith("synthetic:")


def _identify(spec: str) -> tuple[str, list[str]]:
    if is_synthetic(spec):
        return "synthetic", [spec]
    path = Path(spec)
    if not path.exists():
        raise FerTuneError(
            f"data path {spec} does not exist; give a fer2013.csv(.gz), a Kaggle folder with train/ and test/, "
            "or 'synthetic'"
        )
    if path.is_dir():
        subdirs = {p.name.lower(): p for p in path.iterdir() if p.is_dir()}
        if "train" not in subdirs and "test" not in subdirs:
            raise FerTuneError(f"{spec}: a Kaggle image folder must contain train/ and/or test/ folders")
        stamp = []
        for top in sorted(subdirs):
            if top not in ("train", "test"):
                continue
            for entry in sorted(os.scandir(subdirs[top]), key=lambda e: e.name):
                if entry.is_dir():
                    for f in os.scandir(entry.path):
                        st = f.stat()
                        stamp.append(f"{top}/{entry.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}")
        h = hashlib.sha256("\n".join(sorted(stamp)).encode()).hexdigest()
        return "folders", [str(path.resolve()), h]
    name = path.name.lower()
    if not (name.endswith(".csv") or name.endswith(".csv.gz")):
        raise FerTuneError(f"{spec}: expected a .csv or .csv.gz file, a Kaggle folder, or 'synthetic'")
    st = path.stat()
    return "csv", [str(path.resolve()), str(st.st_size), str(st.st_mtime_ns)]


# ---------------------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------------------
def parse_synthetic_spec(spec: str) -> tuple[int, int]:
    parts = spec.split(":")[1:]
    try:
        n = int(parts[0]) if parts and parts[0] else DEFAULT_SYNTHETIC_N
        seed = int(parts[1]) if len(parts) > 1 else 0
        if n < 100 or len(parts) > 2:
            raise ValueError
    except ValueError:
        raise FerTuneError(f"bad synthetic data spec {spec!r}: use synthetic, synthetic:N or synthetic:N:SEED (N >= 100)")
    return n, seed


def _load_synthetic(spec: str):
    from .synthetic import generate_dataset_arrays

    n, seed = parse_synthetic_spec(spec)
    images, labels, usage = generate_dataset_arrays(n, seed)
    origin = np.array([USAGES[str(u).lower()] for u in usage], dtype=np.int8)
    return images, labels.astype(np.int64), origin, []


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


def parse_csv(path: Path, *, skip_bad_rows: bool = False):
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
        field = lambda k: (cuts[k] + 1, cuts[k + 1])  # noqa: E731
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with opener(tmp, "wb") as fh:
            fh.write(b"emotion,pixels,Usage\n")
            for img, lab, use in zip(images, labels, usage):
                fh.write(b"%d,%s,%s\n" % (int(lab), b" ".join(map(table.__getitem__, img.reshape(-1).tolist())),
                                           str(use).encode()))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


ORIGIN_USAGE = {TRAINING: "Training", PUBLIC: "PublicTest", PRIVATE: "PrivateTest"}


def origins_as_usage(data: FerData) -> list[str]:
    """Usage column for data convert: the protocol's splits named as challenge usages."""
    by_split = {"paper": ["Training", "PrivateTest", "PublicTest"], "standard": ["Training", "PublicTest", "PrivateTest"]}
    names = by_split[data.protocol]
    return [names[s] for s in data.split]


# ---------------------------------------------------------------------------------------------------------
# Kaggle image folders
# ---------------------------------------------------------------------------------------------------------
def parse_folders(root: Path, *, resize: bool = False, skip_bad_rows: bool = False):
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


# ---------------------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    env = os.environ.get("FER_TUNE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fer-tune"


def _cache_path(cache_dir, key_parts: list[str]) -> Path:
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:24]
    return Path(cache_dir or default_cache_dir()) / key


def _cache_read(cache_dir, key_parts):
    d = _cache_path(cache_dir, key_parts)
    try:
        meta = json.loads((d / "meta.json").read_text())
        arrays = [np.load(d / f"{name}.npy", allow_pickle=False) for name in ("images", "labels", "origin")]
    except (OSError, ValueError):
        return None
    if meta.get("key") != key_parts:
        return None
    return (*arrays, meta)


def _cache_write(cache_dir, key_parts, images, labels, origin, meta) -> None:
    d = _cache_path(cache_dir, key_parts)
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}."))
        for name, arr in (("images", images), ("labels", labels), ("origin", origin)):
            np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps({**meta, "key": key_parts}))
        if d.exists():
            import shutil

            shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    except OSError:
        pass  # a cache that cannot be written is only slower, never wrong
