import numpy as np
import pytest
from PIL import Image

from fer_tune.common import EMOTIONS, NUM_CLASSES
from fer_tune.synthetic import CLASS_FREQUENCIES, LABEL_WIDTH, contact_sheet, generate, generate_dataset_arrays


@pytest.fixture(scope="module")
def big():
    return generate(20000, seed=0)


def test_class_frequencies_constant():
    assert CLASS_FREQUENCIES.shape == (NUM_CLASSES,)
    assert CLASS_FREQUENCIES.sum() == pytest.approx(1.0)
    assert np.argmin(CLASS_FREQUENCIES) == EMOTIONS.index("disgust")
    assert np.argmax(CLASS_FREQUENCIES) == EMOTIONS.index("happy")
    assert CLASS_FREQUENCIES[EMOTIONS.index("happy")] == pytest.approx(7215 / 28709)


def test_shape_dtype():
    x, y = generate(10, seed=3)
    assert x.shape == (10, 48, 48) and x.dtype == np.uint8
    assert y.shape == (10,) and y.dtype == np.int64
    assert y.min() >= 0 and y.max() < NUM_CLASSES
    x0, y0 = generate(0)
    assert x0.shape == (0, 48, 48) and y0.shape == (0,)


def test_deterministic_and_seed_sensitive():
    a, la = generate(300, seed=7)  # > one render chunk
    b, lb = generate(300, seed=7)
    assert a.tobytes() == b.tobytes() and np.array_equal(la, lb)
    c, lc = generate(300, seed=8)
    assert not np.array_equal(a, c) and not np.array_equal(la, lc)


def test_class_frequencies_sampled(big):
    _, y = big
    freq = np.bincount(y, minlength=NUM_CLASSES) / len(y)
    np.testing.assert_allclose(freq, CLASS_FREQUENCIES, atol=0.01)
    assert np.argmin(freq) == EMOTIONS.index("disgust")
    assert np.argmax(freq) == EMOTIONS.index("happy")


def test_images_not_degenerate(big):
    x, y = big
    x = x[:5000].astype(np.float32)
    y = y[:5000]
    assert x.std() > 20
    assert np.median(x.reshape(len(x), -1).std(axis=1)) > 15  # each face has contrast
    means = np.stack([x[y == k].mean(axis=0) for k in range(NUM_CLASSES)])
    # every pair of class-mean images differs somewhere by a visible amount
    for i in range(NUM_CLASSES):
        for j in range(i + 1, NUM_CLASSES):
            assert np.abs(means[i] - means[j]).max() > 5, (EMOTIONS[i], EMOTIONS[j])


def test_dataset_arrays_usage_split():
    n = 3000
    x, y, usage = generate_dataset_arrays(n, seed=4)
    gx, gy = generate(n, seed=4)
    assert np.array_equal(x, gx) and np.array_equal(y, gy)
    assert usage.shape == (n,)
    assert set(usage.tolist()) == {"Training", "PublicTest", "PrivateTest"}
    frac = {u: np.mean(usage == u) for u in ("Training", "PublicTest", "PrivateTest")}
    assert frac["Training"] == pytest.approx(0.8, abs=0.01)
    assert frac["PublicTest"] == pytest.approx(0.1, abs=0.01)
    assert frac["PrivateTest"] == pytest.approx(0.1, abs=0.01)
    for k in range(NUM_CLASSES):  # stratified: each class is split too
        assert np.mean(usage[y == k] == "Training") == pytest.approx(0.8, abs=0.05)
    _, _, usage2 = generate_dataset_arrays(n, seed=4)
    assert np.array_equal(usage, usage2)


def test_contact_sheet(tmp_path):
    x, y = generate(400, seed=1)
    path = tmp_path / "sheet.png"
    contact_sheet(x, y, path, per_class=5)
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (LABEL_WIDTH + 5 * 96, NUM_CLASSES * 96)  # label column + 5 faces at x2
        arr = np.asarray(im)
    assert arr[:, -96:].std() > 10  # the last column holds faces
