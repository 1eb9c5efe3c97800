"""Names shared by every stage: the class list and the one user-error type."""

from __future__ import annotations

# FER2013 challenge label order.
EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_CLASSES = len(EMOTIONS)
SPLITS: tuple[str, ...] = ("train", "val", "test")


class FerTuneError(Exception):
    """A mistake the user can fix (bad input file, bad option, missing study...).

    The CLI turns it into one clear message on stderr and exit code 2; library callers can catch it.
    """
