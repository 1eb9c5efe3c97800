"""Names shared by every stage: the class list and the one user-error type."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# FER2013 challenge label order.
EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
EXPORTS = ("model.pt", "model.pt2", "model.onnx", "model.json")  # a model exported for use (fer_tune.export)
NUM_CLASSES = len(EMOTIONS)
SQLITE_FULL = "database or disk is full"  # sqlite's words for a full disk (no errno in its error)
SPLITS: tuple[str, ...] = ("train", "val", "test")
# the model zoo's names (fer_tune.models builds them); here so that validating a config needs no torch import
MODEL_NAMES: tuple[str, ...] = ("vgg_variant", "vgg16", "resnet50", "efficientnet_b3")


# study and final-stage names: they become directories, Ray storage prefixes (s3://BUCKET/PREFIX/NAME) and Optuna
# study names, so nothing that a shell, a URL or a path would read as something else
NAME_RULE = "use letters, digits, '.', '_' and '-' (at most 128), not starting with '.' or '-'"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def is_plain_name(name: object) -> bool:
    return isinstance(name, str) and _PLAIN_NAME.fullmatch(name) is not None


class FerTuneError(Exception):
    """A mistake the user can fix (bad input file, bad option, missing study...).

    The CLI turns it into one clear message on stderr and exit code 2; library callers can catch it.
    """


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to, renamed onto `path` when the block ends: a kill never leaves
    half a file (the one way fer-tune writes its files). A failed block removes it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a file's text or bytes atomically (see atomic_path)."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (see write_atomic)."""
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


@functools.lru_cache(maxsize=1)
def code_revision() -> dict | None:
    """{"sha": the git commit of this fer_tune's checkout, "dirty": whether it has uncommitted changes}, recorded in
    every result; None for an installed package (no checkout) or where git is missing."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": sha, "dirty": bool(dirty)}


_SHIPPED = {"search_spaces": "search_spaces", "reference": "results/reference"}  # in the repository


def shipped(name: str) -> Path:
    """A folder of data that ships with fer-tune: "search_spaces" (the repository's search_spaces/) or "reference"
    (its results/reference/, published numbers). An installed wheel holds them as package data (fer_tune/NAME/,
    see pyproject.toml); a checkout (an editable install) reads the repository's folders."""
    here = Path(__file__).resolve().parent
    inside = here / name
    return inside if inside.is_dir() else here.parent / _SHIPPED[name]
