"""Procedural cartoon faces: the embedded stand-in for FER2013 (which cannot ship with the product).

Every image is a 48x48 grayscale face drawn from per-image parameters with numpy only, vectorised
over the batch (in small chunks of ``_CHUNK`` images to bound memory):

* Geometry. Each pixel (x, y) is mapped into a canonical face frame (u right, v down, face centre at
  the origin, ~1 unit per pixel at scale 1) through the inverse of a random shift, scale and small
  rotation. Every part is a signed-distance function of (u, v) turned into a soft (anti-aliased)
  mask: face ellipse, hair cap, eyes, brows, nose, mouth, disgust wrinkles.
* Expression. Each class is a target vector of facial parameters (mouth curvature / width /
  opening / asymmetry, brow slant / height, eye opening, nose wrinkle); an image gets
  ``neutral + t * (target - neutral) + personal jitter`` with a random intensity ``t``, so subtle
  faces of different classes overlap and the task is learnable but not trivial:
  angry = brows slanted down to the centre, lowered, narrowed eyes, tight mouth;
  disgust = nose wrinkle, one-sided raised upper lip, lowered brows;
  fear = raised brows slanted up to the centre, wide eyes, wide-open stretched mouth;
  happy = upturned (sometimes open) smile, narrowed eyes;
  sad = brows slanted up to the centre, downturned mouth;
  surprise = raised brows, wide eyes, small round open mouth;
  neutral = straight mouth, level brows.
* Nuisances. Face shape, skin / hair / background tone, lighting gradient, gaussian noise and, for
  some images, an occluder (a rectangle or a full-width bar of random gray).

Labels follow FER2013's train-set class frequencies (``CLASS_FREQUENCIES``; disgust rare).
Everything is drawn from one ``np.random.default_rng(seed)``: same seed -> byte-identical output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import EMOTIONS, NUM_CLASSES

_COUNTS = np.array([3995, 436, 4097, 7215, 4830, 3171, 4965], dtype=np.float64)  # FER2013 train
CLASS_FREQUENCIES: np.ndarray = _COUNTS / _COUNTS.sum()

SIZE = 48
# Images per render pass. Each temporary stays < 128 KiB, so malloc reuses heap memory instead of
# mmap / trim page faults (faster than larger chunks: benchmarks/bench_synthetic.py, RESULTS.md "Data layer").
_CHUNK = 8
USAGES = ("Training", "PublicTest", "PrivateTest")
LABEL_WIDTH = 72  # contact sheet: pixels left of the faces for the class name

# Expression targets per class (challenge order), at full intensity.
# columns: mouth curve (+ = corners up), mouth half-width, mouth opening (half-height),
# upper-lip asymmetry, brow slope (+ = inner ends up), brow raise (+ = up), eye opening, wrinkle
_PARAMS = ("curve", "mwidth", "mopen", "asym", "bslope", "braise", "eye", "wrinkle")
_TARGETS = np.array(
    [
        [-1.0, 5.0, 0.0, 0.0, -0.55, -1.8, 0.75, 0.0],  # angry
        [-1.2, 5.5, 0.6, 2.6, -0.20, -1.2, 0.65, 1.0],  # disgust
        [-1.0, 7.5, 2.6, 0.0, 0.35, 2.2, 1.60, 0.0],  # fear
        [3.6, 7.5, 1.0, 0.0, 0.00, 0.4, 0.50, 0.0],  # happy
        [-2.8, 5.5, 0.0, 0.0, 0.45, 0.4, 0.80, 0.0],  # sad
        [0.0, 3.4, 4.0, 0.0, 0.00, 3.2, 1.70, 0.0],  # surprise
        [0.0, 6.0, 0.0, 0.0, 0.00, 0.0, 1.00, 0.0],  # neutral
    ],
    dtype=np.float32,
)
_NEUTRAL = _TARGETS[EMOTIONS.index("neutral")]
# Personal (class-independent) jitter, std per parameter.
_JITTER = np.array([0.7, 0.7, 0.35, 0.4, 0.12, 0.9, 0.15, 0.15], dtype=np.float32)
_MINS = np.array([-9, 2.5, 0, 0, -1, -9, 0.3, 0], dtype=np.float32)


def _soft(d: np.ndarray, s: np.ndarray, width: float | np.ndarray = 0.0) -> np.ndarray:
    """Anti-aliased mask of the region ``d < width`` (``d`` in face units, ``s`` pixels per unit)."""
    return np.clip((width * s + 0.5) - d * s, 0.0, 1.0)


def _ellipse(u2: np.ndarray, v2: np.ndarray, a: np.ndarray, b: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Soft ellipse mask from squared coordinates; (r^2 - 1) / 2 * min(a, b) approximates the SDF."""
    k = 0.5 * np.minimum(a, b) * s
    return np.clip((k + 0.5) - (u2 * (k / (a * a)) + v2 * (k / (b * b))), 0.0, 1.0)


def _sample_params(n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    labels = rng.choice(NUM_CLASSES, size=n, p=CLASS_FREQUENCIES).astype(np.int64)
    f32 = np.float32

    def u(lo, hi):
        return rng.uniform(lo, hi, n).astype(f32)

    t = rng.beta(1.6, 1.2, n).astype(f32) * f32(0.9) + f32(0.1)  # expression intensity
    expr = _NEUTRAL + t[:, None] * (_TARGETS[labels] - _NEUTRAL)
    expr = np.maximum(expr + rng.standard_normal((n, len(_PARAMS)), dtype=f32) * _JITTER, _MINS)
    p = {name: expr[:, i] for i, name in enumerate(_PARAMS)}
    p.update(
        cx=u(19.0, 29.0),
        cy=u(20.0, 30.0),
        scale=u(0.8, 1.3),
        rot=u(-0.3, 0.3),
        fa=u(13.0, 16.5),
        fb=u(17.0, 20.5),  # face ellipse half-axes
        skin=u(110, 220),
        bg=u(10, 245),
        hair=u(5, 90),
        has_hair=(rng.random(n) < 0.75).astype(f32),
        hairline=u(-15.5, -10.0),
        side=np.where(rng.random(n) < 0.5, -1, 1).astype(f32),
        light=u(-0.35, 0.35),
        light_dir=u(0, 2 * np.pi),
        noise=u(3, 20),
        occ=rng.random(n) < 0.35,
        occ_val=u(0, 255),
    )
    # occluder rectangles (integer pixel bounds); 40 % of them are full-width bars
    bar = rng.random(n) < 0.4
    x0, y0 = rng.integers(-4, 40, n), rng.integers(-4, 40, n)
    w, h = rng.integers(8, 23, n), np.where(bar, rng.integers(3, 8, n), rng.integers(6, 19, n))
    p.update(
        ox0=np.where(bar, 0, x0.clip(0)),
        ox1=np.where(bar, SIZE, (x0 + w).clip(0)),
        oy0=y0.clip(0),
        oy1=(y0 + h).clip(0),
    )
    return labels, p


def _render(p: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    m = len(p["cx"])
    c = {k: v.reshape(m, 1, 1) for k, v in p.items()}
    s = c["scale"]
    grid = np.arange(SIZE, dtype=np.float32) + np.float32(0.5)
    xx, yy = grid[None, None, :], grid[None, :, None]  # separable: per-row / per-column terms are cheap
    dx, dy = xx - c["cx"], yy - c["cy"]
    cos, sin = np.cos(c["rot"]) / s, np.sin(c["rot"]) / s
    u, v = dx * cos + dy * sin, dy * cos - dx * sin  # canonical face frame
    au, u2, v2 = np.abs(u), u * u, v * v

    # face, hair cap (inside a slightly larger ellipse, above a curved hairline)
    face = _ellipse(u2, v2, c["fa"], c["fb"], s)
    hair = _ellipse(u2, v2, c["fa"] + 2.0, c["fb"] + 2.5, s) * c["has_hair"]
    hair *= _soft(v - u2 * (0.24 / c["fa"]), s, c["hairline"])
    img = c["bg"] + face * (c["skin"] - c["bg"])
    img += hair * (c["hair"] - img)

    # eyes (symmetric in |u|), opening scaled by `eye`
    ex = au - 6.0
    eh = 1.7 * c["eye"]
    dark = 0.85 * _ellipse(ex * ex, (v + 3.0) ** 2, np.float32(3.0), eh, s)
    # brows: thick segment v = -8 - raise - slope * (6 - |u|) for |u| in [2.5, 9.5]
    d = np.abs(v + (8.0 + c["braise"] + 6.0 * c["bslope"]) - c["bslope"] * au)
    dark = np.maximum(dark, 0.8 * _soft(np.maximum(d, np.abs(ex) - 2.6), s, 0.9))
    # nose shadow; disgust wrinkles: two short lines across the bridge
    dark = np.maximum(dark, 0.35 * _ellipse(u2, (v - 3.5) ** 2, np.float32(2.2), np.float32(1.0), s))
    d = np.maximum(np.abs(np.abs(v + 0.5) - 1.2), au - 2.2)
    dark = np.maximum(dark, (0.6 * np.minimum(c["wrinkle"], 1.0)) * _soft(d, s, 0.4))
    # mouth: a curve (corners up by `curve`, one side raised by `asym`) opened into a bent ellipse
    un = u * (1.0 / c["mwidth"])
    un2 = un * un
    centre = (10.0 - c["curve"] * un2) - c["asym"] * np.clip(un * c["side"], 0.0, 1.0)
    ho = np.maximum(c["mopen"], 0.7)
    k = 0.5 * np.minimum(ho, c["mwidth"]) * s  # as in _ellipse, with u already divided by the width
    dm = v - centre
    mouth = np.clip((k + 0.5) - (un2 * k + dm * dm * (k / (ho * ho))), 0.0, 1.0)
    dark = np.maximum(dark, 0.85 * face * mouth)
    img *= 1.0 - dark

    # lighting gradient (separable), occluders, noise
    lx, ly = c["light"] * np.cos(c["light_dir"]) / 24, c["light"] * np.sin(c["light_dir"]) / 24
    img *= (1.0 + (xx - 24.0) * lx) + (yy - 24.0) * ly
    for i in np.flatnonzero(p["occ"]):  # occluders: a rectangle or a full-width bar of one gray
        img[i, p["oy0"][i] : p["oy1"][i], p["ox0"][i] : p["ox1"][i]] = p["occ_val"][i]
    img += rng.standard_normal(img.shape, dtype=np.float32) * c["noise"]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _generate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    labels, p = _sample_params(n, rng)
    images = np.empty((n, SIZE, SIZE), dtype=np.uint8)
    for i in range(0, n, _CHUNK):
        images[i : i + _CHUNK] = _render({k: v[i : i + _CHUNK] for k, v in p.items()}, rng)
    return images, labels


def generate(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return images uint8 (n, 48, 48) and labels int64 (n,) in 0..6 (challenge order)."""
    return _generate(n, np.random.default_rng(seed))


def generate_dataset_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same faces as ``generate(n, seed)`` plus a ``usage`` string array like the challenge CSV.

    Within each class (in a seeded random order) the first ~80 % are "Training", the next ~10 %
    "PublicTest" and the rest "PrivateTest".
    """
    rng = np.random.default_rng(seed)
    images, labels = _generate(n, rng)
    usage = np.empty(n, dtype="<U11")
    for k in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == k))
        a, b = round(0.8 * len(idx)), round(0.9 * len(idx))
        usage[idx[:a]], usage[idx[a:b]], usage[idx[b:]] = USAGES
    return images, labels, usage


def contact_sheet(images: np.ndarray, labels: np.ndarray, path: str | Path, per_class: int = 8) -> None:
    """Write a PNG grid: one row per class, the first `per_class` faces of it scaled x2, name at left.

    Size: (``LABEL_WIDTH + per_class * 96``) x ``7 * 96`` pixels, grayscale; missing faces are black.
    """
    from PIL import Image, ImageDraw

    cell = 2 * SIZE
    sheet = Image.new("L", (LABEL_WIDTH + per_class * cell, NUM_CLASSES * cell), 0)
    draw = ImageDraw.Draw(sheet)
    labels = np.asarray(labels)
    for k, name in enumerate(EMOTIONS):
        draw.text((6, k * cell + cell // 2 - 6), name, fill=255)
        for j, i in enumerate(np.flatnonzero(labels == k)[:per_class]):
            face = Image.fromarray(np.asarray(images[i], dtype=np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(face, (LABEL_WIDTH + j * cell, k * cell))
    sheet.save(Path(path), format="PNG")
