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

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .common import EMOTIONS, NUM_CLASSES, SPLITS, FerTuneError
from .formats import PRIVATE, PUBLIC, TEST_DIR, TRAIN_DIR, TRAINING, USAGES, parse_csv, parse_folders

CACHE_VERSION = 1
DEFAULT_SYNTHETIC_N = 6000

PROTOCOLS = {
    # origin -> split index (0 train, 1 val, 2 test); TRAIN_DIR / TEST_DIR are the same in both
    "paper": {TRAINING: 0, PRIVATE: 1, PUBLIC: 2, TRAIN_DIR: 0, TEST_DIR: 2},
    "standard": {TRAINING: 0, PUBLIC: 1, PRIVATE: 2, TRAIN_DIR: 0, TEST_DIR: 2},
}


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
            # images per emotion of each split: the report's majority-class rate (a collapsed model's score)
            "class_counts": {name: c["per_class"] for name, c in self.counts().items()},
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
    fmt, key_parts = identify(spec)
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


def assign_splits(
    origin: np.ndarray, labels: np.ndarray, protocol: str, *, seed: int = 0, source: str = "data"
) -> np.ndarray:
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
            wanted = {
                0: "Training rows or train/ images",
                1: {"paper": "PrivateTest rows", "standard": "PublicTest rows"}[protocol]
                + ", or enough train images to hold out a stratified 10 %",
                2: {"paper": "PublicTest", "standard": "PrivateTest"}[protocol] + " rows or test/ images",
            }[i]
            raise FerTuneError(
                f"{source}: the {name} split is empty under protocol {protocol!r} (it needs {wanted}); "
                "check that the source holds all three challenge usages, or try --protocol standard/paper"
            )
    note = ", ".join(f"{name}={'+'.join(parts[i])}" for i, name in enumerate(SPLITS))
    return split, note


def is_synthetic(spec: str) -> bool:
    """True for a `--data` value that names the embedded synthetic faces (synthetic[:N[:SEED]])."""
    return spec == "synthetic" or spec.startswith("synthetic:")


def identify(spec: str) -> tuple[str, list[str]]:
    """(format, the parts the cache key is made of) of a `--data` value; FerTuneError when it names nothing usable."""
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
        raise FerTuneError(
            f"bad synthetic data spec {spec!r}: use synthetic, synthetic:N or synthetic:N:SEED (N >= 100)"
        ) from None
    return n, seed


def _load_synthetic(spec: str):
    from .synthetic import generate_dataset_arrays

    n, seed = parse_synthetic_spec(spec)
    images, labels, usage = generate_dataset_arrays(n, seed)
    origin = np.array([USAGES[str(u).lower()] for u in usage], dtype=np.int8)
    return images, labels.astype(np.int64), origin, []


ORIGIN_USAGE = {TRAINING: "Training", PUBLIC: "PublicTest", PRIVATE: "PrivateTest"}


def origins_as_usage(data: FerData) -> list[str]:
    """Usage column for data convert: the protocol's splits named as challenge usages."""
    by_split = {
        "paper": ["Training", "PrivateTest", "PublicTest"],
        "standard": ["Training", "PublicTest", "PrivateTest"],
    }
    names = by_split[data.protocol]
    return [names[s] for s in data.split]


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
