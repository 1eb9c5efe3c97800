import os
from pathlib import Path

import numpy as np
import pytest

# the real FER2013 for the tests that need it (skipped when absent): $FER2013_DIR, else ../shared/datasets/fer2013
REAL_DATA = Path(os.environ.get("FER2013_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
                 / "fer2013")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own dataset cache, never ~/.cache."""
    monkeypatch.setenv("FER_TUNE_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(1)


def rows(n, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 48, 48), dtype=np.uint8)
    labels = np.arange(n) % 7
    return images, labels


def write_challenge_csv(path, n_per_usage=(14, 7, 7), seed=0, mutate=None):
    """A small challenge CSV; `mutate(lines)` may edit the text lines (index 0 = header)."""
    images, labels = rows(sum(n_per_usage), seed)
    usage = ["Training"] * n_per_usage[0] + ["PublicTest"] * n_per_usage[1] + ["PrivateTest"] * n_per_usage[2]
    lines = ["emotion,pixels,Usage"] + [
        f"{l},{' '.join(map(str, img.reshape(-1)))},{u}" for img, l, u in zip(images, labels, usage)
    ]
    if mutate:
        mutate(lines)
    Path(path).write_text("\n".join(lines) + "\n")
    return images, labels, usage
