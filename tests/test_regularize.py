"""The training additions beyond the paper (fer_tune.regularize): each changes what it should, is a no-op when off,
resumes bit-exactly, and refuses a bad value in one line."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fer_tune import augment
from fer_tune import data as fdata
from fer_tune.cli import main
from fer_tune.config import TrainConfig
from fer_tune.regularize import (
    WeightEMA,
    alternate_flips,
    flip_bits,
    mix_batch,
    mixed_correct,
    mixed_loss,
    param_groups,
)
from fer_tune.train import fit

CPU = torch.device("cpu")
TINY = dict(width=0.0625, train_crops="one", test_crops="center", batch_size=32, epochs=2)
ALL_ON = dict(label_smoothing=0.1, mixup=0.4, cutmix=1.0, mix_p=0.8, ema=0.9, ema_every=2, flip="alternate")
TIMING = ("epoch_seconds", "images_per_s")


@pytest.fixture(scope="module")
def small():
    return fdata.load("synthetic:400", "paper")


def untimed(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_label_smoothing_is_the_formula():
    torch.manual_seed(0)
    logits, y = torch.randn(12, 7), torch.randint(0, 7, (12,))
    logp = F.log_softmax(logits, 1)
    for s in (0.0, 0.1, 0.3):
        expected = ((1 - s) * -logp.gather(1, y[:, None])[:, 0] - s * logp.mean(1)).mean()
        assert torch.allclose(mixed_loss(logits, y, y, 1.0, s), expected, atol=1e-6)


def test_mixup_and_cutmix_pair_every_crop_with_the_same_crop_of_a_partner():
    n_crops, B = 10, 6
    x = torch.rand(B * n_crops, 1, 40, 40)
    y = torch.arange(B).repeat_interleave(n_crops)
    cfg = TrainConfig(mixup=1.0)
    gen = torch.Generator().manual_seed(3)
    mixed, y_a, y_b, lam = mix_batch(x, y, n_crops, cfg, gen, (0, 1, 0))
    assert 0.0 < lam < 1.0 and torch.equal(y_a, y)
    partner = y_b.view(B, n_crops)
    assert (partner == partner[:, :1]).all()  # one partner per image, for all its crops
    src = partner[:, 0].repeat_interleave(n_crops) * n_crops + torch.arange(n_crops).repeat(B)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[src], atol=1e-6)
    # the same key and generator state: the same mix (a resumed run repeats it)
    again = mix_batch(x, y, n_crops, cfg, torch.Generator().manual_seed(3), (0, 1, 0))
    assert torch.equal(again[0], mixed) and again[3] == lam

    mixed, _, y_b, lam = mix_batch(x, y, n_crops, TrainConfig(cutmix=1.0), gen, (0, 1, 1))
    src = y_b.view(B, n_crops)[:, 0].repeat_interleave(n_crops) * n_crops + torch.arange(n_crops).repeat(B)
    box = (mixed != x).any(0)[0]  # the pixels the partner's crops were pasted into
    rows, cols = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
    assert box.sum() == len(rows) * len(cols)  # one rectangle
    assert torch.equal(mixed[..., box], x[src][..., box]) and torch.equal(mixed[..., ~box], x[..., ~box])
    assert lam == pytest.approx(1 - box.float().mean().item())


def test_mixing_off_or_never_drawn_changes_nothing(small):
    base = fit(TrainConfig(**TINY), small, device=CPU)
    for off in ({"mixup": 0.0, "cutmix": 0.0, "mix_p": 0.7}, {"mixup": 1.0, "cutmix": 1.0, "mix_p": 0.0}):
        r = fit(TrainConfig(**TINY, **off), small, device=CPU)
        assert untimed(r.history) == untimed(base.history)
        for k, v in base.checkpoint["model"].items():
            assert torch.equal(v, r.checkpoint["model"][k]), k
    mixed = fit(TrainConfig(**TINY, mixup=1.0), small, device=CPU)
    assert untimed(mixed.history) != untimed(base.history)


def test_train_accuracy_under_mixed_targets_weights_both_labels():
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0]])
    y_a, y_b = torch.tensor([0, 1, 0, 2]), torch.tensor([1, 0, 2, 0])
    # predictions 0, 1, 2, 0: agree with y_a at 0, 1; with y_b at 2, 3
    assert float(mixed_correct(logits, y_a, y_b, 0.75)) == pytest.approx(0.75 * 2 + 0.25 * 2)
    assert float(mixed_correct(logits, y_a, y_a, 1.0)) == 2


def test_ema_weights_follow_the_formula_buffers_included():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = WeightEMA(model, decay=0.9, every=2)
    expected = {k: v.clone().float() if v.dtype.is_floating_point else v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updates = 0
    for step in range(1, 8):
        model.train()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.step(model)
        if step % 2 == 0:
            d = min(0.9, (1 + updates) / (10 + updates))
            for k, v in model.state_dict().items():
                expected[k] = d * expected[k] + (1 - d) * v.float() if v.dtype.is_floating_point else v.clone()
            updates += 1
    assert ema.updates == updates == 3
    for k, v in ema.model.state_dict().items():
        assert torch.allclose(v.float(), expected[k].float(), atol=1e-6), k  # running_mean / running_var too
    assert int(ema.model.state_dict()["1.num_batches_tracked"]) == 6  # a counter is copied at each update


def test_every_addition_resumes_bit_exactly_and_ema_is_what_is_evaluated(small):
    cfg = TrainConfig(**{**TINY, "epochs": 3}, **ALL_ON, no_wd_1d=True)
    straight = fit(cfg, small, device=CPU)
    first = fit(cfg, small, device=CPU, on_epoch=lambda m, s: m["epoch"] < 1)
    assert first.status == "stopped" and {"train_model", "ema"} <= set(first.checkpoint)
    resumed = fit(cfg, small, device=CPU, checkpoint=first.checkpoint)
    assert untimed(resumed.history) == untimed(straight.history)
    for key in ("model", "train_model"):
        for k, v in straight.checkpoint[key].items():
            assert torch.equal(v, resumed.checkpoint[key][k]), (key, k)
    assert resumed.checkpoint["ema"] == straight.checkpoint["ema"]
    # "model" holds the EMA weights (validated, selected, exported), "train_model" the optimizer's
    assert any(
        not torch.equal(v, straight.checkpoint["train_model"][k]) for k, v in straight.checkpoint["model"].items()
    )
    from fer_tune.train import model_from_checkpoint, predict_logits

    x_val, y_val = small.arrays("val")
    model, _ = model_from_checkpoint(straight.checkpoint, CPU)
    logits = predict_logits(model, torch.from_numpy(x_val), crops="center")
    acc = 100.0 * float((logits.argmax(1) == torch.from_numpy(y_val)).float().mean())
    assert acc == pytest.approx(straight.history[-1]["val_acc"], abs=1e-4)


def test_alternate_flip_mirrors_each_image_once_in_two_epochs():
    bits = flip_bits(1000, seed=4, device=CPU)
    assert torch.equal(bits, flip_bits(1000, seed=4, device=CPU)) and 400 < int(bits.sum()) < 600
    idx = torch.randperm(1000)[:64]
    one, two, three = (alternate_flips(bits, idx, e) for e in (1, 2, 3))
    assert torch.equal(one, bits[idx]) and torch.equal(two, ~one) and torch.equal(three, one)
    # train_batch's flip override: the random flips given back reproduce the batch, their opposite does not
    images = torch.randint(0, 256, (16, 48, 48), dtype=torch.uint8)
    g = torch.Generator().manual_seed(7)
    drawn = augment.sample_params(16, torch.Generator().manual_seed(7), CPU, "one", 0.0)["flip"]
    plain = augment.train_batch(images, g, "one", 0.0)
    assert torch.equal(augment.train_batch(images, torch.Generator().manual_seed(7), "one", 0.0, drawn), plain)
    assert not torch.equal(augment.train_batch(images, torch.Generator().manual_seed(7), "one", 0.0, ~drawn), plain)


def test_no_wd_1d_spares_biases_and_norm_weights():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    groups = param_groups(model, 0.1, True)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(groups, lr=0.5, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only weight decay moves a parameter
    for p, b in zip(model.parameters(), before):
        assert torch.allclose(p, b * (1 - 0.05)) if p.ndim >= 2 else torch.equal(p, b)
    assert param_groups(model, 0.1, False) == list(model.parameters())


@pytest.mark.parametrize(
    "setting,expected",
    [
        ("label_smoothing=0.5", "label_smoothing must be in [0, 0.3]"),
        ("mixup=-1", "mixup must be in [0, 10]"),
        ("mix_p=1.5", "mix_p must be in [0, 1]"),
        ("ema=1", "ema must be in [0, 1)"),
        ("ema_every=0", "ema_every must be > 0"),
        ("flip=vertical", "flip='vertical' is not one of random, alternate"),
        ("no_wd_1d=maybe", "no_wd_1d must be true or false"),
    ],
)
def test_bad_values_are_one_line(tmp_path, capsys, setting, expected):
    code = main(["train", "--out", str(tmp_path / "x"), "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.strip().count("\n") == 0 and "Traceback" not in err


def test_the_keys_are_searchable_in_a_space():
    from fer_tune.tune.study.spaces import parse_space

    spec = parse_space(
        {
            "name": "r",
            "metric": "val_acc",
            "mode": "max",
            "num_samples": 2,
            "max_epochs": 2,
            "space": {
                "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
                "ema": {"type": "categorical", "choices": [0.0, 0.999]},
                "no_wd_1d": {"type": "categorical", "choices": [False, True]},
                "flip": {"type": "categorical", "choices": ["random", "alternate"]},
            },
        },
        source="test",
    )
    assert {"label_smoothing", "ema", "no_wd_1d", "flip"} <= set(spec.to_dict()["space"])
    with pytest.raises(Exception, match="ema"):
        parse_space(
            {
                "name": "r",
                "metric": "val_acc",
                "mode": "max",
                "space": {"ema": {"type": "categorical", "choices": [0.5, 1.5]}},
            },
            source="test",
        )
