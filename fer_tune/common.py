"""Names shared by every stage: the class list and the one user-error type."""

from __future__ import annotations

import json
import re
from pathlib import Path

# FER2013 challenge label order.
EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_CLASSES = len(EMOTIONS)
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


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (a temp file beside it, then rename): a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
