"""Batched, device-side FER2013 augmentation (the paper's torchvision pipeline, re-implemented).

Reference (usef-kh/fer, data/fer2013.py), applied per image to a PIL image:

    train: RandomResizedCrop(48, scale=(0.8, 1.2))
           RandomApply([RandomAffine(0, translate=(0.2, 0.2))], p=0.5)
           RandomHorizontalFlip()
           RandomApply([RandomRotation(10)], p=0.5)
           TenCrop(40) -> ToTensor -> Normalize(mean=0, std=255) -> RandomErasing(p=0.5), per crop
    test:  TenCrop(40) -> ToTensor -> Normalize(mean=0, std=255)

The reference builds its PIL images from a float64 array, i.e. mode 'F', on which ToTensor does *not*
divide by 255; the Normalize(0, 255) does. Net effect: crops in [0, 1], which is what we return.

Here a whole batch (uint8 (B, 48, 48), already on the training device) goes through:

1. `sample_params`: every random draw, vectorised, through one `torch.Generator` (two `torch.rand`
   calls per batch). RandomResizedCrop's and RandomErasing's 10-attempt rejection loops are emulated
   exactly: 10 candidates per image/crop, first valid one wins, same fallbacks.
2. One fused resample: for every output pixel, the chain rotation -> flip -> translation -> resized
   crop is inverted analytically into a source position, sampled bilinearly with one `grid_sample`.
   The rotation's nearest-neighbour snap, the integer translation's zero fill, the rotation's zero
   corners and PIL's edge clamping at the crop border are reproduced, so for given parameters the
   output equals torchvision's sequential PIL result up to float rounding (see docs/augmentation.md).
3. TenCrop by strided copies (torchvision order), or for crops="one" the resample is evaluated
   only on one random 40x40 window.
4. RandomErasing (value 0): per-crop rectangles become a multiplicative 0/1 mask (one batched outer
   product), and the TenCrop copy multiplies straight into that buffer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import FerTuneError

SIZE, CROP = 48, 40
RRC_SCALE, RRC_RATIO = (0.8, 1.2), (3 / 4, 4 / 3)
AFFINE_P, TRANSLATE = 0.5, 0.2
FLIP_P = 0.5
ROTATE_P, DEGREES = 0.5, 10.0
ERASE_SCALE, ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)
ATTEMPTS = 10
# torchvision five_crop order: top-left, top-right, bottom-left, bottom-right, center; (top, left).
_D = SIZE - CROP
FIVE_OFFSETS = ((0, 0), (0, _D), (_D, 0), (_D, _D), (round(_D / 2), round(_D / 2)))
_CROPS = {"ten": 10, "one": 1, "center": 1}


def crops_per_image(mode: str) -> int:
    """Number of crops each image yields: "ten" -> 10, "one" / "center" -> 1."""
    if mode not in _CROPS:
        raise FerTuneError(f"unknown crop mode {mode!r}; expected one of {sorted(_CROPS)}")
    return _CROPS[mode]


def _rejection(u_area, u_ratio, area, scale, ratio, limit, inclusive):
    """Vectorised torchvision rejection loop (RandomResizedCrop / RandomErasing .get_params).

    u_area, u_ratio: (N, ATTEMPTS) uniforms. Returns (a, b, ok): a = round(sqrt(A * r)),
    b = round(sqrt(A / r)) of the first valid attempt (float tensors), ok = some attempt was valid.
    """
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(lo + (hi - lo) * u_ratio)
    a, b = torch.round(torch.sqrt(target * r)), torch.round(torch.sqrt(target / r))
    ok = (a <= limit) & (b <= limit) if inclusive else (a < limit) & (b < limit)
    ok = ok & (a > 0) & (b > 0)
    first = ok.float().argmax(1, keepdim=True)  # index of the first valid attempt (0 if none)
    return a.gather(1, first).squeeze(1), b.gather(1, first).squeeze(1), ok.any(1)


def _randint(u, n):
    """torch.randint(0, n) from uniforms u in [0, 1); n may be a tensor."""
    return (u * n).floor_().clamp_(max=n - 1)


def sample_params(
    B: int, generator: torch.Generator, device: torch.device, crops: str = "ten", erase_p: float = 0.5
) -> dict:
    """All random parameters of one training batch: float32 tensors (flags: bool) on `device`.

    Per image (B,): crop_i, crop_j, crop_h, crop_w (RandomResizedCrop box, pixels), fallback (bool:
    all 10 attempts rejected -> whole image), affine (bool), tx, ty (integer pixels, 0 when not
    applied), flip (bool), rotate (bool), angle (degrees, 0 when not applied), win_i, win_j (offset of
    the crops="one" 40x40 window). Per crop (B * n,), image-major: erase_i, erase_j, erase_h, erase_w
    (erase_h = erase_w = 0 when that crop is not erased).
    """
    n = crops_per_image(crops)
    u = torch.rand(B, 2 * ATTEMPTS + 10, generator=generator, device=device)
    ua, ur, u = u[:, :ATTEMPTS], u[:, ATTEMPTS : 2 * ATTEMPTS], u[:, 2 * ATTEMPTS :]
    w, h, ok = _rejection(ua, ur, SIZE * SIZE, RRC_SCALE, RRC_RATIO, SIZE, inclusive=True)
    full = torch.full_like(w, SIZE)  # fallback for a square image: the whole image
    w, h = torch.where(ok, w, full), torch.where(ok, h, full)
    p = {"crop_h": h, "crop_w": w, "fallback": ~ok}
    p["crop_i"] = torch.where(ok, _randint(u[:, 0], SIZE - h + 1), 0.0)
    p["crop_j"] = torch.where(ok, _randint(u[:, 1], SIZE - w + 1), 0.0)
    p["affine"] = u[:, 2] < AFFINE_P
    m = TRANSLATE * SIZE
    p["tx"] = torch.round(-m + 2 * m * u[:, 3]) * p["affine"]
    p["ty"] = torch.round(-m + 2 * m * u[:, 4]) * p["affine"]
    p["flip"] = u[:, 5] < FLIP_P
    p["rotate"] = u[:, 6] < ROTATE_P
    p["angle"] = (-DEGREES + 2 * DEGREES * u[:, 7]) * p["rotate"]
    p["win_i"], p["win_j"] = _randint(u[:, 8], _D + 1), _randint(u[:, 9], _D + 1)

    e = torch.rand(B * n, 3 + 2 * ATTEMPTS, generator=generator, device=device)
    eh, ew, eok = _rejection(
        e[:, 3 : 3 + ATTEMPTS], e[:, 3 + ATTEMPTS :], CROP * CROP, ERASE_SCALE, ERASE_RATIO, CROP, inclusive=False
    )
    on = (e[:, 0] < erase_p) & eok  # RandomErasing erases nothing when all attempts fail
    p["erase_h"], p["erase_w"] = eh * on, ew * on
    p["erase_i"] = _randint(e[:, 1], CROP - eh + 1) * on
    p["erase_j"] = _randint(e[:, 2], CROP - ew + 1) * on
    return p


def _geometry(img: torch.Tensor, p: dict, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Resample img (B, 1, 48, 48) float at output pixel centres xs (B|1, 1, W), ys (B|1, H, 1).

    Output pixel q -> rotation (PIL inverse map about (24, 24), nearest: floor) -> flip -> integer
    translation -> resized crop -> bilinear source position, clamped to the crop's pixel centres like
    PIL's resize of the cropped image. Pixels that leave the frame after rotation or translation are 0.
    """
    B, c = img.shape[0], SIZE / 2
    v = lambda t: t.view(B, 1, 1)  # noqa: E731
    th = torch.deg2rad(-p["angle"])
    cs, sn = v(torch.cos(th)), v(torch.sin(th))
    xs, ys = xs - c, ys - c
    fx = ((c + cs * xs) + sn * ys).floor_()  # pixel index in the pre-rotation 48x48 image
    fy = ((c + cs * ys) - sn * xs).floor_()
    sgn = v(1.0 - 2.0 * p["flip"].float())
    tx, ty = v(p["tx"]), v(p["ty"])
    # valid iff the rotation source and the translation source are both inside the 48x48 frame
    valid = (fx >= (sgn * tx).clamp(min=0)) & (fx <= (SIZE - 1 + sgn * tx).clamp(max=SIZE - 1))
    valid &= (fy >= ty.clamp(min=0)) & (fy <= (SIZE - 1 + ty).clamp(max=SIZE - 1))
    # pixel centre f + 0.5 -> flip -> translate -> scaled into the crop box -> grid_sample's normalised
    # coordinate (align_corners=False: g = x / 24 - 1), folded into one multiply-add per axis
    i, j, h, w = v(p["crop_i"]), v(p["crop_j"]), v(p["crop_h"]), v(p["crop_w"])
    x0 = torch.where(v(p["flip"]), SIZE - 0.5 - tx, 0.5 - tx)
    grid = torch.empty(B, *fx.shape[1:], 2, device=img.device)
    gx, gy = grid[..., 0], grid[..., 1]
    torch.addcmul((j + x0 * w / SIZE) / c - 1, fx, sgn * w / (SIZE * c), out=gx)
    torch.addcmul((i + (0.5 - ty) * h / SIZE) / c - 1, fy, h / (SIZE * c), out=gy)
    gx.clamp_((j + 0.5) / c - 1, (j + w - 0.5) / c - 1)
    gy.clamp_((i + 0.5) / c - 1, (i + h - 0.5) / c - 1)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.mul_(valid.unsqueeze(1))


def _five_views(x: torch.Tensor):
    """Views of x (B, 48, 48) for torchvision's five_crop: 4 corners as one (B, 2, 2, 40, 40) view, center."""
    s0, s1, s2 = x.stride()
    corners = x.as_strided((x.shape[0], 2, 2, CROP, CROP), (s0, _D * s1, _D * s2, s1, s2), x.storage_offset())
    t, l = FIVE_OFFSETS[4]
    return corners, x[:, t : t + CROP, l : l + CROP]


def _ten_crop(x: torch.Tensor, out: torch.Tensor, op: str = "copy_") -> torch.Tensor:
    """TenCrop(40) of x (B, 48, 48) into out (B, 10, 40, 40), torchvision order (5 crops, then the same 5
    of the horizontally flipped image). op="mul_" multiplies into out instead (fuses the erasing mask)."""
    B = x.shape[0]
    for k, v in enumerate((x, x.flip(-1))):
        corners, center = _five_views(v)
        getattr(out[:, 5 * k : 5 * k + 4].view(B, 2, 2, CROP, CROP), op)(corners)
        getattr(out[:, 5 * k + 4], op)(center)
    return out


def _keep_mask(p: dict, B: int, n: int, device) -> torch.Tensor:
    """RandomErasing(value=0) as a multiplicative mask (B, n, 40, 40): 0 inside each crop's rectangle."""
    r = torch.arange(CROP, device=device, dtype=torch.float32)
    i, j = p["erase_i"][:, None], p["erase_j"][:, None]
    rows = ((r >= i) & (r < i + p["erase_h"][:, None])).float()
    cols = ((r >= j) & (r < j + p["erase_w"][:, None])).float()
    # 1 - rows (x) cols as one batched outer product (far faster than a broadcast multiply on CPU)
    ones = torch.ones(1, 1, 1, device=device)
    return torch.baddbmm(ones, rows[:, :, None], cols[:, None, :], alpha=-1).view(B, n, CROP, CROP)


def apply_params(images: torch.Tensor, p: dict, crops: str = "ten") -> torch.Tensor:
    """The training pipeline with given parameters (from `sample_params`, or hand-made in tests)."""
    B, n = images.shape[0], crops_per_image(crops)
    if crops == "center":
        raise FerTuneError('crops="center" is an evaluation mode; use eval_batch')
    img = images.reshape(B, 1, SIZE, SIZE).float().div_(255)
    pix = torch.arange(SIZE, device=images.device, dtype=torch.float32) + 0.5
    keep = _keep_mask(p, B, n, images.device)
    if crops == "ten":
        x = _geometry(img, p, pix.view(1, 1, SIZE), pix.view(1, SIZE, 1)).view(B, SIZE, SIZE)
        out = _ten_crop(x, keep, "mul_")  # crops written straight into the erasing mask's buffer
    else:  # one random 40x40 window: resample only there
        pix = pix[:CROP]
        out = keep.mul_(
            _geometry(
                img, p, pix.view(1, 1, CROP) + p["win_j"].view(B, 1, 1), pix.view(1, CROP, 1) + p["win_i"].view(B, 1, 1)
            )
        )
    return out.view(B * n, 1, CROP, CROP)


def train_batch(
    images: torch.Tensor,
    generator: torch.Generator,
    crops: str = "ten",
    erase_p: float = 0.5,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (B, 48, 48) -> float32 (B * n, 1, 40, 40) in [0, 1], image-major (labels.repeat_interleave(n));
    `flip` (bool (B,)) replaces the random horizontal flips (the draws are made all the same)."""
    p = sample_params(images.shape[0], generator, images.device, crops, erase_p)
    if flip is not None:
        p["flip"] = flip
    return apply_params(images, p, crops)


def eval_batch(images: torch.Tensor, crops: str = "ten") -> torch.Tensor:
    """Deterministic test crops: "ten" -> TenCrop (B * 10, 1, 40, 40); "center" -> (B, 1, 40, 40)."""
    B = images.shape[0]
    if crops == "ten":
        x = images.reshape(B, SIZE, SIZE).float().div_(255)
        return _ten_crop(x, x.new_empty(B, 10, CROP, CROP)).view(B * 10, 1, CROP, CROP)
    if crops == "center":
        t, l = FIVE_OFFSETS[4]
        return images.reshape(B, 1, SIZE, SIZE)[:, :, t : t + CROP, l : l + CROP].float().div(255).contiguous()
    raise FerTuneError(f'eval crops must be "ten" or "center", got {crops!r}')
