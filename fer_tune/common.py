"""Names shared by every stage: the class list and the one user-error type."""

from __future__ import annotations

import json
from pathlib import Path

# FER2013 challenge label order.
EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_CLASSES = len(EMOTIONS)
SPLITS: tuple[str, ...] = ("train", "val", "test")
# the model zoo's names (fer_tune.models builds them); here so that validating a config needs no torch import
MODEL_NAMES: tuple[str, ...] = ("vgg_variant", "vgg16", "resnet50", "efficientnet_b3")


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
