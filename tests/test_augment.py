"""fer_tune.augment against torchvision: exact geometry for given parameters, matching parameter
distributions (torchvision's own get_params / transforms sampled many times), exact eval crops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from fer_tune import augment as A
from fer_tune.common import FerTuneError

N_TV = 6000  # torchvision draws per distribution test (python loop)
N_OURS = 100_000  # vectorised draws


def _images(B, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 48, 48), generator=g, dtype=torch.uint8).to(device)


@pytest.fixture(scope="module")
def ours():
    return A.sample_params(N_OURS, torch.Generator().manual_seed(123), "cpu")


def _close(a, b, n_a, n_b, sd, k=4.0):
    """|a - b| within k standard errors of the difference of two sample means (sd: per-sample std)."""
    assert abs(a - b) <= k * sd * math.sqrt(1 / n_a + 1 / n_b) + 1e-9, (a, b)


def _rate_close(ra, rb, n_a, n_b):
    _close(ra, rb, n_a, n_b, math.sqrt(max(rb * (1 - rb), 1e-4)))


# ---------------------------------------------------------------- API, shapes, determinism


def test_crops_per_image():
    assert [A.crops_per_image(m) for m in ("ten", "one", "center")] == [10, 1, 1]
    with pytest.raises(FerTuneError):
        A.crops_per_image("five")
    with pytest.raises(FerTuneError):
        A.eval_batch(_images(2), "one")


@pytest.mark.parametrize("crops,n", [("ten", 10), ("one", 1)])
def test_train_shapes_range_determinism(crops, n):
    x = _images(5)
    out = A.train_batch(x, torch.Generator().manual_seed(7), crops)
    assert out.shape == (5 * n, 1, 40, 40) and out.dtype == torch.float32 and out.is_contiguous()
    assert out.min() >= 0 and out.max() <= 1
    again = A.train_batch(x, torch.Generator().manual_seed(7), crops)
    other = A.train_batch(x, torch.Generator().manual_seed(8), crops)
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_eval_shapes():
    x = _images(3)
    for crops, n in (("ten", 10), ("center", 1)):
        out = A.eval_batch(x, crops)
        assert out.shape == (3 * n, 1, 40, 40) and out.dtype == torch.float32 and out.is_contiguous()
        assert out.min() >= 0 and out.max() <= 1


def test_eval_matches_torchvision():
    x = _images(4)
    ten, center = A.eval_batch(x, "ten"), A.eval_batch(x, "center")
    for b in range(4):
        im = Image.fromarray(x[b].numpy())  # 'L'
        ref = torch.stack([TF.to_tensor(c) for c in T.TenCrop(40)(im)])
        assert torch.equal(ten[10 * b : 10 * b + 10], ref)
        assert torch.equal(center[b], TF.to_tensor(T.CenterCrop(40)(im)))


def _identity(B, n):
    z, zn = torch.zeros(B), torch.zeros(B * n)
    f = torch.zeros(B, dtype=torch.bool)
    return dict(
        crop_i=z,
        crop_j=z,
        crop_h=z + 48,
        crop_w=z + 48,
        fallback=f,
        affine=f,
        tx=z,
        ty=z,
        flip=f,
        rotate=f,
        angle=z,
        win_i=z + 3,
        win_j=z + 5,
        erase_i=zn,
        erase_j=zn,
        erase_h=zn,
        erase_w=zn,
    )


def test_identity_params_reproduce_input():
    x = _images(6)
    torch.testing.assert_close(A.apply_params(x, _identity(6, 10), "ten"), A.eval_batch(x, "ten"), atol=1e-5, rtol=0)
    one = A.apply_params(x, _identity(6, 1), "one")
    torch.testing.assert_close(one[:, 0], x[:, 3:43, 5:45].float() / 255, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- geometry == torchvision for given params


def _reference(img_u8, p, b, n=10):
    """The reference pipeline's per-image steps with our parameters, on a mode-'F' PIL image (as usef-kh/fer)."""
    im = Image.fromarray(img_u8.numpy().astype(np.float64))
    i, j, h, w = (int(p[k][b]) for k in ("crop_i", "crop_j", "crop_h", "crop_w"))
    im = TF.resized_crop(im, i, j, h, w, [48, 48], InterpolationMode.BILINEAR)
    if p["affine"][b]:
        im = TF.affine(im, 0.0, [int(p["tx"][b]), int(p["ty"][b])], 1.0, [0.0, 0.0], InterpolationMode.NEAREST, fill=0)
    if p["flip"][b]:
        im = TF.hflip(im)
    if p["rotate"][b]:
        im = TF.rotate(im, float(p["angle"][b]), InterpolationMode.NEAREST, fill=0)
    crops = torch.stack([TF.normalize(TF.to_tensor(c), [0.0], [255.0]) for c in TF.ten_crop(im, 40)])
    for k in range(n):
        ei, ej, eh, ew = (int(p[key][b * n + k]) for key in ("erase_i", "erase_j", "erase_h", "erase_w"))
        crops[k] = TF.erase(crops[k], ei, ej, eh, ew, torch.tensor(0.0))
    return crops


def test_train_matches_torchvision_sequential_pipeline():
    B = 24
    x = _images(B, seed=3)
    p = A.sample_params(B, torch.Generator().manual_seed(5), "cpu")
    assert p["affine"].any() and p["rotate"].any() and p["flip"].any() and (p["erase_h"] > 0).any()
    out = A.apply_params(x, p, "ten").view(B, 10, 1, 40, 40)
    diff = torch.stack([(out[b] - _reference(x[b], p, b)).abs() for b in range(B)])
    # identical up to float rounding, except a few pixels where PIL's fixed-point nearest-neighbour
    # rotation and our float32 floor() land on different sides of a pixel boundary
    assert (diff > 1e-4).float().mean() < 2e-3
    no_rot = ~p["rotate"]
    assert diff[no_rot].max() < 1e-4


def test_one_crop_is_window_of_full_resample():
    B = 8
    x = _images(B, seed=4)
    p = A.sample_params(B, torch.Generator().manual_seed(9), "cpu", crops="one", erase_p=0.0)
    pix = torch.arange(48.0) + 0.5
    full = A._geometry(x.view(B, 1, 48, 48).float() / 255, p, pix.view(1, 1, 48), pix.view(1, 48, 1))
    one = A.apply_params(x, p, "one")
    assert len(set(zip(p["win_i"].tolist(), p["win_j"].tolist()))) > 1
    for b in range(B):
        wi, wj = int(p["win_i"][b]), int(p["win_j"][b])
        torch.testing.assert_close(one[b, 0], full[b, 0, wi : wi + 40, wj : wj + 40], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- parameter distributions vs torchvision


def test_resized_crop_distribution(ours, monkeypatch):
    torch.manual_seed(0)
    calls = {"randint": 0}
    real = torch.randint

    def counting(*a, **k):
        calls["randint"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch, "randint", counting)  # get_params draws offsets only after an accepted attempt
    dummy = torch.empty(1, 48, 48)
    tv = torch.tensor(
        [T.RandomResizedCrop.get_params(dummy, [0.8, 1.2], [3 / 4, 4 / 3]) for _ in range(N_TV)], dtype=torch.float32
    )
    monkeypatch.undo()
    tv_fallback = 1 - calls["randint"] / (2 * N_TV)
    _rate_close(ours["fallback"].float().mean().item(), tv_fallback, N_OURS, N_TV)
    assert 0.03 < tv_fallback < 0.15  # the fallback (whole image) is common enough to matter
    mine = torch.stack([ours[k] for k in ("crop_i", "crop_j", "crop_h", "crop_w")], 1)
    for c in range(4):
        _close(mine[:, c].mean().item(), tv[:, c].mean().item(), N_OURS, N_TV, tv[:, c].std().item())
        assert abs(mine[:, c].std().item() - tv[:, c].std().item()) < 0.08 * tv[:, c].std().item()
    assert mine[:, 2:].min() >= 1 and mine[:, 2:].max() <= 48 and (mine[:, :2] + mine[:, 2:]).max() <= 48
    full = lambda m: ((m[:, 2] == 48) & (m[:, 3] == 48)).float().mean().item()  # noqa: E731
    _rate_close(full(mine), full(tv), N_OURS, N_TV)


def test_affine_flip_rotation_distribution(ours):
    torch.manual_seed(1)
    hits = []
    apply = T.RandomApply([lambda im: hits.append(1) or im], p=0.5)
    for _ in range(N_TV):
        apply(0)
    tv_rate = len(hits) / N_TV
    for key in ("affine", "rotate", "flip"):
        _rate_close(ours[key].float().mean().item(), tv_rate, N_OURS, N_TV)
    flip = T.RandomHorizontalFlip()
    probe = torch.tensor([[[0.0, 1.0]]])
    tv_flip = sum(flip(probe)[0, 0, 0].item() == 1.0 for _ in range(N_TV)) / N_TV
    _rate_close(ours["flip"].float().mean().item(), tv_flip, N_OURS, N_TV)

    tv_t = torch.tensor(
        [T.RandomAffine.get_params([0.0, 0.0], [0.2, 0.2], None, None, [48, 48])[1] for _ in range(N_TV)],
        dtype=torch.float32,
    )
    on = ours["affine"]
    mine_t = torch.stack([ours["tx"][on], ours["ty"][on]], 1)
    for c in range(2):  # integer shifts in [-10, 10], same histogram
        h_tv = torch.bincount((tv_t[:, c] + 10).long(), minlength=21).float() / N_TV
        h_me = torch.bincount((mine_t[:, c] + 10).long(), minlength=21).float() / len(mine_t)
        assert 0.5 * (h_tv - h_me).abs().sum() < 0.04
        assert mine_t[:, c].abs().max() == 10
    assert (ours["tx"][~on] == 0).all() and (ours["angle"][~ours["rotate"]] == 0).all()

    tv_a = torch.tensor([T.RandomRotation.get_params([-10.0, 10.0]) for _ in range(N_TV)])
    mine_a = ours["angle"][ours["rotate"]]
    assert mine_a.abs().max() <= 10
    _close(mine_a.mean().item(), tv_a.mean().item(), len(mine_a), N_TV, 20 / math.sqrt(12))
    assert abs(mine_a.std().item() - 20 / math.sqrt(12)) < 0.05 and abs(tv_a.std().item() - 20 / math.sqrt(12)) < 0.3
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    assert (torch.quantile(mine_a, qs) - torch.quantile(tv_a, qs)).abs().max() < 0.6


def test_erasing_distribution(ours):
    torch.manual_seed(2)
    erase = T.RandomErasing(p=0.5)  # defaults: scale (0.02, 0.33), ratio (0.3, 3.3), value 0
    ones = torch.ones(1, 40, 40)
    rects = []
    for _ in range(N_TV):
        m = erase(ones)[0] == 0
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        rects.append([rows.min(), cols.min(), len(rows), len(cols)] if len(rows) else [0, 0, 0, 0])
    tv = torch.tensor(rects, dtype=torch.float32)
    mine = torch.stack([ours[k] for k in ("erase_i", "erase_j", "erase_h", "erase_w")], 1)
    _rate_close((mine[:, 2] > 0).float().mean().item(), (tv[:, 2] > 0).float().mean().item(), len(mine), N_TV)
    me_on, tv_on = mine[mine[:, 2] > 0], tv[tv[:, 2] > 0]
    area_me, area_tv = me_on[:, 2] * me_on[:, 3] / 1600, tv_on[:, 2] * tv_on[:, 3] / 1600
    _close(area_me.mean().item(), area_tv.mean().item(), len(area_me), len(area_tv), area_tv.std().item())
    for c in range(4):
        _close(me_on[:, c].mean().item(), tv_on[:, c].mean().item(), len(me_on), len(tv_on), tv_on[:, c].std().item())
    assert (me_on[:, 2] < 40).all() and (me_on[:, 3] < 40).all() and (me_on[:, :2] + me_on[:, 2:]).max() <= 40

    # and in the pixels (geometry without zero fill, on a white image): erase_p=1 erases (almost) every
    # crop, exactly its rectangle; erase_p=0 none
    x = torch.full((50, 48, 48), 255, dtype=torch.uint8)
    for erase_p in (1.0, 0.0):
        p = A.sample_params(50, torch.Generator().manual_seed(0), "cpu", erase_p=erase_p)
        p.update(
            affine=p["affine"] & False, tx=p["tx"] * 0, ty=p["ty"] * 0, rotate=p["rotate"] & False, angle=p["angle"] * 0
        )
        erased = (A.apply_params(x, p, "ten") == 0).flatten(1).sum(1).float()
        torch.testing.assert_close(erased, p["erase_h"] * p["erase_w"])
        assert (erased > 0).float().mean() > 0.9 if erase_p else (erased == 0).all()


def test_one_window_uniform(ours):
    for k in ("win_i", "win_j"):
        h = torch.bincount(ours[k].long(), minlength=9).float() / N_OURS
        assert len(h) == 9 and (h - 1 / 9).abs().max() < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    x = _images(16)
    p = A.sample_params(16, torch.Generator().manual_seed(1), "cpu")
    cpu = A.apply_params(x, p, "ten")
    gpu = A.apply_params(x.cuda(), {k: v.cuda() for k, v in p.items()}, "ten").cpu()
    assert ((cpu - gpu).abs() > 1e-4).float().mean() < 1e-3
    out = A.train_batch(x.cuda(), torch.Generator("cuda").manual_seed(0), "one")
    assert out.shape == (16, 1, 40, 40) and out.device.type == "cuda"
    torch.testing.assert_close(A.eval_batch(x.cuda(), "ten").cpu(), A.eval_batch(x, "ten"))
